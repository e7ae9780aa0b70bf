"""Event-driven relaxation of binary neurons (README "Binary neurons"): each product of a layer's
bits is kept from one step to the next and brought up to date from the bits that changed.

Every product of bits is an integer count (``neurons.count``), exact in float32 in any order of
summation.  So a count brought up to date (the rows of ``sign(W)`` of the inputs that turned on
added, those of the inputs that turned off subtracted) holds the very values the dense product
gives, and the step multiplies it by alpha and adds the bias with the same operations as the
dense step: the states are the same bit for bit.  Every state starts at 1, so a phase from
``initHidden`` starts from the counts of all-ones inputs, the same for every sample and made
once per weight update (the drive's ``first`` counts): its first step reads no input at all.

Where many of a layer's outputs changed (the first steps), its products are computed densely;
the fractions are this machine's crossovers (``benchmarks/event_switch.py``).  On CUDA, finding the
changes would make the device wait for the host at every step: there (and with
``EP_EVENT_DRIVEN=0``) every product is dense.  Either way the relaxation records its activity
(``Activity``): the same numbers from both paths, accumulated as tensors (no host read).

One ``Events`` per stream and batch lives in the batch's drive (``input_drive``/``split_drive``),
across its free and nudged phases.
"""

import os

import torch

from binary_ep import cpu_kernels
from binary_ep.activity import Activity
from binary_ep.neurons import INT_COUNTS, count

# A layer's products are brought up to date from its changes where at most this fraction of its
# outputs changed in some sample of the stream's share of the batch (the union: the rows of the
# sign matrices an update multiplies), else computed densely: where the update of the paper's
# largest products (8192 x 8192, 8192 x 6000) became slower than the dense integer product on
# one core of this machine (benchmarks/event_switch.py).  A layer whose outputs did not change
# computes nothing.
MAX_UNION = 0.2
# A convolution reading the layer is updated sample by sample where at most this fraction of
# the sample's input changed (``cpu_kernels.conv_delta``), else recomputed: where the update of
# the conv line's convolution (256 -> 512 channels, 8 x 8, kernel 5) became slower than the
# dense one on one core of this machine (benchmarks/event_switch.py: 24 %).
CONV_MAX_CHANGED = 0.25


def event_driven(device):
    """Whether binary neurons relax event-driven on ``device``: on the CPU unless the environment
    says ``EP_EVENT_DRIVEN=0`` (never on CUDA, where finding the changes costs a host read)."""
    return device.type == "cpu" and os.environ.get("EP_EVENT_DRIVEN") != "0"


def flat_view(bits, batch_dim):
    """A layer's bits as a 2-D view: (n, B) feature-major (``batch_dim`` 1), else (B, n) with a
    convolution state's (B, C, H, W) channels-last values in their (h, w, c) memory order."""
    if bits.dim() == 4:
        return bits.permute(0, 2, 3, 1).reshape(bits.shape[0], -1)
    return bits


def unit_counts(mask, batch_dim):
    """For each output of a flat bool ``mask`` (``flat_view``), in how many samples it is set:
    (n,) integers, as an integer product with ones on a CPU that has them (there a reduction
    over the short batch dimension is several times slower), else a sum."""
    if mask.device.type != "cpu" or not INT_COUNTS or mask.shape[batch_dim] == 0:
        return mask.sum(batch_dim)
    ones = torch.ones((mask.shape[batch_dim], 1) if batch_dim == 1 else (1, mask.shape[0]), dtype=torch.int8)
    counted = count(mask.view(torch.int8), ones, torch.int32) if batch_dim == 1 else \
        count(ones, mask.view(torch.int8), torch.int32)
    return counted.view(-1)


class Sent:
    """What one layer sends at one step of a stream: ``bits`` (bool, the layer's shape), ``flat``
    (``flat_view``), ``prev`` (like ``flat``: what it sent at its previous step), ``changed``
    (``flat != prev``), ``union`` (its outputs that changed in some sample), ``event``: whether
    its products are brought up to date from the changes."""

    __slots__ = ("bits", "flat", "prev", "batch_dim", "changed", "union", "n_changed", "n_active", "event",
                 "_float", "_delta")

    def __init__(self, bits, flat, prev, batch_dim):
        self.bits, self.flat, self.prev, self.batch_dim = bits, flat, prev, batch_dim
        self.changed = flat ^ prev
        per_unit = unit_counts(self.changed, batch_dim)
        self.union, self.n_changed = per_unit > 0, per_unit.sum()
        self.n_active = unit_counts(flat, batch_dim).sum()
        self.event, self._float, self._delta = False, None, None

    @property
    def batch(self):
        return self.flat.shape[self.batch_dim]

    def float(self, dtype):
        """The bits as 0.0/1.0 in ``dtype``, the layer's shape and memory layout (made once)."""
        if self._float is None:
            self._float = self.bits.to(dtype)
        return self._float

    def operand(self, signs, dtype):
        """``flat`` as ``count`` takes it with the sign matrix ``signs``: int8 (a view) beside
        int8 signs, else floats in ``dtype``."""
        return self.flat.view(torch.int8) if signs.dtype == torch.int8 else flat_view(self.float(dtype), self.batch_dim)

    def delta(self, signs, dtype):
        """``(units, change)``: the outputs that changed in some sample (an index tensor, numbered
        as the rows of the sign matrices) and ``flat - prev`` at them, +1/-1/0 (``flat``'s
        layout, int8 beside int8 ``signs``, else ``dtype``), made once."""
        if self._delta is None:
            units = self.union.nonzero().squeeze(1)
            change = self.flat.view(torch.int8).index_select(1 - self.batch_dim, units) \
                - self.prev.view(torch.int8).index_select(1 - self.batch_dim, units)
            self._delta = units, change if signs.dtype == torch.int8 else change.to(dtype)
        return self._delta


class Events:
    """One stream's event state for one batch: what each layer sent last (``prev``: flat bool
    bits; a layer not yet seen sent all ones, the initial states), each product's count of those
    bits (``linear``: (B, n) floats; ``convs``: ``[count, bits as floats]``), and the ``Activity``
    of the relaxation running (``begin``)."""

    def __init__(self, event_driven):
        self.event_driven = event_driven
        self.prev, self.linear, self.convs, self.activity = {}, {}, {}, None

    def fresh(self):
        """An empty ``Events`` of the same kind (for another stream's share)."""
        return Events(self.event_driven)

    def begin(self):
        """Start recording the activity of a relaxation; returns its ``Activity``."""
        self.activity = Activity()
        return self.activity

    def send(self, k, bits, batch_dim, products=True):
        """Layer ``k`` sends ``bits`` (bool): a ``Sent``.  ``products``: products of sign
        matrices read it (``product``), computed from its changes where few changed
        (``MAX_UNION``); else a convolution reads it (``conv_counts`` decides sample by sample)."""
        flat = flat_view(bits, batch_dim)
        prev = self.prev.get(k)
        sent = Sent(bits, flat, torch.ones_like(flat) if prev is None else prev, batch_dim)
        self.prev[k] = flat
        if self.event_driven and products:  # (a host read: the CPU only)
            sent.event = int(sent.union.sum()) <= MAX_UNION * sent.union.numel()
        if self.activity is not None:
            self.activity.add(k, sent)
            if sent.event:
                self.activity.event[k] += sent.batch
        return sent

    def product(self, key, sent, rows, first, dtype, matrix=None):
        """The count of ``sent``'s bits through a sign matrix, in ``dtype``: feature-major
        ``count(matrix, bits)`` (n_r, B) when ``matrix`` (n_r, n_s) is given, else batch-first
        ``count(bits, rows)`` (B, n_r).  ``rows`` (n_s, n_r): row i is what input i adds;
        ``first`` (n_r,): the count of all-ones inputs; ``key`` names the product (its count is
        kept here from step to step).  The result is this object's: read it, do not change it."""
        if not sent.event:
            dense = count(matrix, sent.operand(matrix, dtype), dtype) if matrix is not None else \
                count(sent.operand(rows, dtype), rows, dtype)
            if self.event_driven:  # the count the next steps start from
                self.linear[key] = dense
            return dense
        acc = self.linear.get(key)
        if acc is None:  # the inputs sent all ones so far
            first = first.to(dtype)
            acc = self.linear[key] = first.unsqueeze(1).repeat(1, sent.batch) if matrix is not None else \
                first.unsqueeze(0).repeat(sent.batch, 1)
        units, change = sent.delta(rows, dtype)
        if units.numel():  # the rows of the inputs that changed, +1 turned on, -1 turned off
            chosen = rows.index_select(0, units)
            acc.add_(count(chosen.t(), change, dtype) if matrix is not None else count(change, chosen, dtype))
        return acc

    def conv_counts(self, key, k, sent, flipped, first, padding, dense):
        """The count ``conv2d(bits, sign W)`` of a convolution reading layer ``k``'s ``sent``
        (B, C, H, W) bits (channels-last): ``dense(bits as floats)`` computes it for any samples;
        ``flipped`` is ``cpu_kernels.flipped_weight(sign W)``, ``first`` (1, Co, Ho, Wo) the
        count of all-ones inputs.  Event-driven, it is kept from step to step and brought up to
        date by ``cpu_kernels.conv_delta`` in each sample where at most ``CONV_MAX_CHANGED`` of
        the input changed (integer sums of +-1: exact), recomputed in the others.  The result
        is this object's: read it, do not change it."""
        bits = sent.float(first.dtype).contiguous(memory_format=torch.channels_last)
        if not (self.event_driven and cpu_kernels.available() and bits.dtype == torch.float32):
            return dense(bits)
        state = self.convs.get(key)
        if state is None:  # the inputs sent all ones so far
            layout = torch.channels_last
            state = self.convs[key] = [first.repeat(bits.shape[0], 1, 1, 1).contiguous(memory_format=layout),
                                       torch.ones_like(bits, memory_format=layout)]
        acc, prev = state
        skipped = cpu_kernels.conv_delta(bits, prev, flipped, acc, padding, CONV_MAX_CHANGED)
        n_skipped = int(skipped.sum())
        if n_skipped == bits.shape[0]:
            acc.copy_(dense(bits))
            prev.copy_(bits)
        elif n_skipped:
            rows = skipped.nonzero().squeeze(1)
            part = bits.index_select(0, rows)
            acc.index_copy_(0, rows, dense(part))
            prev.index_copy_(0, rows, part)
        if self.activity is not None:
            self.activity.event[k] += bits.shape[0] - n_skipped
        return acc
