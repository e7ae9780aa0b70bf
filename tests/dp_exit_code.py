"""``python main.py ...`` as a launcher's worker, which also says its exit code on stderr: when
``torchrun`` is itself signalled it reports no worker's code.  ``main.main()`` runs in this
process, as ``main.py``'s own ``__main__`` runs it, so the worker receives the launcher's signals.
With ``EP_TEST_NAN_AT=<rank>:<batch>`` that rank puts a NaN into its share of that training
batch of epoch 1 (a divergence only one rank sees).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dp_exit_code.py <main.py arguments>
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main  # noqa: E402
import Tools_fc  # noqa: E402


def plant_nan(rank, batch):
    prepare, seen = Tools_fc.prepare_images, [0]

    def planted(net, x):
        x = prepare(net, x)
        seen[0] += 1
        if seen[0] == batch and os.environ["RANK"] == rank:
            x = x.clone()
            x[0, 5] = float("nan")
        return x
    Tools_fc.prepare_images = planted


if __name__ == "__main__":
    if os.environ.get("EP_TEST_NAN_AT"):
        where = os.environ["EP_TEST_NAN_AT"].split(":")
        plant_nan(where[0], int(where[1]))
    code = main.main()
    print(f"worker exit code {code}", file=sys.stderr)
    sys.exit(code)
