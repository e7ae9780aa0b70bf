"""One training step of ``main.py``'s network on the first ``--batchSize`` digits, written to
``OUT/rank<r>.pt``: the gradients every rank holds after ``Replicas.combine``, what the flip
rule then did, what the comparison of the replicas said afterwards (with
``EP_TEST_DRIFT=<rank>`` that rank's first weight is flipped before it), and which threads of
the process group's gloo backend ``distributed.stop`` left running.  Run alone (one process:
the reference) or under ``torchrun`` (each rank relaxes its share of the same batch)::

    python tests/dp_one_step.py OUT <main.py arguments>
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dp_one_step.py OUT <...>
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import main  # noqa: E402
from binary_ep import distributed  # noqa: E402
from binary_ep.datasets import load_digits_split, share_bounds  # noqa: E402
from binary_ep.estimators import make_estimator  # noqa: E402


def one_step(out, argv):
    parser, args, _ = main.parse(argv)
    replicas = distributed.start(parser, args)
    torch.manual_seed(args.seed)
    net = main.build_network(args)
    tools = main.architecture(args.archi)[1]
    (x, y), _ = load_digits_split()
    batch = args.batchSize
    lo, hi = share_bounds(batch, *replicas.share)
    estimator = make_estimator(args, torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        weights = [w.detach().clone() for w in net.binary_weights()]
        estimator.compute_gradient(net, tools.prepare_images(net, x[lo:hi]), net.target(y[lo:hi]), batch=batch)
        replicas.combine(net, batch)
        factored = [net.optW.pending_factors(w) is not None for w in net.binary_weights()]
        grads = [g.detach().clone() for g in net.weight_grads()]
        bias_grads = [b.grad.detach().clone() for b in net.biases()]
        net.updateWeights()
    after = [w.detach().clone() for w in net.binary_weights()]
    if os.environ.get("EP_TEST_DRIFT") == str(replicas.rank):  # then make this replica differ
        with torch.no_grad():
            net.binary_weights()[0].view(-1)[0].neg_()
    try:  # the end-of-epoch comparison of the replicas
        replicas.check_replicas(net, 1)
        drift = None
    except distributed.StopAll as e:
        drift = str(e)
    distributed.stop()  # then no thread of the process group may be left (its gloo threads end with it)
    left = sorted(name for name in (open(f"/proc/self/task/{t}/comm").read().strip()
                                    for t in os.listdir("/proc/self/task")) if "gloo" in name)
    torch.save({"drift": drift, "gloo_threads_after_stop": left, "weights": weights, "grads": grads,
                "bias_grads": bias_grads, "factored": factored, "after": after,
                "thresholds": [g["threshold"] for g in net.optW.param_groups],
                "gammas": [g["gamma"] for g in net.optW.param_groups],
                "threads": torch.get_num_threads(), "world": replicas.world},
               os.path.join(out, f"rank{replicas.rank}.pt"))


if __name__ == "__main__":
    one_step(sys.argv[1], sys.argv[2:])
