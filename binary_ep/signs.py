"""The sign matrices that the counts of binary neurons multiply (``neurons.count``), kept from one
weight update to the next: made once, then patched where the flip rule flipped a weight.

A binary weight is ``alpha * sign(w)``; between two updates only its flipped entries change sign
(a learnt alpha rescales it without changing a sign).  Making ``sign(w)`` and its transpose anew
costs several passes over the weight (the transpose of a 8192 x 8192 matrix alone about 0.1 s on
this machine), at every update; finding the flips takes one pass, and patching them is nothing.
The counts of all-ones inputs through the matrix and its transpose (every state starts at 1,
so a phase from ``initHidden`` starts from them) are patched with them.
"""

import os
import threading

import torch

from binary_ep.neurons import count, count_signs
from binary_ep.streams import in_streams

BLOCK_ELEMENTS = 1 << 18  # weights compared per block when looking for flips (1 MiB of float32)
# Above this fraction of a weight flipped, making its matrices anew is faster than patching
# (8192 x 8192: about 90 ns per flip patched, 0.3 s made anew, on this machine)
PATCH_MAX = 0.005


class SignMatrix:
    """``S = count_signs(w)`` of a 2-D weight (n_r, n_s), ``ST`` its contiguous transpose, and the
    counts of all-ones inputs ``rows = S 1`` (n_r,) and ``cols = S^T 1`` (n_s,), in ``w``'s
    dtype; ``version``: the weight's version counter they are up to date with."""

    __slots__ = ("S", "ST", "rows", "cols", "version", "kind")

    def __init__(self, w):
        w, self.version, self.kind = w.detach(), w._version, _kind(w)
        self.S = count_signs(w)
        self.ST = self.S.t().contiguous()
        self.rows = count(self.S, self.S.new_ones(w.shape[1], 1), w.dtype)[:, 0]
        self.cols = count(self.ST, self.ST.new_ones(w.shape[0], 1), w.dtype)[:, 0]


def _kind(w):
    """What ``count_signs`` makes for ``w``: its device and the kind of count."""
    return w.device, os.environ.get("EP_INT_COUNTS")


class SignCache:
    """The ``SignMatrix`` of each weight asked for (``get``), shared by the CPU streams (made under
    a lock), made again when the weight changed, but patched where only ``updateWeights``
    changed it (``stepped``); ``clear`` forgets them (the network moved: ``EPNetwork._apply``)."""

    def __init__(self):
        self._entries, self._lock = {}, threading.Lock()

    def clear(self):
        with self._lock:
            self._entries.clear()

    def get(self, w):
        """The ``SignMatrix`` of the weight ``w`` (a parameter of the network that owns the
        cache), up to date."""
        with self._lock:
            entry = self._entries.get(id(w))
            if entry is None or entry.version != w._version or entry.kind != _kind(w):
                entry = self._entries[id(w)] = SignMatrix(w)
            return entry

    def stepped(self, weights, before, flips):
        """The flip rule has just changed ``weights``, whose version counters were ``before``,
        flipping ``flips`` weights of each (counts): an entry up to date before stays so, patched
        where a sign changed (on the CPU, where at most ``PATCH_MAX`` of the weights flipped);
        else it is made again when asked for."""
        for param, version, flipped in zip(weights, before, flips):
            entry, w = self._entries.get(id(param)), param.detach()
            if entry is None or entry.version != version or entry.kind != _kind(w):
                continue
            n = int(flipped) if w.device.type == "cpu" else -1  # (no host read elsewhere)
            if not 0 <= n <= PATCH_MAX * w.numel() or not float(w.reshape(-1)[0]) != 0:
                del self._entries[id(param)]  # many flips (or an alpha of 0): made anew
                continue
            if n:
                rows, cols = _flipped(w, entry.S)
                new = count_signs(w[rows, cols])
                change = new.to(w.dtype) - entry.S[rows, cols].to(w.dtype)  # +-2: exact
                entry.S[rows, cols] = new
                entry.ST[cols, rows] = new
                entry.rows.index_add_(0, rows, change)
                entry.cols.index_add_(0, cols, change)
            entry.version = param._version


def _flipped(w, signs):
    """``(rows, cols)`` of the entries where ``sign(w)`` is not ``signs`` (+-1, nonzero ``w``):
    one pass over ``w`` in blocks of rows, shared among the CPU's threads."""
    n = max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))
    starts = list(range(0, w.shape[0], n))
    streams = max(1, min(torch.get_num_threads(), len(starts)))

    def run(stream):
        found = []
        for r in starts[stream::streams]:
            at = torch.ne(torch.signbit(w[r:r + n]), torch.lt(signs[r:r + n], 0)).nonzero()
            if at.numel():
                found.append(at + torch.tensor([r, 0]))
        return found
    found = [f for part in (in_streams(streams, run) if streams > 1 else [run(0)]) for f in part]
    if not found:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    at = torch.cat(found)
    return at[:, 0], at[:, 1]
