"""The training and test loops of one epoch, with tqdm progress over the batches.

Both take ``prepare(net, x)``, which turns a loader's batch of images (B, C, H, W) into the
network's input layout (the architecture's ``Tools`` module supplies it).
"""

import os
import sys

import torch
from tqdm import tqdm

from binary_ep.activations import one_hot


class Diverged(Exception):
    """A NaN/infinity (or a non-positive alpha) appeared during training."""


def _progress(iterable, desc, total):
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                mininterval=0.2 if interactive else 10.0, disable=os.environ.get("EP_NO_PROGRESS") == "1")


def train_epoch(net, loader, epoch, estimator, prepare):
    """One pass over ``loader``: ``estimator.compute_gradient`` (free phase, nudged phase,
    gradient), ``updateWeights``.  Returns a dict with ``train_error`` (%), ``train_loss`` (per
    sample) and ``flips`` (per layer).

    The error, the loss and the divergence checks of a batch stay on the device and are read
    together, once per batch (a GPU waits for the host once per batch, not once per quantity)."""
    device = next(net.parameters()).device
    net.set_epoch(epoch)
    if hasattr(loader, "set_epoch"):  # seeded per-sample augmentation (CIFAR-10)
        loader.set_epoch(epoch)
    n_seen, n_wrong, loss_sum = 0, 0, 0.0
    flips = torch.zeros(len(net.layer_names), dtype=torch.float64, device=device)
    bar = _progress(loader, f"epoch {epoch} train", len(loader))
    with torch.no_grad():
        for batch, (x, labels) in enumerate(bar, 1):
            x = prepare(net, x.to(device))
            labels = labels.to(device)
            s_free = estimator.compute_gradient(net, x, net.target(labels))
            out = net.output(s_free)
            flips += torch.stack(net.updateWeights()).to(torch.float64)
            wrong, loss = _scores(out, labels)
            health = net.health(s_free)
            read = torch.cat([health.to(torch.float64), torch.stack([wrong, loss])]).tolist()  # one read
            problem = net.problem([bool(v) for v in read[:-2]], len(s_free))
            if problem is not None:
                raise Diverged(f"{problem} at epoch {epoch}, batch {batch}")
            n_seen += labels.numel()
            n_wrong += int(read[-2])
            loss_sum += read[-1]
            bar.set_postfix(error=f"{100 * n_wrong / n_seen:.2f}%", loss=f"{loss_sum / n_seen:.4f}", refresh=False)
    return {"train_error": 100.0 * n_wrong / max(n_seen, 1), "train_loss": loss_sum / max(n_seen, 1),
            "flips": flips.tolist()}


def _scores(out, labels):
    """(number of wrong predictions, summed loss ``||out - y||^2 / 2``) of a batch, as float64
    tensors on the device; ``out`` is (B, 10)."""
    wrong = (out.argmax(1) != labels).sum().to(torch.float64)
    loss = (0.5 * ((out - one_hot(labels)) ** 2).sum()).to(torch.float64)
    return wrong, loss


def test_epoch(net, loader, epoch, prepare):
    """Free phase only over ``loader``.  Returns ``test_error`` (%) and ``test_loss`` (per sample)
    (summed on the device, read once at the end)."""
    device = next(net.parameters()).device
    n_seen, totals = 0, torch.zeros(2, dtype=torch.float64, device=device)
    bar = _progress(loader, f"epoch {epoch} test", len(loader))
    with torch.no_grad():
        for x, labels in bar:
            x = prepare(net, x.to(device))
            labels = labels.to(device)
            (free,) = net.phases(x)
            totals += torch.stack(_scores(net.output(free.states), labels))
            n_seen += labels.numel()
    n_wrong, loss_sum = totals.tolist()
    return {"test_error": 100.0 * n_wrong / max(n_seen, 1), "test_loss": loss_sum / max(n_seen, 1)}
