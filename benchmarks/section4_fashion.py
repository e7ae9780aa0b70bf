"""The paper's Section 4 fc-1h line (binary neurons, 784-8192-100) on the first 4,000 training
and 1,000 test images of Fashion-MNIST, 3 epochs, for seeds 0, 1 and 2: the class-mean and the
first-neuron test error after each epoch and the seconds per epoch (train + test), as the
reference figures of the original implementation were taken.

    python benchmarks/section4_fashion.py [--seeds 0 1 2] [--epochs 3] [--out DIR]

Reads Fashion-MNIST from ``--dataDir`` or Debian's ``/usr/share/datasets/fashion-mnist``.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = ("--device 0 --dataset mnist --optim ep --archi fc --binary_settings bin_W_N --layersList 784 "
        "8192 100 --expand_output 10 --activationFun heaviside --T 20 --Kmax 10 --beta 2 --random_beta 1 "
        "--gamma_neur 0.5 --gamma 2e-6 2e-6 --gradThreshold 2.5e-7 2e-7 --lrBias 1e-7 1e-7 --batchSize 64 "
        "--test_batchSize 512 --epochs 100 --learnAlpha 0 --rho_threshold 0.5")  # line 13, as printed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--out", help="where the run folders go (default: a temporary folder)")
    a = p.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="section4_")
    rows = []
    for seed in a.seeds:
        argv = LINE.split() + ["--dataset", "fashion_mnist", "--trainSubset", str(a.train), "--testSubset",
                               str(a.test), "--epochs", str(a.epochs), "--seed", str(seed), "--outDir", out]
        env = dict(os.environ, EP_NO_PROGRESS="1")
        subprocess.run([sys.executable, os.path.join(ROOT, "main.py")] + argv, check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (folder,) = [f for f in glob.glob(os.path.join(out, "DATA-0-fc-fashion_mnist", "*", "S-*"))
                     if f"--seed {seed}" in open(os.path.join(f, "Hyperparameters.txt")).read()]
        df = pd.read_csv(os.path.join(folder, "results.csv"), index_col="epoch")
        rows.append(df.assign(seed=seed))
        print(f"seed {seed}: test error " + " / ".join(f"{v:.1f}" for v in df["test_error"])
              + f" %, first neuron {df['test_error_single'].iloc[-1]:.1f} %, seconds per epoch "
              + " / ".join(f"{v:.1f}" for v in df["epoch_seconds"]), flush=True)
    last = pd.concat(rows).loc[a.epochs]
    print(f"epoch {a.epochs}: mean test error {last['test_error'].mean():.2f} %, mean first-neuron "
          f"error {last['test_error_single'].mean():.2f} %, median seconds per epoch "
          f"{pd.concat(rows)['epoch_seconds'].median():.2f}; runs in {out}")


if __name__ == "__main__":
    main()
