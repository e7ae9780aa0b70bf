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
from binary_ep.activations import one_hot


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
    sample) and ``flips`` (per layer).

    The EP estimate divides by the global batch (``loader.global_sizes``, when the loader yields
    shares of global batches); the ranks' gradients are then added up (``Replicas.combine``).
    The error, the loss, the divergence checks and the stop requests of a batch stay on the
    device, are summed over the ranks and read together, once per batch (a GPU waits for the
    host once per batch, not once per quantity)."""
    device = next(net.parameters()).device
    replicas = distributed.current()
    sizes = getattr(loader, "global_sizes", None)
    net.set_epoch(epoch)
    if hasattr(loader, "set_epoch"):  # seeded per-sample augmentation (CIFAR-10)
        loader.set_epoch(epoch)
    n_seen, n_wrong, loss_sum = 0, 0, 0.0
    flips = torch.zeros(len(net.layer_names), dtype=torch.float64, device=device)
    bar = _progress(loader, f"epoch {epoch} train", len(loader))
    with torch.no_grad():
        for batch, (x, labels) in enumerate(bar, 1):
            signals.check()  # one process: a signal an exception callback dropped stops here
            x = prepare(net, x.to(device))
            labels = labels.to(device)
            total = labels.numel() if sizes is None else sizes[batch - 1]
            s_free = estimator.compute_gradient(net, x, net.target(labels), batch=total)
            n = len(s_free)
            wrong, loss = _scores(net.output(s_free), labels)
            # the failed checks of this rank's states, its scores and stop requests: summed over
            # the ranks in the same message as the gradients
            mine = torch.cat([(~net.health(s_free)[:n]).to(torch.float64), torch.stack([wrong, loss]),
                              replicas.stop_flags(device)])
            shared = replicas.combine(net, total, mine)
            flips += torch.stack(net.updateWeights()).to(torch.float64)
            # the checks of the biases and alpha after the step (the same on every rank)
            read = torch.cat([shared, (~net.health(s_free)[n:]).to(torch.float64)]).tolist()  # one read
            replicas.stop_if_asked(read[n + 2:n + 4], f"training batch {batch} of epoch {epoch}")
            problem = net.problem([v == 0 for v in read[:n] + read[n + 4:]], n)
            if problem is not None:
                raise Diverged(f"{problem} at epoch {epoch}, batch {batch}")
            n_seen += total
            n_wrong += int(read[n])
            loss_sum += read[n + 1]
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
    (summed on the device, and over the ranks' shares of the test set, read once at the end)."""
    device = next(net.parameters()).device
    replicas = distributed.current()
    n_seen, totals = 0, torch.zeros(2, dtype=torch.float64, device=device)
    bar = _progress(loader, f"epoch {epoch} test", len(loader))
    with torch.no_grad():
        for batch, (x, labels) in enumerate(bar, 1):
            signals.check()
            x = prepare(net, x.to(device))
            labels = labels.to(device)
            (free,) = net.phases(x)
            totals += torch.stack(_scores(net.output(free.states), labels))
            n_seen += labels.numel()
            replicas.stop_point(device, f"test batch {batch} of epoch {epoch}")
    n_wrong, loss_sum, n_seen = replicas.sum_(torch.cat([totals, totals.new_tensor([n_seen])])).tolist()
    return {"test_error": 100.0 * n_wrong / max(n_seen, 1), "test_loss": loss_sum / max(n_seen, 1)}
