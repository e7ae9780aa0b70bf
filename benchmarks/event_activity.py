"""Step by step, what the binary neurons of a Section 4 network send while 64 Fashion-MNIST test
images relax: per layer the share of active outputs, of changed ones (per sample, and the union
over the batch), whether the step was computed from the changes, and the step's time.

    python benchmarks/event_activity.py fc1h [--run S-<n>] [--threads 1]
    python benchmarks/event_activity.py fc2h | conv [--run S-<n>]

A random network (seed 0) by default; ``--run`` loads a run folder's ``checkpoint.pt`` (the
line's network, e.g. after one epoch of ``main.py`` on Fashion-MNIST).  The free phase runs
``T`` steps from the initial states, then a nudged phase ``Kmax`` steps towards the labels
(beta of the line), in one stream (``--threads``: 1 by default, the share a CPU stream relaxes).
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main as ep_main  # noqa: E402
from benchmarks.event_speed import argv  # noqa: E402
from binary_ep import checkpoint  # noqa: E402
from binary_ep.datasets import load_data  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("line", choices=("fc1h", "fc2h", "conv"))
    p.add_argument("--run", help="a run folder of this line whose checkpoint.pt to load")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dataDir")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    _, args, _ = ep_main.parse(argv(a.line, "--trainSubset", 64, "--testSubset", a.batch, "--seed", 0,
                                    "--outDir", tempfile.gettempdir(), *(["--dataDir", a.dataDir] if a.dataDir else [])))
    torch.manual_seed(0)
    _, test = load_data(args, torch.Generator().manual_seed(0))
    net = ep_main.build_network(args)
    if a.run:
        done = checkpoint.load_checkpoint(a.run, net, {})
        print(f"{a.run}: the network after epoch {done}")
    tools = ep_main.architecture(args.archi)[1]
    x, labels = next(iter(test))
    x, target = tools.prepare_images(net, x), net.target(labels)
    names = net.layer_names
    print(f"{a.line}, {len(labels)} test images, one stream of {a.threads} thread(s); per layer "
          f"({', '.join(names)}): active / changed per sample / changed union, all %, and E = from the changes")
    with torch.no_grad():
        drive = net.input_drive(x)
        s = net.initHidden(x.shape[0])
        for phase, steps, beta in (("free", args.T, 0.0), ("nudged", args.Kmax, args.beta)):
            ref = s[0].clone() if beta and net.nudge_from_start else None  # (conv: the free output)
            for t in range(steps):
                act = drive.events.begin()
                start = time.perf_counter()
                s = net.stepper(s, drive, target if beta else None, beta, ref=ref)
                seconds = time.perf_counter() - start
                cells = []
                for k in sorted(act.active):
                    n, b = act.units[k], act.samples[k]
                    cells.append(f"{100 * int(act.active[k]) / (n * b):5.1f} {100 * int(act.changed[k]) / (n * b):6.2f} "
                                 f"{100 * int(act.union[k][0].sum()) / n:5.1f}{' E' if act.event[k] else '  '}")
                print(f"{phase:6} {t + 1:3}  {1e3 * seconds:8.2f} ms  " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
