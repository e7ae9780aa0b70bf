"""What the fully connected and the convolutional binary-weight EP networks share.

One copy of each piece that ``Network_fc``/``Network_conv`` and ``Tools_fc``/``Tools_conv``
both need:

* ``BinaryFlip``: the thresholded low-pass weight-flip rule (a ``torch.optim.Optimizer``) and the
  scaling factors alpha (initialised XNOR-Net style, optionally learnt);
* ``EPNetwork``: the relaxation loop, the EP training step and ``updateWeights`` on top of the
  architecture-specific ``initHidden``/``stepper``/``computeGradient``;
* ``train_epoch``/``test_epoch``: one pass over the data with tqdm progress;
* run folders, ``Hyperparameters.txt``, ``results.csv`` and ``checkpoint.pt``, all written atomically;
* dataset loading (MNIST, Fashion-MNIST, CIFAR-10 through torchvision; scikit-learn's digits).

Conventions (see DESIGN.md section 3): every per-layer list is ordered from the OUTPUT layer
down; layer names follow that order (``fc0`` feeds the output layer, ``conv0`` is the top
convolution).  Errors the user can fix are raised as ``UserError`` (one sentence) and turned into
a clean exit by ``main.py``.
"""

import datetime
import gzip
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm import tqdm

from choices import ACTIVATIONS, DATASETS, INPUT_SHAPE, N_CLASSES, UserError  # noqa: F401 (shared names)

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)


class Diverged(Exception):
    """A NaN/infinity (or a non-positive alpha) appeared during training."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; ``signum`` tells which.  A ``BaseException`` like
    ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----------------------------------------------------------------------------------------------
# Activation
# ----------------------------------------------------------------------------------------------
def rho(a, name):
    """Activation followed by the clamp of every state to [0, 1].

    Works in place (``a`` must be a fresh tensor the caller owns) unless autograd is recording
    through ``a`` (BPTT), where the out-of-place form keeps the graph valid.
    """
    inplace = not (torch.is_grad_enabled() and a.requires_grad)
    if name == "hardsigm":
        return a.clamp_(0, 1) if inplace else a.clamp(0, 1)
    if name == "sigm":  # logistic of slope 4 centred on 0.5, as in the original code
        return torch.sigmoid_(a.sub_(0.5).mul_(4)) if inplace else torch.sigmoid(4 * (a - 0.5))
    if name == "tanh":  # tanh, then clamped to [0, 1] like every state
        return a.tanh_().clamp_(0, 1) if inplace else torch.tanh(a).clamp(0, 1)
    raise ValueError(f"unknown activation {name!r}")


def nudge(a, s_out, target, beta):
    """Output-layer nudge of the stepper: ``clamp(a + beta * (y - s[0]), 0, 1)``."""
    if torch.is_grad_enabled() and (a.requires_grad or s_out.requires_grad):
        return (a + beta * (target - s_out)).clamp(0, 1)
    return a.add_(target - s_out, alpha=beta).clamp_(0, 1)


# ----------------------------------------------------------------------------------------------
# Binary weights: scaling factors and the flip rule
# ----------------------------------------------------------------------------------------------
def binarize_(weight, per_channel):
    """Turn a default-initialised weight into ``alpha * sign(w)`` in place.

    alpha = mean |w| of the initial weight (per output channel when ``per_channel``), rounded to
    4 decimals as in the original code (XNOR-Net style).  Returns alpha.
    """
    with torch.no_grad():
        w = weight.detach()
        mean_abs = w.abs().flatten(1).mean(1) if per_channel else w.abs().mean().reshape(1)
        alpha = (mean_abs * 1e4).round().clamp_min(1) / 1e4
        sign = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
        w.copy_(sign * alpha.view(alpha_shape(w, per_channel)))
    return alpha


def alpha_shape(w, per_channel):
    return (-1,) + (1,) * (w.dim() - 1) if per_channel else (1,) * w.dim()


def current_alpha(w, per_channel):
    """alpha of a binary weight, read off its first entry (per output channel if asked)."""
    first = w.detach().flatten(1)[:, 0] if per_channel else w.detach().reshape(-1)[:1]
    return first.abs().view(alpha_shape(w, per_channel))


class BinaryFlip(torch.optim.Optimizer):
    """Thresholded low-pass flip rule for weights stored as ``alpha * sign(w)``.

    One param group per layer with keys ``gamma``, ``threshold``, ``lr_alpha`` (0 = fixed alpha),
    ``per_channel`` and ``name``.  ``.grad`` holds the loss gradient estimate (EP writes ``-dW``).
    Per step, with ``m`` the low-pass filtered gradient (state ``filtered_grad``, starts at 0)::

        m <- (1 - gamma) m + gamma * grad
        flip w -> -w  where  w * m > threshold * alpha      (i.e. -sign(w) * dW_filtered > threshold)

    and, with learnt scaling factors, alpha <- alpha - lr_alpha * 0.5 * sum(grad * w) (the EP
    estimate of -dL/dalpha scaled by alpha/2, as the original code did), summed per output
    channel for convolutions.  ``step`` returns the number of flips of each layer (tensors).

    Instead of ``.grad``, a layer's gradient may be given as a product ``scale * a @ b``
    (``set_outer_grad``): ``step`` then forms it block by block, never the whole matrix.  On a
    CPU the rule runs over blocks of rows small enough to stay in cache between its operations
    (one pass through memory instead of five), the blocks shared among single-threaded streams.
    """

    def __init__(self, groups):
        super().__init__(groups, {"lr_alpha": 0.0, "per_channel": False, "name": ""})
        self._scratch = {}
        self._outer = {}  # id(weight) -> (a, b, scale): the gradient is scale * a @ b
        self.learnt_alpha = {}  # group index -> alpha of the last step (learnt alpha only)

    def set_outer_grad(self, w, a, b, scale):
        """The next ``step``'s gradient of ``w`` is ``scale * a @ b`` (``w.grad`` is cleared)."""
        if a.shape[0] != w.shape[0] or b.shape[1:] != w.shape[1:] or a.shape[1] != b.shape[0]:
            raise ValueError(f"gradient factors {tuple(a.shape)} @ {tuple(b.shape)} do not match {tuple(w.shape)}")
        self._outer[id(w)] = (a, b, scale)
        w.grad = None

    def pending_grad(self, w):
        """The gradient the next ``step`` will use for ``w`` (formed in full: for inspection)."""
        if id(w) in self._outer:
            a, b, scale = self._outer[id(w)]
            return torch.mm(a, b).mul_(scale)
        return w.grad

    def _buffers(self, rows, w, stream):
        """Three scratch blocks of ``rows`` rows shaped like ``w``'s, one set per stream."""
        key = (rows, stream) + tuple(w.shape[1:]) + (w.dtype, w.device)
        if key not in self._scratch:
            shape = (rows,) + tuple(w.shape[1:])
            self._scratch[key] = tuple(torch.empty(shape, dtype=w.dtype, device=w.device) for _ in range(3))
        return self._scratch[key]

    @staticmethod
    def _block_rows(w):
        if w.device.type != "cpu":
            return w.shape[0]
        return max(1, min(w.shape[0], CPU_BLOCK_ELEMENTS // max(1, w[0].numel())))

    @torch.no_grad()
    def step(self, closure=None):
        flips = []
        for index, group in enumerate(self.param_groups):
            (w,) = group["params"]
            outer = self._outer.pop(id(w), None)
            if outer is None and w.grad is None:
                raise RuntimeError(f"BinaryFlip.step: layer {group['name']} has no gradient")
            state = self.state[w]
            if "filtered_grad" not in state:
                state["filtered_grad"] = torch.zeros_like(w)
            m = state["filtered_grad"]
            per_channel, lr_alpha = group["per_channel"], group["lr_alpha"]
            alpha = current_alpha(w, per_channel)
            limit = alpha * group["threshold"] if per_channel else float(alpha) * group["threshold"]
            rows = self._block_rows(w)
            starts = list(range(0, w.shape[0], rows))
            streams = 1
            if w.device.type == "cpu" and len(starts) > 1:
                streams = min(torch.get_num_threads(), len(starts))

            def run(stream):
                return self._blocks(w, m, outer, limit, group, rows, starts[stream::streams], stream)
            results = in_streams(streams, run) if streams > 1 else [run(0)]
            flips.append(sum(count for count, _ in results))
            if lr_alpha:  # sum(grad * w) over the layer (per output channel), in row order
                parts = [part for _, part in sorted((p for _, ps in results for p in ps), key=lambda q: q[0])]
                total = torch.cat(parts) if per_channel else sum(parts[1:], parts[0])
                new_alpha = alpha - lr_alpha * 0.5 * total.view(alpha.shape)
                self.learnt_alpha[index] = new_alpha
                torch.sign(w, out=w).mul_(new_alpha)
        return flips

    def _blocks(self, w, m, outer, limit, group, rows, starts, stream):
        """The rule on the blocks of rows beginning at ``starts``: returns the number of flips and,
        with learnt alpha, ``[(start, sum(grad * w) of the block)]`` taken before the flips."""
        product, flip, gbuf = self._buffers(rows, w, stream)
        per_channel, gamma, lr_alpha = group["per_channel"], group["gamma"], group["lr_alpha"]
        count, alpha_parts = 0, []
        for r in starts:
            wb, mb = w[r:r + rows], m[r:r + rows]
            n = wb.shape[0]
            pb, fb = product[:n], flip[:n]
            if outer is None:
                gb = w.grad[r:r + n]
                mb.lerp_(gb, gamma)
            elif not lr_alpha:  # the filter inside the product: m <- (1 - gamma) m + gamma a b
                a, b, scale = outer
                mb.addmm_(a[r:r + n], b, beta=1.0 - gamma, alpha=gamma * scale)
            else:  # the block's gradient itself is needed for alpha's step
                a, b, scale = outer
                gb = torch.addmm(gbuf[:n], a[r:r + n], b, beta=0, alpha=scale, out=gbuf[:n])
                mb.lerp_(gb, gamma)
            if lr_alpha:
                torch.mul(gb, wb, out=pb)
                alpha_parts.append((r, pb.sum(tuple(range(1, w.dim()))) if per_channel else pb.sum()))
            torch.mul(wb, mb, out=pb)
            torch.gt(pb, limit[r:r + n] if per_channel else limit, out=fb)  # 1.0 where w flips
            count = count + fb.sum()
            wb.addcmul_(fb, wb, value=-2.0)
        return count, alpha_parts


CPU_BLOCK_ELEMENTS = 1 << 18  # rows per block of the flip rule on a CPU: 1 MiB per float32 block (measured best)


# ----------------------------------------------------------------------------------------------
# CPU streams: single-threaded workers that relax shares of a batch side by side
# ----------------------------------------------------------------------------------------------
MIN_STREAM_BATCH = 16  # smallest share of a batch worth a CPU stream of its own
_POOL = {}
_POOL_LOCK = threading.Lock()


def stream_pool(n):
    """A pool of ``n`` worker threads, each running PyTorch single-threaded (made once)."""
    with _POOL_LOCK:
        if n not in _POOL:
            main_threads = torch.get_num_threads()
            barrier = threading.Barrier(n)
            pool = ThreadPoolExecutor(n, thread_name_prefix="ep-stream")

            def start(_):
                torch.set_num_threads(1)  # this worker's operations stay on its own core
                barrier.wait()
            list(pool.map(start, range(n)))  # the barrier makes each of the n threads start once
            torch.set_num_threads(main_threads)  # the default for threads started later
            _POOL[n] = pool
        return _POOL[n]


def in_streams(n, task):
    """``[task(0), ..., task(n-1)]``, each in a single-threaded worker with autograd off."""
    def run(i):
        with torch.no_grad():
            return task(i)
    pool = stream_pool(n)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # MKL's thread count is process-wide: one per stream meanwhile
    try:
        return list(pool.map(run, range(n)))
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# The network base class
# ----------------------------------------------------------------------------------------------
class EPNetwork(nn.Module):
    """Binary-weight EP network: the parts that do not depend on the architecture.

    Subclasses define ``initHidden(batch)``, ``input_drive(x)``, ``split_drive(drive, n)``,
    ``stepper(s, drive, target, beta, out)``, ``computeGradient(x, s_plus, s_minus, beta_span,
    outer)``, ``prepare(x)``, ``batch_dim`` if their states are not batch-first, and call
    ``_setup_optimizers`` at the end of ``__init__``.
    """

    def _setup_optimizers(self, args, weights, biases, names, per_channel):
        """Binarise ``weights`` and build the flip optimizer and the bias SGD.

        ``weights``/``biases``/``names``/``per_channel`` are ordered output layer first, like every
        per-layer list of the command line.
        """
        self.args = args
        self.activation = args.activationFun
        self.layer_names = list(names)
        self.n_weights = [w.numel() for w in weights]
        self.learn_alpha = bool(args.learnAlpha)
        groups = []
        for k, (w, name, pc) in enumerate(zip(weights, names, per_channel)):
            binarize_(w, pc)
            groups.append({"params": [w], "gamma": args.gamma[k], "threshold": args.gradThreshold[k],
                           "lr_alpha": args.lrAlpha[k] if self.learn_alpha else 0.0,
                           "base_lr_alpha": args.lrAlpha[k] if self.learn_alpha else 0.0,
                           "per_channel": pc, "name": name})
        self.optW = BinaryFlip(groups)
        self.optB = torch.optim.SGD([{"params": [b], "lr": args.lrBias[k]}
                                     for k, b in enumerate(biases)], lr=args.lrBias[0])

    batch_dim = 0  # the batch dimension of the states and targets (fc: 1, its column layout)

    def split_drive(self, drive, n):
        """``input_drive``'s constants for ``n`` consecutive shares of the batch (subclasses)."""
        raise NotImplementedError

    # -- seed method names ---------------------------------------------------------------------
    def forward(self, s, drive, T, target=None, beta=0.0):
        """Run ``T`` synchronous steps of ``stepper`` from the states ``s`` and return the final
        states (in CPU streams, see ``phases``)."""
        streams = self._streams(s[0].shape[self.batch_dim], s[0].device)
        if streams == 1:
            return self._relax(s, drive, T, target, beta)
        shares = list(zip(*(self._cut(v, streams) for v in s)))
        drives = self.split_drive(drive, streams)
        targets = self._cut(target, streams)
        results = in_streams(streams, lambda n: self._relax(list(shares[n]), drives[n], T, targets[n], beta))
        return [torch.cat(parts, self.batch_dim) for parts in zip(*results)]

    def phases(self, x, target=None, beta=0.0):
        """The relaxation of a batch: the free phase (``T`` steps from ``initHidden``) and, with a
        ``target``, the nudged phase (``Kmax`` steps from the free fixed point with ``beta``; with
        ``--nudging symmetric`` a second one with ``-beta``).  Returns ``(s_free,)``,
        ``(s_free, s_plus)`` or ``(s_free, s_plus, s_minus)``.

        On a CPU with several threads and autograd off, the batch is cut into one share per
        thread and each share runs all its phases in a single-threaded stream, side by side: the
        samples of a batch never interact, so this computes the same states (to float32
        rounding), and the relaxation's small products keep a core far busier this way than
        split across cores."""
        streams = self._streams(x.shape[0], x.device)
        if streams == 1:
            return self._phases(x, target, beta)
        xs = x.tensor_split(streams)
        targets = self._cut(target, streams)
        results = in_streams(streams, lambda n: self._phases(xs[n], targets[n], beta))
        return tuple([torch.cat(parts, self.batch_dim) for parts in zip(*phase)] for phase in zip(*results))

    def _phases(self, x, target, beta):
        drive = self.input_drive(x)
        s_free = self._relax(self.initHidden(x.shape[0]), drive, self.args.T)
        if target is None:
            return (s_free,)
        s_plus = self._relax([v.clone() for v in s_free], drive, self.args.Kmax, target, beta)
        if getattr(self.args, "nudging", "one-sided") != "symmetric":
            return s_free, s_plus
        return s_free, s_plus, self._relax([v.clone() for v in s_free], drive, self.args.Kmax, target, -beta)

    def _cut(self, v, streams):
        if v is None:
            return [None] * streams
        parts = v.tensor_split(streams, self.batch_dim)  # batch-first shares stay dense (channels_last too)
        return list(parts) if self.batch_dim == 0 else [part.contiguous() for part in parts]

    @staticmethod
    def _streams(batch, device):
        if torch.is_grad_enabled() or device.type != "cpu":
            return 1
        return max(1, min(torch.get_num_threads(), batch // MIN_STREAM_BATCH))

    def _relax(self, s, drive, T, target=None, beta=0.0):
        """``T`` steps of ``stepper`` in this thread (the buffers of ``s`` are reused as scratch
        space when autograd is off)."""
        spare = None if torch.is_grad_enabled() else [torch.empty_like(v) for v in s]
        for _ in range(T):
            new = self.stepper(s, drive, target, beta, out=spare)
            if spare is not None:
                spare = s
            s = new
        return s

    def updateWeights(self):
        """Flip/rescale the binary weights and take an SGD step on the biases from ``.grad``.
        Returns the number of flips per layer (tensors)."""
        flips = self.optW.step()
        self.optB.step()
        return flips

    # -- helpers shared by the training/testing loops --------------------------------------------
    def binary_weights(self):
        return [g["params"][0] for g in self.optW.param_groups]

    def biases(self):
        return [g["params"][0] for g in self.optB.param_groups]

    def weight_grads(self):
        """The weight gradients the next ``updateWeights`` will use (see ``ep_step``)."""
        return [self.optW.pending_grad(w) for w in self.binary_weights()]

    def alphas(self):
        """alpha of each layer (mean over channels for per-channel factors), as floats."""
        return [float(current_alpha(g["params"][0], g["per_channel"]).mean())
                for g in self.optW.param_groups]

    def set_epoch(self, epoch):
        """Apply the ``--decayLrAlpha D --epochDecayLrAlpha E`` schedule: lrAlpha / D from epoch E."""
        decay = epoch >= self.args.epochDecayLrAlpha and self.args.decayLrAlpha != 1
        for g in self.optW.param_groups:
            g["lr_alpha"] = g["base_lr_alpha"] / (self.args.decayLrAlpha if decay else 1.0)

    def free_phase(self, x):
        """Free relaxation from ``initHidden``; returns (states, drive)."""
        drive = self.input_drive(x)
        s = self.initHidden(x.shape[0])
        return self.forward(s, drive, self.args.T), drive

    def ep_step(self, x, target, beta):
        """One EP estimate for ``updateWeights``: free phase, nudged phase(s), gradient (in
        ``.grad``, the fc input layer's as factors, see ``computeGradient``).  Returns the
        free-phase states (for error/loss)."""
        s = self.phases(x, target, beta)
        if len(s) == 3:  # symmetric nudging: +beta and -beta
            self.computeGradient(x, s[1], s[2], 2 * beta, outer=True)
        else:
            self.computeGradient(x, s[1], s[0], beta, outer=True)
        return s[0]

    def output(self, s):
        """Output states as (batch, 10)."""
        return s[0]

    def check_finite(self, s):
        """Name the first non-finite quantity (states, biases, alpha) or a non-positive alpha."""
        for k, v in enumerate(s):
            if not bool(torch.isfinite(v).all()):
                return f"a NaN or infinity appeared in the states of layer {k} (0 = output)"
        for i, (g, b) in enumerate(zip(self.optW.param_groups, self.biases())):
            if not bool(torch.isfinite(b).all()):
                return f"a NaN or infinity appeared in the biases of layer {g['name']}"
            a = current_alpha(g["params"][0], g["per_channel"])
            if not bool(torch.isfinite(a).all()):
                return f"a NaN or infinity appeared in alpha of layer {g['name']}"
            learnt = self.optW.learnt_alpha.get(i)
            if not bool((a > 0).all()) or (learnt is not None and not bool((learnt > 0).all())):
                return f"alpha of layer {g['name']} reached zero or below"
        return None


def one_hot(labels):
    return torch.nn.functional.one_hot(labels, N_CLASSES).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Training and testing loops
# ----------------------------------------------------------------------------------------------
def _progress(iterable, desc, total):
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                mininterval=0.2 if interactive else 10.0, disable=os.environ.get("EP_NO_PROGRESS") == "1")


def train_epoch(net, loader, epoch, beta_rng=None, estimator=None):
    """One pass over ``loader``: free phase, nudged phase, update.  Returns a dict with
    ``train_error`` (%), ``train_loss`` (per sample) and ``flips`` (per layer)."""
    args = net.args
    device = next(net.parameters()).device
    net.set_epoch(epoch)
    n_seen, n_wrong, loss_sum = 0, 0, 0.0
    flips = torch.zeros(len(net.layer_names), dtype=torch.float64, device=device)
    bar = _progress(loader, f"epoch {epoch} train", len(loader))
    with torch.no_grad():
        for batch, (x, labels) in enumerate(bar, 1):
            x = net.prepare(x.to(device))
            labels = labels.to(device)
            target = net.target(labels)
            beta = args.beta
            if beta_rng is not None and float(torch.rand(1, generator=beta_rng)) < 0.5:
                beta = -beta
            if estimator is None:
                s_free = net.ep_step(x, target, beta)
            else:
                s_free = estimator(net, x, target, beta)
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


def test_epoch(net, loader, epoch=None):
    """Free phase only over ``loader``.  Returns ``test_error`` (%) and ``test_loss`` (per sample)."""
    device = next(net.parameters()).device
    n_seen, n_wrong, loss_sum = 0, 0, 0.0
    bar = _progress(loader, f"epoch {epoch} test", len(loader))
    with torch.no_grad():
        for x, labels in bar:
            x = net.prepare(x.to(device))
            labels = labels.to(device)
            (s,) = net.phases(x)
            out = net.output(s)
            n_seen += labels.numel()
            n_wrong += int((out.argmax(1) != labels).sum())
            loss_sum += float(0.5 * ((out - one_hot(labels)) ** 2).sum())
    return {"test_error": 100.0 * n_wrong / max(n_seen, 1), "test_loss": loss_sum / max(n_seen, 1)}


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, run folders, hyperparameters, results, checkpoints
# ----------------------------------------------------------------------------------------------
class _Critical:
    """Context in which SIGINT/SIGTERM are held back until the block ends (file writes)."""
    depth = 0
    pending = None

    def __enter__(self):
        _Critical.depth += 1

    def __exit__(self, *exc):
        _Critical.depth -= 1
        if _Critical.depth == 0 and _Critical.pending is not None:
            signum, _Critical.pending = _Critical.pending, None
            if exc[0] is None:
                raise Interrupted(signum)


critical = _Critical


def install_signal_handlers():
    """SIGINT/SIGTERM raise ``Interrupted`` (deferred while files are being written).  Returns the
    previous handlers for ``restore_signal_handlers`` (None outside the main thread, where Python
    cannot set handlers)."""
    def handler(signum, frame):
        if _Critical.depth:
            _Critical.pending = signum
        else:
            raise Interrupted(signum)
    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        return None
    _Critical.pending = None
    return previous


def restore_signal_handlers(previous):
    """Put back what ``install_signal_handlers`` replaced."""
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler)


def ignore_signals():
    """Ignore SIGINT/SIGTERM (while a run that was interrupted cleans up and says how to resume)."""
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing was installed either
        pass


def atomic_write(path, write):
    """Write ``path`` through ``write(tmp_path)`` then rename, so a crash never leaves it truncated."""
    folder = os.path.dirname(os.path.abspath(path))
    with critical():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        try:
            os.close(fd)
            write(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are for everyone to read
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def remove_stale_temporaries(folder):
    """Delete the ``.*.tmp`` files a killed process (SIGKILL, power cut) left in ``folder``."""
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def run_root(out_dir, archi, dataset, date=None):
    date = date or datetime.date.today().isoformat()
    return os.path.join(out_dir, f"DATA-0-{archi}-{dataset}", date)


def createPath(args):
    """Create ``<outDir>/DATA-0-<archi>-<dataset>/<YYYY-MM-DD>/S-<n>`` (n = next free number, taken
    atomically with ``mkdir``), copy ``plotFunctions.py`` into the date folder, return the S folder."""
    date_folder = run_root(args.outDir, args.archi, args.dataset)
    os.makedirs(date_folder, exist_ok=True)
    plot_src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plotFunctions.py")
    plot_dst = os.path.join(date_folder, "plotFunctions.py")
    if not os.path.exists(plot_dst):
        atomic_write(plot_dst, lambda tmp: shutil.copyfile(plot_src, tmp))
    taken = [int(m.group(1)) for m in (re.fullmatch(r"S-(\d+)", d) for d in os.listdir(date_folder)) if m]
    n = max(taken, default=0) + 1
    while True:
        path = os.path.join(date_folder, f"S-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1


def saveHyperparameters(path, args, argv):
    """``Hyperparameters.txt``: the command line and every argument as given (lists in the order
    typed, i.e. output layer first), one ``name: value`` per line."""
    given = getattr(args, "given", vars(args))
    lines = ["# Hyperparameters of this run, as given (per-layer lists: output layer first).",
             "command: python main.py " + " ".join(argv)]
    for key in sorted(given):
        value = given[key]
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        lines.append(f"{key}: {value}")
    text = "\n".join(lines) + "\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(os.path.join(path, "Hyperparameters.txt"), write)


def result_columns(layer_names):
    """Columns of ``results.csv`` (index: ``epoch``, 1-based)."""
    return (["train_error", "test_error", "train_loss", "test_loss"]
            + [f"flips_{n}" for n in layer_names] + [f"fliprate_{n}" for n in layer_names]
            + [f"alpha_{n}" for n in layer_names] + ["epoch_seconds"])


def initDataframe(path, layer_names):
    """An empty results dataframe with the run's columns (or the existing ``results.csv``)."""
    csv = os.path.join(path, "results.csv")
    if os.path.exists(csv):
        # pandas 3 reads floats back exactly by default (and deprecates the option)
        exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
        return pd.read_csv(csv, index_col="epoch", **exact)
    df = pd.DataFrame(columns=result_columns(layer_names), dtype=float)
    df.index.name = "epoch"
    return df


def updateDataframe(path, df, epoch, train, test, net, seconds):
    """Add the row of ``epoch`` and rewrite ``results.csv`` atomically."""
    row = {"train_error": train["train_error"], "test_error": test["test_error"],
           "train_loss": train["train_loss"], "test_loss": test["test_loss"],
           "epoch_seconds": seconds}
    for name, n, size, alpha in zip(net.layer_names, train["flips"], net.n_weights, net.alphas()):
        row[f"flips_{name}"] = n
        row[f"fliprate_{name}"] = 100.0 * n / size
        row[f"alpha_{name}"] = float(f"{alpha:.7g}")  # float32 precision: 0.0629, not 0.06289999932
    df.loc[epoch] = [row[c] for c in df.columns]
    atomic_write(os.path.join(path, "results.csv"), lambda tmp: df.to_csv(tmp, index_label="epoch"))
    return df


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, net, epoch, args, generators):
    """``checkpoint.pt``: weights, biases, alpha (in the weights), filter buffers, RNG states, epoch,
    arguments; written atomically."""
    payload = {"epoch": epoch, "model": net.state_dict(), "optW": net.optW.state_dict(),
               "optB": net.optB.state_dict(), "rng": rng_state(),
               "generators": {k: g.get_state() for k, g in generators.items()},
               "args": dict(vars(args))}
    atomic_write(os.path.join(path, "checkpoint.pt"), lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path, net, generators):
    """Restore what ``save_checkpoint`` wrote; returns the epoch it was taken after."""
    payload = torch.load(os.path.join(path, "checkpoint.pt"), map_location="cpu", weights_only=False)
    net.load_state_dict(payload["model"])
    net.optW.load_state_dict(payload["optW"])
    net.optB.load_state_dict(payload["optB"])
    set_rng_state(payload["rng"])
    for k, g in generators.items():
        g.set_state(payload["generators"][k])
    return payload["epoch"]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
class TensorBatches:
    """Mini-batches of an in-memory tensor data set, shuffled with a seeded generator."""

    def __init__(self, x, y, batch_size, shuffle, generator=None):
        self.x, self.y, self.batch_size, self.shuffle, self.generator = x, y, batch_size, shuffle, generator

    def __len__(self):
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for i in range(0, n, self.batch_size):
            if order is None:
                yield self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]
            else:
                idx = order[i:i + self.batch_size]
                yield self.x[idx], self.y[idx]


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _remove_new_dirs(before, root):
    """Remove the empty folders a failed download created under ``root`` (but not ``root``'s
    parents that existed before)."""
    for dirpath, dirnames, filenames in sorted(os.walk(root), key=lambda t: -len(t[0])):
        if dirpath not in before and not os.listdir(dirpath):
            os.rmdir(dirpath)


def _existing_dirs(root):
    return {d for d, _, _ in os.walk(root)} if os.path.isdir(root) else set()


def _check_data_dir(data_dir):
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--dataDir {data_dir} is a file, not a folder; give a folder for the data sets")
    probe = os.path.abspath(data_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"--dataDir {data_dir} cannot be created: {probe} is a file; give a folder "
                        f"for the data sets")
    if os.path.isdir(data_dir) and not os.access(data_dir, os.R_OK | os.X_OK):
        raise UserError(f"--dataDir {data_dir} cannot be read; fix its permissions or choose another folder")


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fashion_from_debian(raw):
    """Unpack Debian's ``dataset-fashion-mnist`` files into torchvision's raw folder."""
    if all(os.path.exists(os.path.join(raw, f)) for f in MNIST_FILES):
        return
    if not all(os.path.exists(os.path.join(DEBIAN_FASHION_MNIST, f + ".gz")) for f in MNIST_FILES):
        return
    os.makedirs(raw, exist_ok=True)
    for f in MNIST_FILES:
        dst = os.path.join(raw, f)
        if not os.path.exists(dst):
            def write(tmp, src=os.path.join(DEBIAN_FASHION_MNIST, f + ".gz")):
                with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout)
            atomic_write(dst, write)


def _load_mnist_like(dataset, data_dir):
    """Images (N, 1, 28, 28) in [0, 1] and labels of MNIST or Fashion-MNIST, train and test."""
    import torchvision
    cls = torchvision.datasets.MNIST if dataset == "mnist" else torchvision.datasets.FashionMNIST
    raw = os.path.join(data_dir, cls.__name__, "raw")
    if dataset == "fashion_mnist":
        try:
            _fashion_from_debian(raw)
        except OSError:
            pass
    before = _existing_dirs(data_dir)
    parts = []
    for train in (True, False):
        try:
            ds = cls(data_dir, train=train, download=True)
        except PermissionError as e:
            raise UserError(f"the {dataset} data set in {raw} cannot be read or stored ({e.strerror}: "
                            f"{e.filename}); fix the permissions or choose another --dataDir") from None
        except (RuntimeError, OSError) as e:
            _remove_new_dirs(before, data_dir)
            missing = [f for f in MNIST_FILES if not os.path.exists(os.path.join(raw, f))]
            if not missing:
                raise UserError(f"the {dataset} files in {raw} are truncated or corrupted "
                                f"({_first_line(e)}); delete them so they download again, or "
                                f"replace them") from None
            where = (f"is not in {raw}" if len(missing) == len(MNIST_FILES) else
                     f"is incomplete in {raw} (missing {', '.join(missing)})")
            raise UserError(f"the {dataset} data set {where} and could not be downloaded "
                            f"(no network?); put the files {', '.join(MNIST_FILES)} (or their .gz) "
                            f"there") from None
        except Exception as e:  # torchvision asserts on malformed IDX headers
            raise UserError(f"the {dataset} files in {raw} are truncated or corrupted ({type(e).__name__}); "
                            f"delete them so they download again, or replace them") from None
        x, y = ds.data, ds.targets
        if x.dim() != 3 or tuple(x.shape[1:]) != (28, 28) or len(x) != len(y) or len(y) == 0 \
                or int(y.min()) < 0 or int(y.max()) >= N_CLASSES:
            raise UserError(f"the {dataset} files in {raw} are truncated or corrupted (images "
                            f"{tuple(x.shape)}, labels {tuple(y.shape)}); delete them so they "
                            f"download again, or replace them")
        parts.append((x.unsqueeze(1).to(torch.float32).div_(255.0), y.long()))
    return parts


def load_digits_split():
    """scikit-learn's 8x8 digits as (N, 1, 8, 8) in [0, 1]; a fixed split: 1437 train, 360 test."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    x, y = x[order], y[order]
    return [(x[360:], y[360:]), (x[:360], y[:360])]


def cifar10_transforms(train):
    """The seed's CIFAR-10 pipeline: (train) random flip and random 32 crop padded 4 (edge),
    then normalisation with the usual per-channel mean/std."""
    import torchvision.transforms as T
    norm = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    if not train:
        return T.Compose(norm)
    return T.Compose([T.RandomHorizontalFlip(0.5), T.RandomCrop(32, padding=4, padding_mode="edge")] + norm)


CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")


def _load_cifar10(data_dir, train):
    import torchvision
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    before = _existing_dirs(data_dir)
    try:
        return torchvision.datasets.CIFAR10(data_dir, train=train, download=True,
                                            transform=cifar10_transforms(train))
    except Exception as e:
        _remove_new_dirs(before, data_dir)
        if os.path.isdir(folder) and all(os.path.exists(os.path.join(folder, f)) for f in CIFAR10_FILES):
            raise UserError(f"the cifar10 files in {folder} are truncated or corrupted "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); delete them "
                            f"so they download again") from None
        raise UserError(f"the cifar10 data set is not in {folder} and could not be downloaded (no "
                        f"network?); put cifar-10-python.tar.gz in {data_dir} or its files "
                        f"{', '.join(CIFAR10_FILES)} in {folder}") from None


def load_data(args, generator):
    """Train and test loaders for ``args.dataset`` (first ``--trainSubset``/``--testSubset``
    samples when given).  Batches are (x of shape (B, C, H, W), labels)."""
    _check_data_dir(args.dataDir)
    train_n, test_n = args.trainSubset, args.testSubset
    if args.dataset == "cifar10":
        from torch.utils.data import DataLoader, Subset
        loaders = []
        for train, n, bs in ((True, train_n, args.batchSize), (False, test_n, args.test_batchSize)):
            ds = _load_cifar10(args.dataDir, train)
            if n is not None:
                ds = Subset(ds, range(min(n, len(ds))))
            loaders.append(DataLoader(ds, batch_size=bs, shuffle=train, generator=generator if train else None,
                                      num_workers=0))
        return loaders
    if args.dataset == "digits":
        parts = load_digits_split()
    else:
        parts = _load_mnist_like(args.dataset, args.dataDir)
    (xtr, ytr), (xte, yte) = parts
    if train_n is not None:
        xtr, ytr = xtr[:train_n], ytr[:train_n]
    if test_n is not None:
        xte, yte = xte[:test_n], yte[:test_n]
    return (TensorBatches(xtr, ytr, args.batchSize, True, generator),
            TensorBatches(xte, yte, args.test_batchSize, False))


def timer():
    return time.perf_counter()
