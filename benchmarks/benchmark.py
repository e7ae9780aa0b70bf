"""Training throughput and peak memory of the paper's configurations on synthetic data.

    python benchmarks/benchmark.py [--device -1|0] [--configs fc1h ...] [--repeats 5] [--batches 20]

For each configuration: build the network exactly as ``main.py`` would, then time ``--batches``
training steps (free phase, nudged phase, gradient, flip update) on random inputs, ``--repeats``
times after one warm-up; the table reports the median samples/s (and min/max) and the peak
memory (CUDA: ``max_memory_allocated``; CPU: growth of the process's peak RSS during the runs).
"""

import argparse
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as main.py does, before torch is imported
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main as ep_main  # noqa: E402
from binary_ep.estimators import EP  # noqa: E402
from binary_ep.vocabulary import INPUT_SHAPE  # noqa: E402

# name -> (command-line arguments as in the seed, dataset whose geometry the input takes)
CONFIGS = {
    "fc1h": "--archi fc --layersList 784 4096 10 --T 50 --Kmax 10 --beta 0.3 --gamma 1e-5 1e-4 "
            "--gradThreshold 5e-7 5e-7 --lrBias 0.025 0.05 --batchSize 64 --dataset mnist",
    "fc2h": "--archi fc --layersList 784 4096 4096 10 --T 250 --Kmax 10 --beta 0.3 --gamma 5e-6 2e-5 2e-5 "
            "--gradThreshold 5e-7 5e-7 5e-7 --lrBias 0.025 0.05 0.1 --batchSize 64 --dataset mnist",
    # the seed's conv lines; CIFAR-10 with --padding 2, as --padding 0 shrinks a layer to nothing
    "conv_mnist": "--archi conv --layersList 10 --convList 64 32 1 --padding 0 --kernelSize 5 --Fpool 2 "
                  "--T 150 --Kmax 10 --beta 0.3 --gamma 5e-8 5e-8 5e-8 --gradThreshold 1e-8 1e-8 1e-8 "
                  "--lrBias 0.025 0.05 0.1 --batchSize 64 --dataset mnist",
    "conv_cifar10": "--archi conv --layersList 10 --convList 256 256 128 64 3 --padding 2 --kernelSize 5 "
                    "--Fpool 2 --T 150 --Kmax 10 --beta 0.3 --gamma 2e-7 2e-7 2e-7 2e-7 2e-7 "
                    "--gradThreshold 1e-8 1e-8 1e-8 1e-8 1e-8 --lrBias 0.001 0.002 0.025 0.05 0.1 "
                    "--batchSize 64 --dataset cifar10",
    # the paper's Section 4 (binary neurons), lines 13, 15 and 17 of its repository's commands
    "bwn_fc1h": "--archi fc --binary_settings bin_W_N --layersList 784 8192 100 --expand_output 10 "
                "--activationFun heaviside --T 20 --Kmax 10 --beta 2 --gamma_neur 0.5 --gamma 2e-6 2e-6 "
                "--gradThreshold 2.5e-7 2e-7 --lrBias 1e-7 1e-7 --batchSize 64 --dataset mnist",
    "bwn_fc2h": "--archi fc --binary_settings bin_W_N --layersList 784 8192 8192 6000 --expand_output 600 "
                "--activationFun heaviside --T 30 --Kmax 10 --beta 2 --gamma 1e-6 1e-6 1e-6 "
                "--gradThreshold 2e-8 1e-8 5e-8 --lrBias 1e-6 1e-6 1e-6 --batchSize 64 --dataset mnist",
    "bwn_conv": "--archi conv --binary_settings bin_W_N --layersList 700 --convList 512 256 1 "
                "--expand_output 70 --padding 1 --kernelSize 5 --Fpool 3 --activationFun heaviside "
                "--T 100 --Kmax 50 --beta 1 --classi_gamma 5e-8 --conv_gamma 5e-8 5e-8 "
                "--classi_threshold 8e-8 --conv_threshold 8e-8 2e-7 --lrBias 2e-6 5e-6 1e-5 "
                "--batchSize 64 --dataset mnist",
}


def build(config, device):
    argv = CONFIGS[config].split() + ["--device", "-1", "--seed", "0", "--outDir", "/tmp"]
    _, args, _ = ep_main.parse(argv)
    torch.manual_seed(0)
    net = ep_main.build_network(args, device)
    return net, args


def time_config(config, device, repeats, batches):
    net, args = build(config, device)
    tools = ep_main.architecture(args.archi)[1]
    estimator = EP(args.beta, args.nudging)
    shape = INPUT_SHAPE[args.dataset]
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand((args.batchSize,) + shape, generator=g) for _ in range(4)]
    ys = [torch.randint(0, 10, (args.batchSize,), generator=g) for _ in range(4)]

    def step(i):
        x = tools.prepare_images(net, xs[i % 4].to(device))
        target = net.target(ys[i % 4].to(device))
        estimator.compute_gradient(net, x, target)
        net.updateWeights()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rates = []
    with torch.no_grad():
        for r in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for i in range(batches):
                step(i)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r:  # the first pass is a warm-up
                rates.append(batches * args.batchSize / (time.perf_counter() - start))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return statistics.median(rates), min(rates), max(rates), peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", type=int, default=-1, help="-1 CPU (default), N GPU N")
    p.add_argument("--configs", nargs="+", default=["fc1h"], choices=sorted(CONFIGS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=int, default=20)
    a = p.parse_args()
    device = torch.device("cpu") if a.device < 0 else torch.device("cuda", a.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; median of {a.repeats} runs of {a.batches} batches")
    print(f"{'config':12} {'samples/s (median)':>20} {'min':>10} {'max':>10} {'peak MiB':>10}")
    for c in a.configs:
        med, lo, hi, peak = time_config(c, device, a.repeats, a.batches)
        print(f"{c:12} {med:20.1f} {lo:10.1f} {hi:10.1f} {peak:10.1f}", flush=True)


if __name__ == "__main__":
    main()
