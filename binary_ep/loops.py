"""The training and test loops of one epoch, with tqdm progress over the batches.

Both take ``prepare(net, x)``, which turns a loader's batch of images (B, C, H, W) into the
network's input layout (the architecture's ``Tools`` module supplies it).  In a data-parallel
run (``distributed.current()``) a batch is this rank's share of the global batch; the gradients,
the scores, the divergence checks and the stop requests are added up over the ranks (without a
process group those sums cost nothing).
"""

import os

import torch
from tqdm import tqdm

from binary_ep import distributed, signals
from binary_ep.activations import class_scores, first_neuron_scores, one_hot
from binary_ep.activity import ActivityLog


class Diverged(Exception):
    """A NaN/infinity (or a non-positive alpha) appeared during training."""


def quiet():
    """tqdm's ``disable`` for progress bars: True with ``EP_NO_PROGRESS=1`` and on every rank but
    0, else None: bars only when stderr is a terminal (a log file gets no carriage-return lines)."""
    return True if os.environ.get("EP_NO_PROGRESS") == "1" or distributed.current().rank else None


def _progress(iterable, desc, total):
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, mininterval=0.2,
                disable=quiet())


def train_epoch(net, loader, epoch, estimator, prepare):
    """One pass over ``loader``: ``estimator.compute_gradient`` (free phase, nudged phase,
    gradient), ``updateWeights``.  Returns a dict with ``train_error`` (%), ``train_loss`` (per
    sample), ``flips`` (per layer) and, for binary neurons, ``train_error_single`` (%, the
    first output neuron of each class alone) and the activity of the training phases
    (``ActivityLog.columns``: this process's, summed on the device, read once at the end).

    The EP estimate divides by the global batch (``loader.global_sizes``, when the loader yields
    shares of global batches); the ranks' gradients are then added up (``Replicas.combine``).
    The error, the loss, the divergence checks and the stop requests of a batch stay on the
    device, are summed over the ranks and read together, once per batch (a GPU waits for the
    host once per batch, not once per quantity)."""
    net.set_epoch(epoch)
    if hasattr(loader, "set_epoch"):  # seeded per-sample augmentation (CIFAR-10)
        loader.set_epoch(epoch)
    flips = torch.zeros(len(net.layer_names), dtype=torch.float64, device=next(net.parameters()).device)
    log = net.activity_log = ActivityLog() if net.neurons.binary else None
    try:
        n_seen, totals = _train_batches(net, loader, epoch, estimator, prepare, flips)
    finally:
        net.activity_log = None
    out = {**_rates("train", totals, n_seen), "flips": flips.tolist()}
    return out if log is None else {**out, **log.columns(net.layer_names)}


def _train_batches(net, loader, epoch, estimator, prepare, flips):
    """``train_epoch``'s pass over the batches: returns (samples seen, summed scores)."""
    device = next(net.parameters()).device
    replicas = distributed.current()
    sizes = getattr(loader, "global_sizes", None)
    n_seen, totals = 0, None
    bar = _progress(loader, f"epoch {epoch} train", len(loader))
    with torch.no_grad():
        for number, (x, labels) in enumerate(bar, 1):
            signals.check()  # one process: a signal an exception callback dropped stops here
            x = prepare(net, x.to(device))
            labels = labels.to(device)
            total = labels.numel() if sizes is None else sizes[number - 1]
            s_free = estimator.compute_gradient(net, x, net.target(labels), batch=total)
            n = len(s_free)
            # this rank's failed state checks, scores and stop requests, summed over the ranks in
            # the message of the gradients; then the checks of the step's biases and alpha
            summed = Readback(states=~net.health(s_free)[:n], scores=_scores(net, s_free, labels),
                              stop=replicas.stop_flags(device))
            shared = replicas.combine(net, total, summed.tensor)
            flips += torch.stack(net.updateWeights()).to(torch.float64)
            after = Readback(shared=shared, params=~net.health(s_free)[n:]).read()  # one read
            read = summed.unpack(after["shared"])
            replicas.stop_if_asked(read["stop"], f"training batch {number} of epoch {epoch}")
            problem = net.problem([v == 0 for v in read["states"] + after["params"]], n)
            if problem is not None:
                raise Diverged(f"{problem} at epoch {epoch}, batch {number}")
            n_seen += total
            totals = read["scores"] if totals is None else [t + v for t, v in zip(totals, read["scores"])]
            bar.set_postfix(error=f"{100 * totals[0] / n_seen:.2f}%", loss=f"{totals[1] / n_seen:.4f}",
                            refresh=False)
    return n_seen, totals


class Readback:
    """Named vectors of the device as one float64 tensor (one message between ranks, one read
    by the host), and taken apart again by name: ``Readback(a=..., b=...)``, ``.tensor``,
    ``.read()`` / ``.unpack(values)`` -> ``{"a": [floats], "b": [floats]}``."""

    def __init__(self, **parts):
        self.names = list(parts)
        flat = [v.reshape(-1).to(torch.float64) for v in parts.values()]
        self.sizes = [v.numel() for v in flat]
        self.tensor = torch.cat(flat)

    def read(self):
        """The values, read by the host once."""
        return self.unpack(self.tensor.tolist())

    def unpack(self, values):
        """``values`` (floats, the packed order) by name."""
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name], start = list(values[start:start + size]), start + size
        return out


def _scores(net, s, labels):
    """The scores of a batch as a float64 tensor on the device: the number of wrong predictions
    of the population readout (``class_scores``), the summed loss ``||s[0] - y||^2 / 2`` and,
    for binary neurons, the wrong predictions of the first output neuron of each class."""
    out, expand = net.output(s), net.expand_output
    parts = [(class_scores(out, expand).argmax(1) != labels).sum(),
             0.5 * ((out - one_hot(labels, expand)) ** 2).sum()]
    if net.neurons.binary:
        parts.append((first_neuron_scores(out, expand).argmax(1) != labels).sum())
    return torch.stack([p.to(torch.float64) for p in parts])


def _rates(phase, totals, n_seen):
    """``{"<phase>_error": %, "<phase>_loss": per sample[, "<phase>_error_single": %]}`` of the
    summed ``_scores`` ``totals`` over ``n_seen`` samples."""
    totals, n = totals or [0.0, 0.0], max(n_seen, 1)
    out = {f"{phase}_error": 100.0 * totals[0] / n, f"{phase}_loss": totals[1] / n}
    if len(totals) > 2:
        out[f"{phase}_error_single"] = 100.0 * totals[2] / n
    return out


def test_epoch(net, loader, epoch, prepare):
    """Free phase only over ``loader``.  Returns ``test_error`` (%), ``test_loss`` (per sample)
    and, for binary neurons, ``test_error_single`` (summed on the device, and over the ranks'
    shares of the test set, read once at the end)."""
    device = next(net.parameters()).device
    replicas = distributed.current()
    n_seen = 0
    totals = torch.zeros(3 if net.neurons.binary else 2, dtype=torch.float64, device=device)
    bar = _progress(loader, f"epoch {epoch} test", len(loader))
    with torch.no_grad():
        for number, (x, labels) in enumerate(bar, 1):
            signals.check()
            x = prepare(net, x.to(device))
            labels = labels.to(device)
            (free,) = net.phases(x)
            totals += _scores(net, free.states, labels)
            n_seen += labels.numel()
            replicas.stop_point(device, f"test batch {number} of epoch {epoch}")
    *totals, n_seen = replicas.sum_(torch.cat([totals, totals.new_tensor([n_seen])])).tolist()
    return _rates("test", totals, n_seen)
