"""Initial states: every state starting at 1 (the seed's text, this project) against 0.5 (the
original code's conv class), on the seed's MNIST conv line with Fashion-MNIST.

    python benchmarks/initial_states.py [--seeds 0 1 2] [--trainSubset 4000] [--testSubset 2000]

Trains one epoch per (start value, seed) through ``main.main`` (the 0.5 start by replacing
``Network_conv.initHidden`` in this process only) and prints the test and train errors, with the
mean and sample std over the seeds of each start value.
"""

import argparse
import os
import statistics
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("EP_NO_PROGRESS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pandas as pd  # noqa: E402

import main  # noqa: E402
import Network_conv  # noqa: E402

SEED_CONV_LINE = ("--device -1 --archi conv --layersList 10 --convList 64 32 1 --padding 0 --kernelSize 5 "
                  "--Fpool 2 --activationFun hardsigm --T 150 --Kmax 10 --beta 0.3 --gamma 5e-8 5e-8 5e-8 "
                  "--gradThreshold 1e-8 1e-8 1e-8 --dataset fashion_mnist --lrBias 0.025 0.05 0.1 "
                  "--batchSize 64 --test_batchSize 512 --epochs 1 --learnAlpha 0")


def start_at(value):
    """``initHidden`` filling every state with ``value`` instead of 1."""
    ones = Network_conv.Network_conv.initHidden

    def init(self, batch):
        return [s.fill_(value) for s in ones(self, batch)]
    return init


def one_run(value, seed, a, out):
    original = Network_conv.Network_conv.initHidden
    if value != 1.0:
        Network_conv.Network_conv.initHidden = start_at(value)
    try:
        argv = SEED_CONV_LINE.split() + ["--seed", str(seed), "--trainSubset", str(a.trainSubset),
                                         "--testSubset", str(a.testSubset), "--outDir", out,
                                         "--dataDir", a.dataDir]
        assert main.main(argv) == 0
    finally:
        Network_conv.Network_conv.initHidden = original
    (date,) = os.listdir(os.path.join(out, "DATA-0-conv-fashion_mnist"))
    runs = sorted(os.listdir(os.path.join(out, "DATA-0-conv-fashion_mnist", date)), key=lambda n: n)
    run = [r for r in runs if r.startswith("S-")][-1]
    return pd.read_csv(os.path.join(out, "DATA-0-conv-fashion_mnist", date, run, "results.csv")).iloc[-1]


def main_():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trainSubset", type=int, default=4000)
    p.add_argument("--testSubset", type=int, default=2000)
    p.add_argument("--dataDir", default="./data")
    a = p.parse_args()
    table = {}
    for seed in a.seeds:
        for value in (1.0, 0.5):
            with tempfile.TemporaryDirectory() as out:
                row = one_run(value, seed, a, out)
            table[(value, seed)] = (row["test_error"], row["train_error"])
            print(f"start {value}: seed {seed}: test error {row['test_error']:.2f} %, train error "
                  f"{row['train_error']:.2f} %", flush=True)
    for value in (1.0, 0.5):
        tests = [table[(value, s)][0] for s in a.seeds]
        spread = statistics.stdev(tests) if len(tests) > 1 else float("nan")
        print(f"start {value}: test error {statistics.mean(tests):.2f} +/- {spread:.2f} % over seeds {a.seeds}")


if __name__ == "__main__":
    main_()
