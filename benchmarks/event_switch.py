"""Where an event-driven product of binary neurons stops paying: the switch point of
``binary_ep/events.py`` (``MAX_UNION``), measured on one core (each CPU stream runs on one).

    python benchmarks/event_switch.py [--repeats 30] [--batch 32]

For the counted products of the paper's Section 4 networks (a layer of n_s binary neurons
sending to n_r neurons, a stream's share of 32 samples), it times the dense integer product
(``neurons.count``) and the update of a kept count from the inputs that changed in some sample of
the share (their union U: ``events.Events.product``, finding them included), for changes drawn
at random at several rates, and prints the times and, per shape, the union fraction U / n_s at
which the update becomes slower than the dense product (interpolated between the rates).
Then the same for the convolution of binary maps of the conv line (256 -> 512 channels, 8 x 8,
kernel 5, padding 1: ``events.Events.conv_counts``), sample by sample: the share of a sample's
inputs changed where ``cpu_kernels.conv_delta`` becomes slower than the dense convolution
(``CONV_MAX_CHANGED``).
"""

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch.nn.functional as F  # noqa: E402

from binary_ep import cpu_kernels, events  # noqa: E402
from binary_ep.neurons import count, count_signs  # noqa: E402

# (n_s, n_r): fc-1h's hidden -> output and output -> hidden, fc-2h's, the conv line's classifier
SHAPES = [(8192, 100), (100, 8192), (8192, 8192), (8192, 6000), (6000, 8192), (2048, 700), (700, 2048)]
FRACTIONS = [0.0005, 0.002, 0.005, 0.01, 0.03, 0.1]  # of the share's outputs changed, at random


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(n_s, n_r, batch, repeats, g):
    """(dense seconds, [(union, event seconds, find seconds)]) of one feature-major product."""
    signs = count_signs(torch.randn(n_r, n_s, generator=g))
    rows = signs.t().contiguous()
    alpha = torch.tensor([[0.01]])
    bits = torch.rand(n_s, batch, generator=g) < 0.1
    dense = timed(lambda: count(signs, bits.view(torch.int8), torch.float32).mul_(alpha), repeats)
    first = count(signs, torch.ones(n_s, 1), torch.float32)[:, 0]
    out = []
    for f in FRACTIONS:
        new = bits ^ (torch.rand(n_s, batch, generator=g) < f)
        sent = events.Sent(new, new, bits, 1)
        sent.event = True
        find = timed(lambda: events.Sent(new, new, bits, 1).delta(signs, torch.float32), repeats)
        ev = events.Events(True)
        ev.product("p", sent, rows, first, alpha, signs)  # the kept count, and the changes found
        event = timed(lambda: ev.product("p", sent, rows, first, alpha, signs), repeats)
        out.append((int(sent.union.sum()), event, find))
    return dense, out


def measure_conv(batch, repeats, g, fractions=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5)):
    """(dense seconds, [(changed inputs per sample, update seconds)]) of the conv line's
    convolution of bits, 256 x 8 x 8 -> 512 x 6 x 6, a share of ``batch`` samples."""
    layout = torch.channels_last
    w = torch.sign(torch.randn(512, 256, 5, 5, generator=g)).contiguous(memory_format=layout)
    flipped = cpu_kernels.flipped_weight(w)
    bits = (torch.rand(batch, 256, 8, 8, generator=g) < 0.1).float().contiguous(memory_format=layout)
    dense = timed(lambda: F.conv2d(bits, w, padding=1), repeats)
    out = []
    for f in fractions:
        new = (bits != (torch.rand(bits.shape, generator=g) < f).float()).float().contiguous(memory_format=layout)
        acc = F.conv2d(bits, w, padding=1).contiguous(memory_format=layout)

        def update():
            prev = bits.clone(memory_format=layout)
            cpu_kernels.conv_delta(new, prev, flipped, acc, 1, 1.0)
        out.append((int((new != bits).sum()) // batch, timed(update, repeats)))
    return dense, out


def crossover(n_s, dense, points):
    """The union fraction where the update's time reaches ``dense`` (linear between points)."""
    previous = (0.0, 0.0)
    for u, e, fd in points:
        if e + fd >= dense:
            (u0, t0), t1 = previous, e + fd
            return (u0 + (u - u0) * (dense - t0) / (t1 - t0)) / n_s
        previous = (u, e + fd)
    return 1.0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"one core, a share of {a.batch} samples; events.MAX_UNION = {events.MAX_UNION}")
    print(f"{'n_s -> n_r':>14} {'dense ms':>9}  union: update ms ...  crossover union / n_s")
    for n_s, n_r in SHAPES:
        d, pts = measure(n_s, n_r, a.batch, a.repeats, g)
        cells = "  ".join(f"{u}: {1e3 * (e + fd):.3f}" for u, e, fd in pts)
        print(f"{n_s:>6} -> {n_r:<5} {1e3 * d:9.3f}  {cells}  {crossover(n_s, d, pts):.3f}", flush=True)
    if cpu_kernels.available():
        d, pts = measure_conv(a.batch, max(3, a.repeats // 5), g)
        cells = "  ".join(f"{u}: {1e3 * e:.2f}" for u, e in pts)
        print(f"conv 256x8x8 -> 512x6x6 (events.CONV_MAX_CHANGED = {events.CONV_MAX_CHANGED}): dense "
              f"{1e3 * d:.2f} ms; changed inputs per sample: update ms  {cells}; crossover "
              f"{crossover(256 * 64, d, [(u, e, 0.0) for u, e in pts]):.3f} of the inputs")


if __name__ == "__main__":
    main()
