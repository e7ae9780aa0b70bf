"""Data-parallel throughput: N processes x 1 thread (torchrun, gloo) against 1 process with its
CPU streams, on the seed's configurations.

    python benchmarks/data_parallel.py [--configs fc1h conv_mnist] [--nproc 2] [--batches 20] [--repeats 3]
    python benchmarks/data_parallel.py --fashion DATA_DIR     # the fc-1h line on Fashion-MNIST,
                                                             # --trainSubset 4000, 2 epochs, via main.py

Steps mode (synthetic data, as ``benchmark.py``): each measured batch is a training step
(relaxation of this rank's share, gradient, ``Replicas.combine`` with the training loop's
per-batch counts and flags riding along, flip update); samples/s counts the global batch.  The
communication time per batch is split into the wait for the slower rank (a barrier before the
exchange) and the exchange itself (``combine``: the all-reduce and the all-gather, and the
copies around them).  The one-process
figure runs the same steps without a process group.

Fashion mode: ``main.py``'s fc-1h line with ``--dataset fashion_mnist --trainSubset 4000
--epochs 2`` as one process and under ``torchrun --nproc_per_node N``; prints the test error of
each epoch and the seconds per epoch (training and the full test set) from ``results.csv``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as main.py does, before torch is imported
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import benchmark  # noqa: E402  (the seed's configurations and how benchmark.py builds them)
from binary_ep import distributed  # noqa: E402
from binary_ep.datasets import share_bounds  # noqa: E402
from binary_ep.estimators import EP  # noqa: E402
from binary_ep.vocabulary import INPUT_SHAPE  # noqa: E402

FASHION_FC1H = ("--device -1 --archi fc --layersList 784 4096 10 --activationFun hardsigm --T 50 --Kmax 10 "
                "--beta 0.3 --gamma 1e-5 1e-4 --gradThreshold 5e-7 5e-7 --dataset fashion_mnist --lrBias 0.025 "
                "0.05 --batchSize 64 --test_batchSize 512 --epochs 2 --learnAlpha 0 --trainSubset 4000 --seed 1")


def steps(config, batches, repeats):
    """Time training steps of ``config`` in this process (one rank of a group, or alone):
    returns {samples_per_s, wait_ms, exchange_ms} (medians over ``repeats``)."""
    replicas = distributed.current()
    net, args = benchmark.build(config, torch.device("cpu"))
    tools = benchmark.ep_main.architecture(args.archi)[1]
    estimator, batch = EP(args.beta), args.batchSize
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand((batch,) + INPUT_SHAPE[args.dataset], generator=g) for _ in range(4)]
    ys = [torch.randint(0, 10, (batch,), generator=g) for _ in range(4)]
    lo, hi = share_bounds(batch, *replicas.share)
    rates, waits, exchanges = [], [], []
    with torch.no_grad():
        for r in range(repeats + 1):
            wait = exchange = 0.0
            if replicas.active:
                torch.distributed.barrier()
            start = time.perf_counter()
            for i in range(batches):
                x = tools.prepare_images(net, xs[i % 4][lo:hi])
                s = estimator.compute_gradient(net, x, net.target(ys[i % 4][lo:hi]), batch=batch)
                mine = torch.cat([net.health(s).to(torch.float64), replicas.stop_flags("cpu")])
                t0 = time.perf_counter()
                if replicas.active:
                    torch.distributed.barrier()
                t1 = time.perf_counter()
                shared = replicas.combine(net, batch, mine)  # as the training loop: one exchange
                t2 = time.perf_counter()
                net.updateWeights()
                shared.tolist()
                wait += t1 - t0
                exchange += t2 - t1
            if r:  # the first pass is a warm-up
                rates.append(batches * batch / (time.perf_counter() - start))
                waits.append(1e3 * wait / batches)
                exchanges.append(1e3 * exchange / batches)
    return {"samples_per_s": statistics.median(rates), "wait_ms": statistics.median(waits),
            "exchange_ms": statistics.median(exchanges), "threads": torch.get_num_threads()}


def message_sizes(config, world):
    """Numbers each rank sends per batch: (all-gathered factors, all-reduced gradients)."""
    net, args = benchmark.build(config, torch.device("cpu"))
    gathered, reduced, batch = 0, sum(b.numel() for b in net.biases()), args.batchSize
    weights = net.binary_weights()
    for k, w in enumerate(weights):
        factored = args.archi == "fc" and k == len(weights) - 1  # the fc input layer under EP
        if factored and batch * (w.shape[0] + w.shape[1]) < w.numel():
            gathered += -(-batch // world) * (w.shape[0] + w.shape[1])
        else:
            reduced += w.numel()
    return gathered, reduced


def worker(a):
    """One rank under torchrun: join the group as main.py does, time the steps, rank 0 writes JSON."""
    parser = argparse.ArgumentParser(prog="data_parallel.py")
    args = argparse.Namespace(check="none", export=False, batchSize=64, device=-1, seed=0)
    distributed.start(parser, args)
    result = steps(a.config, a.batches, a.repeats)
    if distributed.current().rank == 0:
        with open(a.worker, "w") as f:
            json.dump(result, f)
    distributed.stop()


def launch_steps(config, nproc, batches, repeats):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(nproc), __file__, "--worker", out, "--config", config, "--batches", str(batches),
                        "--repeats", str(repeats)], check=True, env=env, stderr=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)


def fashion(data_dir, nproc):
    import pandas as pd
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for name, launcher in (("1 process", [sys.executable]),
                               (f"{nproc} processes", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       "--nproc_per_node", str(nproc)])):
            folder = os.path.join(out, name.replace(" ", "_"))
            env = dict(os.environ, EP_NO_PROGRESS="1")
            env.pop("OMP_NUM_THREADS", None)
            subprocess.run(launcher + [os.path.join(ROOT, "main.py")] + FASHION_FC1H.split()
                           + ["--dataDir", data_dir, "--outDir", folder], check=True, env=env, cwd=ROOT)
            (csv,) = [os.path.join(d, "results.csv") for d, _, f in os.walk(folder) if "results.csv" in f]
            rows[name] = pd.read_csv(csv, index_col="epoch")
    print("fc-1h on Fashion-MNIST, --trainSubset 4000, 2 epochs (4000 training + 10000 test samples each)")
    print(f"{'':14} {'test error 1':>13} {'test error 2':>13} {'s/epoch 1':>10} {'s/epoch 2':>10}")
    for name, df in rows.items():
        print(f"{name:14} {df['test_error'][1]:12.2f}% {df['test_error'][2]:12.2f}% "
              f"{df['epoch_seconds'][1]:10.1f} {df['epoch_seconds'][2]:10.1f}")
    one, many = rows.values()
    print(f"speed ratio (1-process seconds / {nproc}-process seconds, both epochs): "
          f"{one['epoch_seconds'].sum() / many['epoch_seconds'].sum():.2f}; largest test-error gap: "
          f"{(one['test_error'] - many['test_error']).abs().max():.2f} points")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["fc1h", "conv_mnist"], choices=sorted(benchmark.CONFIGS))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fashion", metavar="DATA_DIR", help="run the Fashion-MNIST fc-1h comparison instead")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if a.fashion:
        return fashion(a.fashion, a.nproc)
    print(f"torch {torch.__version__}; {os.cpu_count()} CPUs; synthetic data; median of {a.repeats} runs of "
          f"{a.batches} batches; 1 process: {torch.get_num_threads()} threads (CPU streams); "
          f"{a.nproc} processes x 1 thread (torchrun, gloo)")
    print(f"{'config':11} {'1 proc samples/s':>17} {f'{a.nproc} proc samples/s':>17} {'ratio':>6} "
          f"{'wait ms/batch':>14} {'exchange ms/batch':>18} {'gathered':>9} {'reduced':>9}")
    for c in a.configs:
        one = steps(c, a.batches, a.repeats)
        many = launch_steps(c, a.nproc, a.batches, a.repeats)
        gathered, reduced = message_sizes(c, a.nproc)
        print(f"{c:11} {one['samples_per_s']:17.1f} {many['samples_per_s']:17.1f} "
              f"{many['samples_per_s'] / one['samples_per_s']:6.2f} {many['wait_ms']:14.2f} "
              f"{many['exchange_ms']:18.2f} {gathered:9d} {reduced:9d}", flush=True)


if __name__ == "__main__":
    main()
