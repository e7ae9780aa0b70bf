"""The neuron models (DESIGN.md section 10): what a neuron sends to its neighbours and how its
state follows its input.  ``Network_fc`` and ``Network_conv`` take one (``neuron_model``); the
weights, the flip rule, the phases and the estimators are the same for both.

* ``RateNeurons`` (``--binary_settings bin_W``): a neuron sends its state ``s`` in [0, 1], and
  its state is ``rho(a)`` of its input ``a`` (plus the nudge at the output), clamped to [0, 1].
* ``BinaryNeurons`` (``bin_W_N``): the state ``s`` in [0, 1] is a filtered pre-activation (a
  membrane); the neuron sends the bit ``b = H(s - rho_threshold)`` (H(0) = 1); its input is
  masked by ``rho'(s - rho_threshold)`` (1 where ``|s - rho_threshold| <= 0.5``) and the state
  follows it with the low-pass filter ``s <- clamp((1 - gamma_neur) s + gamma_neur a, 0, 1)``.
  Every product of binary inputs is then an integer count (``sign(W) b``) times alpha.
"""

import os
import threading

import torch

from binary_ep.activations import rho
from binary_ep.streams import in_streams


class RateNeurons:
    """Full-precision neurons: send ``s``, update ``s <- clamp(rho(a) + nudge, 0, 1)``."""

    kind = "rate"
    binary = False

    def __init__(self, activation):
        self.activation = activation

    def send(self, s):
        """What a layer of states ``s`` (any shape) sends: the states themselves (not a copy)."""
        return s

    def update(self, s, a, diff=None, beta=0.0):
        """The new states of a layer from its input ``a`` (a fresh tensor, overwritten unless
        autograd records through it), its previous states ``s`` (unused) and, for the output
        layer in a nudged phase, ``diff = y - s_ref``: ``clamp(rho(a) + beta diff, 0, 1)``."""
        a = rho(a, self.activation)
        if diff is None:
            return a
        if torch.is_grad_enabled() and (a.requires_grad or diff.requires_grad):
            return (a + beta * diff).clamp(0, 1)
        return a.add_(diff, alpha=beta).clamp_(0, 1)


class BinaryNeurons:
    """Binary neurons with a filtered membrane: send ``H(s - rho_threshold)``, update
    ``s <- clamp((1 - gamma_neur) s + gamma_neur (rho'(s - rho_threshold) a + nudge), 0, 1)``."""

    kind = "binary"
    binary = True

    def __init__(self, rho_threshold, gamma_neur):
        self.rho_threshold, self.gamma_neur = rho_threshold, gamma_neur
        # states live in [0, 1]: with rho_threshold 0.5, |s - 0.5| <= 0.5 holds for every state
        # (in float32 too), so the mask removes nothing and is skipped
        self.masks = rho_threshold != 0.5

    def send(self, s):
        """The bits of the states ``s`` (any shape): 1.0 where ``s >= rho_threshold``, else 0.0,
        computed as ``min(sign(s - rho_threshold) + 1, 1)`` (the float32 difference is 0 exactly
        where the two are equal and has the sign of the true one; twice as fast as a compare and
        a cast on the CPU)."""
        return (s - self.rho_threshold).sign_().add_(1.0).clamp_(max=1.0)

    def bits(self, s):
        """The bits of ``send`` as a bool tensor: ``s >= rho_threshold`` (the float32 difference
        ``s - rho_threshold`` is >= 0 exactly there)."""
        return torch.ge(s, self.rho_threshold)

    def mask(self, s):
        """``rho'(s - rho_threshold)``: True where ``|s - rho_threshold| <= 0.5``."""
        return (s - self.rho_threshold).abs_() <= 0.5

    def update(self, s, a, diff=None, beta=0.0):
        """The new states of a layer from its input ``a`` (a fresh tensor, overwritten), its
        previous states ``s`` (read) and, for the output layer in a nudged phase, ``diff = y -
        s_ref``: the input masked by ``rho'``, plus ``beta diff``, filtered into the states."""
        if self.masks:
            a.masked_fill_(~self.mask(s), 0.0)
        if diff is not None:
            a.add_(diff, alpha=beta)
        g = self.gamma_neur
        return a.mul_(g).add_(s, alpha=1.0 - g).clamp_(0, 1)


# Integer matrix products (int8 x int8 -> int32) where this torch has them on the CPU: 4x faster
# than float32 for the counts of binary neurons, and exact like them.  A private torch function,
# so looked up, never required; EP_INT_COUNTS=0 turns it off (the same results either way).
_INT_MM = getattr(torch, "_int_mm", None)
INT_COUNTS = _INT_MM is not None  # (on the CPU)


def count_signs(w):
    """The +-1 matrix ``sign(w)`` of a 2-D weight as ``count`` wants it: int8 on a CPU with
    integer products, else in ``w``'s dtype."""
    signs = torch.sign(w)
    if INT_COUNTS and w.device.type == "cpu" and os.environ.get("EP_INT_COUNTS") != "0":
        return signs.to(torch.int8)
    return signs


def count(a, b, dtype=None):
    """``a @ b`` of a +-1 matrix from ``count_signs`` and a matrix of 0/1 bits (either order),
    in the bits' float dtype (``dtype`` when both are int8): integer counts, exact whichever
    product computes them."""
    if a.dtype == torch.int8 or b.dtype == torch.int8:
        if dtype is None:
            dtype = b.dtype if a.dtype == torch.int8 else a.dtype
        return _INT_MM(a.to(torch.int8), b.to(torch.int8)).to(dtype)
    return a @ b


OUTER_BLOCK_ELEMENTS = 1 << 18  # gradient entries per block of ``outer_count`` (in cache)


def outer_count(plus, minus, plus_next, minus_next, scale, out):
    """``out = scale (plus plus_next^T - minus minus_next^T)`` for bit matrices (0/1 floats)
    ``plus``/``minus`` (n, B) and ``plus_next``/``minus_next`` (m, B), ``out`` (n, m): the EP
    gradient of a layer of binary neurons.  The difference is one integer product with 2B
    inputs (``[plus minus] [plus_next -minus_next]^T``: exact), multiplied by ``scale`` once;
    on a CPU block of rows by block, the blocks shared among the CPU streams."""
    a = torch.cat([plus, minus], 1)
    b = torch.cat([plus_next, minus_next.neg()], 1).t()
    if _INT_MM is None or out.device.type != "cpu" or os.environ.get("EP_INT_COUNTS") == "0":
        return torch.mul(a @ b, scale, out=out)
    a, b = a.to(torch.int8), b.to(torch.int8)
    rows = max(1, OUTER_BLOCK_ELEMENTS // max(1, out.shape[1]))
    starts = list(range(0, out.shape[0], rows))
    streams = max(1, min(torch.get_num_threads(), len(starts)))

    def run(stream):
        for r in starts[stream::streams]:
            torch.mul(_INT_MM(a[r:r + rows], b), scale, out=out[r:r + rows])
    if streams > 1:
        in_streams(streams, run)
    else:
        run(0)
    return out


class PerUpdate:
    """A value made from some weights once per weight update and shared by the CPU streams (the
    sign matrices of the counts, their transposes, the counts of all-ones inputs): ``get(weights,
    make)`` returns ``make()``'s value, made again when a weight changed (its version counter,
    which every in-place change moves: flips, a learnt alpha, a load) or the kind of count did
    (``EP_INT_COUNTS``); ``clear`` forgets it (the network moved: ``EPNetwork._apply``)."""

    def __init__(self):
        self._key, self._value, self._lock = None, None, threading.Lock()

    def get(self, weights, make):
        key = tuple((id(w), w._version, w.device) for w in weights) + (os.environ.get("EP_INT_COUNTS"),)
        with self._lock:  # the streams of a batch ask at once: the first makes it
            if key != self._key:
                self._value, self._key = make(), key
            return self._value

    def clear(self):
        with self._lock:
            self._key = self._value = None


def neuron_model(args):
    """The neuron model ``--binary_settings`` names, with its constants from ``args``."""
    if args.binary_settings == "bin_W_N":
        return BinaryNeurons(args.rho_threshold, args.gamma_neur)
    return RateNeurons(args.activationFun)
