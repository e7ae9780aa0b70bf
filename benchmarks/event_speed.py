"""Event-driven against dense relaxation of binary neurons (``EP_EVENT_DRIVEN=1`` / ``0``): the
time of the paper's Section 4 lines on this machine, with real Fashion-MNIST images.

    python benchmarks/event_speed.py fc1h [--repeats 5]   # seconds per epoch, 4,000 + 1,000 images
    python benchmarks/event_speed.py fc2h [--repeats 5]   # seconds per training batch of 64
    python benchmarks/event_speed.py conv [--repeats 3]   # seconds per training batch of 64

``fc1h`` runs ``main.py`` (2 epochs, train + test each) once per mode and repeat, the modes
alternating; it reports every epoch's ``epoch_seconds`` and the median per mode.  ``fc2h`` and
``conv`` build the network once and time training batches (free phase, nudged phase, gradient,
flip update) in turn, one event-driven then one dense, after ``--warmup`` batches of each (a
random network's first batches relax longer and flip more: they are printed, not counted);
they report the median per mode, the relaxation's part of the batch and the activity the
counted batches recorded (``results.csv``'s columns).  Reads Fashion-MNIST from ``--dataDir`` or Debian's
``/usr/share/datasets/fashion-mnist``.  Other work on the machine slows a run: repeat and take
the quietest.
"""

import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as main.py does, before torch is imported
import pandas as pd  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main as ep_main  # noqa: E402
from binary_ep.activity import ActivityLog  # noqa: E402
from binary_ep.datasets import load_data  # noqa: E402
from binary_ep.estimators import make_estimator  # noqa: E402

# the paper's Section 4 lines (its authors' repository: lines 13, 15 and 17), on the CPU
LINES = {
    "fc1h": "--archi fc --layersList 784 8192 100 --expand_output 10 --T 20 --Kmax 10 --beta 2 "
            "--random_beta 1 --gamma 2e-6 2e-6 --gradThreshold 2.5e-7 2e-7 --lrBias 1e-7 1e-7",
    "fc2h": "--archi fc --layersList 784 8192 8192 6000 --expand_output 600 --T 30 --Kmax 10 --beta 2 "
            "--random_beta 0 --gamma 1e-6 1e-6 1e-6 --gradThreshold 2e-8 1e-8 5e-8 --lrBias 1e-6 1e-6 1e-6",
    "conv": "--archi conv --layersList 700 --convList 512 256 1 --expand_output 70 --padding 1 --kernelSize 5 "
            "--Fpool 3 --T 100 --Kmax 50 --beta 1 --random_beta 1 --classi_gamma 5e-8 --conv_gamma 5e-8 5e-8 "
            "--classi_threshold 8e-8 --conv_threshold 8e-8 2e-7 --lrBias 2e-6 5e-6 1e-5",
}
COMMON = ("--device -1 --dataset fashion_mnist --optim ep --binary_settings bin_W_N --activationFun heaviside "
          "--gamma_neur 0.5 --rho_threshold 0.5 --learnAlpha 0 --batchSize 64 --test_batchSize 512")


def argv(line, *extra):
    return (COMMON + " " + LINES[line]).split() + [str(e) for e in extra]


def epochs(a):
    """fc-1h: ``main.py`` for 2 epochs per mode and repeat; every epoch's seconds."""
    out = a.out or tempfile.mkdtemp(prefix="event_speed_")
    seconds = {"1": [], "0": []}
    for r in range(a.repeats):
        for mode in ("1", "0"):
            folder = os.path.join(out, f"r{r}-{mode}")
            cmd = [sys.executable, os.path.join(ROOT, "main.py")] + argv(
                "fc1h", "--trainSubset", 4000, "--testSubset", 1000, "--epochs", 2, "--seed", r,
                "--outDir", folder, *(["--dataDir", a.dataDir] if a.dataDir else []))
            env = dict(os.environ, EP_NO_PROGRESS="1", EP_EVENT_DRIVEN=mode)
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            (csv,) = glob.glob(os.path.join(folder, "DATA-0-fc-fashion_mnist", "*", "S-1", "results.csv"))
            df = pd.read_csv(csv, index_col="epoch")
            seconds[mode] += list(df["epoch_seconds"])
            print(f"repeat {r} EP_EVENT_DRIVEN={mode}: seconds per epoch "
                  + " / ".join(f"{s:.2f}" for s in df["epoch_seconds"]), flush=True)
    for mode, name in (("1", "event-driven"), ("0", "dense")):
        print(f"{name}: median {statistics.median(seconds[mode]):.2f} s per epoch (train 4,000 + test 1,000), "
              f"min {min(seconds[mode]):.2f}, max {max(seconds[mode]):.2f}")


def batches(a):
    """fc-2h or conv: training batches of 64, the two modes in turn on one network."""
    _, args, _ = ep_main.parse(argv(a.line, "--trainSubset", 64 * 2 * (a.repeats + a.warmup), "--testSubset", 64,
                                    "--seed", 0, "--outDir", tempfile.gettempdir(),
                                    *(["--dataDir", a.dataDir] if a.dataDir else [])))
    torch.manual_seed(0)
    train, _ = load_data(args, torch.Generator().manual_seed(0))
    tools = ep_main.architecture(args.archi)[1]
    net = ep_main.build_network(args)
    estimator = make_estimator(args, torch.Generator().manual_seed(1))
    times, phases, logs = {"1": [], "0": []}, {"1": [], "0": []}, {"1": ActivityLog(), "0": ActivityLog()}
    with torch.no_grad():
        for i, (x, labels) in enumerate(train):
            mode = "1" if i % 2 == 0 else "0"
            os.environ["EP_EVENT_DRIVEN"] = mode
            x, target = tools.prepare_images(net, x), net.target(labels)
            counted = i >= 2 * a.warmup
            net.activity_log = logs[mode] if counted else None
            start = time.perf_counter()
            free, *nudged = net.phases(x, target, (estimator.beta,))
            relaxed = time.perf_counter()
            net.computeGradient(x, nudged[0], free, estimator.beta)
            net.updateWeights()
            end = time.perf_counter()
            if counted:
                times[mode].append(end - start)
                phases[mode].append(relaxed - start)
            print(f"batch {i} EP_EVENT_DRIVEN={mode}: {end - start:.3f} s (relaxation {relaxed - start:.3f} s)",
                  flush=True)
    net.activity_log = None
    for mode, name in (("1", "event-driven"), ("0", "dense")):
        print(f"{name}: median {statistics.median(times[mode]):.3f} s per training batch of 64 "
              f"(min {min(times[mode]):.3f}, max {max(times[mode]):.3f}); relaxation "
              f"{statistics.median(phases[mode]):.3f} s")
    print(f"dense / event-driven: {statistics.median(times['0']) / statistics.median(times['1']):.1f}x")
    for column, value in logs["1"].columns(net.layer_names).items():
        print(f"  {column}: {value:.3f} %")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("line", choices=sorted(LINES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="fc2h, conv: batches of each mode not counted")
    p.add_argument("--dataDir", help="the folder holding FashionMNIST/ (default: main.py's ./data)")
    p.add_argument("--out", help="fc1h: where the run folders go (default: a temporary folder)")
    a = p.parse_args()
    epochs(a) if a.line == "fc1h" else batches(a)


if __name__ == "__main__":
    main()
