"""Binary weights: the scaling factors alpha and the thresholded low-pass flip rule.

Weights are stored as ``alpha * sign(w)``; ``BinaryFlip`` is the ``torch.optim.Optimizer`` that
flips them from the gradient estimate in ``.grad`` (DESIGN.md section 4, ``updateWeights``).
"""

import torch

from binary_ep.streams import in_streams

CPU_BLOCK_ELEMENTS = 1 << 18  # rows per block of the flip rule on a CPU: 1 MiB per float32 block (measured best)


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
    ``alpha_scale`` (the factor ``c`` below), ``per_channel`` and ``name``.  ``.grad`` holds the
    loss gradient estimate (EP writes ``-dW``).
    Per step, with ``m`` the low-pass filtered gradient (state ``filtered_grad``, starts at 0 or
    at ``start_filters``)::

        m <- (1 - gamma) m + gamma * grad
        flip w -> -w  where  w * m > threshold * alpha      (i.e. -sign(w) * dW_filtered > threshold)

    and, with learnt scaling factors, alpha <- alpha - lr_alpha * c * sum(grad * w) (the EP
    estimate of -dL/dalpha scaled by c * alpha, as the original code did: c = 0.5 in its fc
    class, 1 in its conv class), summed per output channel for convolutions.  ``step`` returns
    the number of flips of each layer (tensors).

    Instead of ``.grad``, a layer's gradient may be given as a product ``scale * a @ b``
    (``set_outer_grad``): ``step`` then forms it block by block, never the whole matrix.  Such a
    pair is pending until ``step`` or ``zero_grad``; a ``.grad`` written after it takes precedence
    (``set_outer_grad`` clears ``.grad``, so a ``.grad`` present at ``step`` is the newer one).  On a
    CPU the rule runs over blocks of rows small enough to stay in cache between its operations
    (one pass through memory instead of five), the blocks shared among single-threaded streams.
    """

    def __init__(self, groups):
        super().__init__(groups, {"lr_alpha": 0.0, "alpha_scale": 0.5, "per_channel": False, "name": ""})
        self._scratch = {}
        self._outer = {}  # id(weight) -> (a, b, scale): the gradient is scale * a @ b
        self.learnt_alpha = {}  # group index -> alpha of the last step (learnt alpha only)

    def set_outer_grad(self, w, a, b, scale):
        """The next ``step``'s gradient of ``w`` is ``scale * a @ b`` (``w.grad`` is cleared)."""
        if a.shape[0] != w.shape[0] or b.shape[1:] != w.shape[1:] or a.shape[1] != b.shape[0]:
            raise ValueError(f"gradient factors {tuple(a.shape)} @ {tuple(b.shape)} do not match {tuple(w.shape)}")
        self._outer[id(w)] = (a, b, scale)
        w.grad = None

    def start_filters(self, draw):
        """Start each layer's filtered gradient ``m`` at ``draw(w, gamma)`` (a tensor shaped like
        the weight ``w``) instead of 0 (the original conv network of binary neurons starts it
        at ``2 gamma N(0, 1)``); saved in ``state_dict`` like every later value."""
        for group in self.param_groups:
            (w,) = group["params"]
            self.state[w]["filtered_grad"] = draw(w, group["gamma"])

    def pending_factors(self, w):
        """``(a, b, scale)`` of ``w``'s pending product gradient, or None (a ``.grad`` wins)."""
        return self._outer.get(id(w)) if w.grad is None else None

    def zero_grad(self, set_to_none=True):
        """Clear ``.grad`` and every pending factor pair."""
        self._outer.clear()
        super().zero_grad(set_to_none)

    def pending_grad(self, w):
        """The gradient the next ``step`` will use for ``w`` (formed in full: for inspection)."""
        factors = self.pending_factors(w)
        if factors is not None:
            a, b, scale = factors
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
            if w.grad is not None:  # written after the factors: the newer gradient
                outer = None
            if outer is None and w.grad is None:
                raise RuntimeError(f"BinaryFlip.step: layer {group['name']} has no gradient")
            state = self.state[w]
            if "filtered_grad" not in state:
                state["filtered_grad"] = torch.zeros_like(w)
            m = state["filtered_grad"]
            if m.device != w.device:  # started (``start_filters``) before the network moved
                m = state["filtered_grad"] = m.to(w.device)
            per_channel, lr_alpha = group["per_channel"], group["lr_alpha"]
            alpha = current_alpha(w, per_channel)
            limit = alpha * group["threshold"]  # a tensor: no wait for the device
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
                new_alpha = alpha - lr_alpha * group["alpha_scale"] * total.view(alpha.shape)
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
