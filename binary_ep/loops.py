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
    sample) and ``flips`` (per layer)."""
    device = next(net.parameters()).device
    net.set_epoch(epoch)
    n_seen, n_wrong, loss_sum = 0, 0, 0.0
    flips = torch.zeros(len(net.layer_names), dtype=torch.float64, device=device)
    bar = _progress(loader, f"epoch {epoch} train", len(loader))
    with torch.no_grad():
        for batch, (x, labels) in enumerate(bar, 1):
            x = prepare(net, x.to(device))
            labels = labels.to(device)
            s_free = estimator.compute_gradient(net, x, net.target(labels))
            out = net.output(s_free)
            problem = net.check_finite(s_free)
            if problem is None:
                flips += torch.stack(net.updateWeights()).to(torch.float64)
                problem = net.check_finite(s_free)
            if problem is not None:
                raise Diverged(f"{problem} at epoch {epoch}, batch {batch}")
            n_seen += labels.numel()
            n_wrong += int((out.argmax(1) != labels).sum())
            loss_sum += float(0.5 * ((out - one_hot(labels)) ** 2).sum())
            bar.set_postfix(error=f"{100 * n_wrong / n_seen:.2f}%", loss=f"{loss_sum / n_seen:.4f}", refresh=False)
    return {"train_error": 100.0 * n_wrong / max(n_seen, 1), "train_loss": loss_sum / max(n_seen, 1),
            "flips": flips.tolist()}


def test_epoch(net, loader, epoch, prepare):
    """Free phase only over ``loader``.  Returns ``test_error`` (%) and ``test_loss`` (per sample)."""
    device = next(net.parameters()).device
    n_seen, n_wrong, loss_sum = 0, 0, 0.0
    bar = _progress(loader, f"epoch {epoch} test", len(loader))
    with torch.no_grad():
        for x, labels in bar:
            x = prepare(net, x.to(device))
            labels = labels.to(device)
            (free,) = net.phases(x)
            out = net.output(free.states)
            n_seen += labels.numel()
            n_wrong += int((out.argmax(1) != labels).sum())
            loss_sum += float(0.5 * ((out - one_hot(labels)) ** 2).sum())
    return {"test_error": 100.0 * n_wrong / max(n_seen, 1), "test_loss": loss_sum / max(n_seen, 1)}


