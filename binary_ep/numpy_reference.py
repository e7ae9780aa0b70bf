"""Reference free phase of a 1-bit export (``binary_model.npz``, see ``binary_ep.export``) in
NumPy alone: no torch, and of the project only ``binary_ep.model_file``, the file's reader.

``load_model(path)`` (from ``binary_ep.model_file``) reads the file and checks all of it
(``ExportError``, one line naming the file, for anything an export never holds);
``free_phase(model, x)`` runs the free phase on a batch of images ``x`` (B, C, H, W), already
scaled as ``meta["input_scaling"]`` says (``scale_input`` does it from raw pixels), and returns
the predictions (B,) and the output states (B, 10 E), E = ``model.expand_output`` output units a
class; the prediction is the class of the largest ``class_scores``, the mean of its E states
(E = 1: the largest output).  The arithmetic is float64 by default: the
sums of a convolution of binary weights are then exact often enough that max-pool ties come out
as ties and the first position wins, where float32 rounding (PyTorch's) may pick another; away
from such ties PyTorch's float32 states agree to about 3e-7 on the digits networks of the tests,
and PyTorch in float64 to 1e-15.

Dynamics (DESIGN.md sections 4 and 5): every state starts at 1, then ``T`` synchronous steps,
every layer computed from the previous step's states, ``rho`` the activation::

    fc layer k:    s[k] <- rho(W_k s[k+1] + b_k + W_{k-1}^T s[k-1])   (no second term for k = 0;
                   below the bottom layer, s[k+1] is the input flattened in (c, h, w) order, or
                   the top convolution's state flattened in (c, h, w) order)
    conv i (top first):  s_i <- rho(P(conv_i(s_{i+1}) + b_i) + feedback_i)   (x below the bottom)
    feedback_0 = (W_fc_last^T s_fc_last) reshaped (C_0, H_0, W_0)
    feedback_i = conv_transpose(U(s_{i-1}, indices of P in conv_{i-1} at this step), W_{i-1})

``conv`` is a cross-correlation (no kernel flip, stride 1, zero padding), ``P`` a max-pool
(size = stride = pool_size; the first maximum in row-major order within a window wins), ``U``
puts each pooled value back where its maximum was (zeros elsewhere).  That is ``rate_step``, for
rate neurons; binary neurons (``model.neurons == "binary"``, the activation heaviside) take
``binary_step``: each layer sends b = H(s - rho_threshold) and its state filters the drive it
gets, the products with b are exact integer counts of the sign bits (DESIGN.md section 10).
Command line:
``python -m binary_ep.numpy_reference S-<n>/binary_model.npz`` prints the model summary.
"""

import sys

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# the file's reader; its names are this module's too (binary_ep.export, main.py, the README use them)
from binary_ep.model_file import (ACTIVATIONS, FORMAT_VERSION, KINDS, MAX_STEPS, ExportError,  # noqa: F401
                                  Layer, Model, load_model, unpack_signs)


# -- the operations, on (B, C, H, W) arrays -------------------------------------------------------
def rho(a, name):
    """The activation, every state clamped to [0, 1] (in place on ``a`` where possible)."""
    if name == "hardsigm":
        return np.clip(a, 0, 1, out=a)
    if name == "sigm":  # 1 / (1 + exp(-4 (a - 0.5))), written without overflow
        return 0.5 + 0.5 * np.tanh(2 * (a - 0.5))
    if name == "tanh":
        return np.clip(np.tanh(a), 0, 1)
    raise ValueError(f"unknown activation {name!r}")


def conv2d(x, w, b=None, padding=0):
    """Cross-correlation (no kernel flip), stride 1: x (B, C, H, W), w (O, C, kh, kw), b (O,) or
    None, ``padding`` an int or (ph, pw) of zeros on each side -> (B, O, H', W'), with
    H' = H + 2 ph - kh + 1.  (im2col on a channels-last copy, then one matrix product.)"""
    ph, pw = (padding, padding) if np.isscalar(padding) else padding
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xl = np.zeros((n, h + 2 * ph, wd + 2 * pw, c), dtype=np.result_type(x, w))
    xl[:, ph:ph + h, pw:pw + wd] = x.transpose(0, 2, 3, 1)
    # (B, H', W', kh, kw, C) -> one row per output position
    windows = sliding_window_view(xl, (kh, kw), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
    ho, wo = windows.shape[1:3]
    cols = windows.reshape(n * ho * wo, kh * kw * c)
    out = cols @ w.transpose(2, 3, 1, 0).reshape(kh * kw * c, o)
    out = out.reshape(n, ho, wo, o).transpose(0, 3, 1, 2)
    return out if b is None else out + b[:, None, None]


def conv_transpose2d(y, w, padding=0):
    """The adjoint of ``conv2d(., w, padding=padding)``: y (B, O, H', W'), w (O, C, kh, kw) ->
    (B, C, H' + kh - 1 - 2 padding, W' + kw - 1 - 2 padding); a full cross-correlation with the
    flipped kernel, cropped by ``padding``."""
    kh, kw = w.shape[2:]
    flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    full = conv2d(y, flipped, padding=(kh - 1, kw - 1))
    return full[:, :, padding:full.shape[2] - padding, padding:full.shape[3] - padding]


def _windows(a, f):
    b, c, h, w = a.shape
    hp, wp = (h - f) // f + 1, (w - f) // f + 1
    v = a[:, :, :hp * f, :wp * f].reshape(b, c, hp, f, wp, f)
    return v.transpose(0, 1, 2, 4, 3, 5).reshape(b, c, hp, wp, f * f)  # row-major within a window


def max_pool(a, f, trace=None, moved=None):
    """Max-pool of size and stride ``f``: a (B, C, H, W) -> (pooled (B, C, H//f, W//f), index of
    the maximum within each window (row-major, 0..f*f-1), the first one on ties).

    With a ``trace`` dict and ``moved`` (B, C, H//f, W//f), the values that will be unpooled with
    these indices: the windows where the choice matters (``moved`` != 0) and the two largest
    values are within ``trace["tol"]`` (default 1e-6) of each other, where another rounding of
    the same numbers could pick another position, are counted per sample in ``trace["fragile"]``
    (B,); ``trace["min_gap"]`` (B,) keeps the smallest gap between the two largest values of the
    windows that matter."""
    v = _windows(a, f)
    index = v.argmax(-1)
    pooled = np.take_along_axis(v, index[..., None], -1)[..., 0]
    if trace is not None and f > 1:
        top = np.partition(v, -2, axis=-1)
        gap = np.where(moved != 0, top[..., -1] - top[..., -2], np.inf).reshape(a.shape[0], -1)
        trace["fragile"] = trace.get("fragile", 0) + (gap <= trace.get("tol", 1e-6)).sum(1)
        trace["min_gap"] = np.minimum(trace.get("min_gap", np.inf), gap.min(1))
    return pooled, index


def max_unpool(s, index, f, size):
    """Inverse of ``max_pool``: each value of s (B, C, h, w) goes to the position ``index`` of its
    window, zeros elsewhere -> (B, C, H, W) with (H, W) = ``size``."""
    b, c, h, w = s.shape
    spread = np.where(index[..., None] == np.arange(f * f), s[..., None], 0)
    out = np.zeros((b, c) + tuple(size), dtype=s.dtype)
    spread = spread.reshape(b, c, h, w, f, f).transpose(0, 1, 2, 4, 3, 5)
    out[:, :, :h * f, :w * f] = spread.reshape(b, c, h * f, w * f)
    return out


def unpool_conv_transpose2d(s, index, f, size, w, padding=0):
    """``conv_transpose2d(max_unpool(s, index, f, size), w, padding)`` without the unpooled zeros:
    s and index (B, O, h, w), w (O, C, kh, kw) -> (B, C, H + kh - 1 - 2 padding, W + kw - 1 -
    2 padding) with (H, W) = ``size``.  Each pooled value, times its kernel, lands at the
    position its index names: one product per position within the window."""
    n, o, h, wd = s.shape
    _, c, kh, kw = w.shape
    hc, wc = size
    frame = np.zeros((n, hc + kh - 1, wc + kw - 1, c), dtype=np.result_type(s, w))
    weights = w.reshape(o, c * kh * kw)
    sl, il = s.transpose(0, 2, 3, 1), index.transpose(0, 2, 3, 1)
    for q in range(f * f):
        dy, dx = divmod(q, f)
        part = (np.where(il == q, sl, 0).reshape(n * h * wd, o) @ weights).reshape(n, h, wd, c, kh, kw)
        for i in range(kh):
            for j in range(kw):
                frame[:, dy + i:dy + i + f * h:f, dx + j:dx + j + f * wd:f] += part[..., i, j]
    hi, wi = hc + kh - 1 - 2 * padding, wc + kw - 1 - 2 * padding
    return frame[:, padding:padding + hi, padding:padding + wi].transpose(0, 3, 1, 2)


# -- relaxation ---------------------------------------------------------------------------------
def scale_input(model, pixels):
    """Raw pixels (B, C, H, W) (0..255, digits 0..16) -> the network's input, as
    ``meta["input_scaling"]`` says."""
    s = model.meta.get("input_scaling") or {}
    x = np.asarray(pixels, dtype=np.float64) / float(s.get("divide_by", 1.0))
    if s.get("mean") is not None:
        shape = (1, -1, 1, 1)
        x = (x - np.reshape(s["mean"], shape)) / np.reshape(s["std"], shape)
    return x


def _check_input(model, x, dtype):
    x = np.asarray(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != model.input_shape:
        raise ValueError(f"the input must be (B, {', '.join(map(str, model.input_shape))}), got {x.shape}")
    return x.astype(dtype)


class _Constants:
    """What one relaxation reads besides the states, in ``dtype``: ``fw``/``fb`` the fc weights
    and biases, ``cw``/``cb`` the convolutions', ``below_fc`` (fc networks: the input's drive
    ``W x + b``) or ``bottom`` (conv: the bottom convolution's pooled drive and its indices), and
    for binary neurons ``signs`` (+1/-1 float64 of each layer, output first: the operand of
    ``counts``), ``alpha`` (each layer's, float64) and ``alpha_d``, ``bias_d`` (in ``dtype``,
    (n,) for fc layers, (C, 1, 1) for convolutions)."""

    def __init__(self, model, x, dtype):
        b = x.shape[0]
        self.nf, self.nc, self.b, self.dtype = len(model.fc), len(model.conv), b, dtype
        self.fw = [l.weight.astype(dtype) for l in model.fc]
        self.fb = [l.bias.astype(dtype) for l in model.fc]
        self.cw = [l.weight.astype(dtype) for l in model.conv]
        self.cb = [l.bias.astype(dtype) for l in model.conv]
        self.p, self.f = model.padding, model.pool_size
        if self.nc == 0:
            self.below_fc = x.reshape(b, -1) @ self.fw[-1].T + self.fb[-1]  # constant
        else:
            self.bottom = max_pool(conv2d(x, self.cw[-1], self.cb[-1], self.p), self.f)  # constant
        if model.neurons == "binary":
            self.signs = [l.signs.astype(np.float64) for l in model.layers]
            self.alpha = [l.alpha.astype(np.float64) for l in model.layers]
            # alpha and bias in dtype, shaped for (B, n) or, per output channel, (B, C, H, W)
            shapes = [(-1,) + (1,) * (len(l.shape) - 2) for l in model.layers]
            self.alpha_d = [a.astype(dtype).reshape(v) for a, v in zip(self.alpha, shapes)]
            self.bias_d = [l.bias.astype(dtype).reshape(v) for l, v in zip(model.layers, shapes)]


def relax(model, x, T=None, dtype=np.float64, trace=None, states=None):
    """The free phase: ``T`` (default ``model.T``) steps from ``states`` (default: every state at
    1; a list like the one returned).  x (B, C, H, W).
    Returns the states, output first: fc states (B, n_k), then the pooled convolution states
    (B, C_i, H_i, W_i), top first.  ``trace`` (a dict) collects, for rate neurons, the max-pool
    near-ties whose choice moves a nonzero state (``max_pool``; the bottom pool's indices are
    never used in the free phase), for binary neurons the states near a point where what a
    neuron sends or its mask changes (``binary_step``)."""
    x = _check_input(model, x, dtype)
    b = x.shape[0]
    s = [np.ones((b, l.shape[0]), dtype) for l in model.fc]
    s += [np.ones((b,) + l.pool, dtype) for l in model.conv]
    if states is not None:
        if [np.shape(v) for v in states] != [v.shape for v in s]:
            raise ValueError(f"states of shapes {[np.shape(v) for v in states]}, expected "
                             f"{[v.shape for v in s]}")
        s = [np.array(v, dtype=dtype) for v in states]
    c = _Constants(model, x, dtype)
    step = binary_step if model.neurons == "binary" else rate_step
    for _ in range(model.T if T is None else int(T)):
        s = step(model, c, s, trace)
    return s


def rate_step(model, c, s, trace=None):
    """One synchronous step of rate neurons (the module docstring) from the states ``s``, with
    ``c`` the relaxation's ``_Constants``; returns the new states."""
    nf, nc, b, act, p, f = c.nf, c.nc, c.b, model.activation, c.p, c.f
    new = []
    for k in range(nf):
        a = c.below_fc.copy() if nc == 0 and k == nf - 1 else s[k + 1].reshape(b, -1) @ c.fw[k].T + c.fb[k]
        if k > 0:
            a += s[k - 1] @ c.fw[k - 1]
        new.append(rho(a, act))
    index = None
    for i in range(nc):
        if i + 1 < nc:
            pooled, next_index = max_pool(conv2d(s[nf + i + 1], c.cw[i], c.cb[i], p), f, trace, s[nf + i])
        else:
            pooled, next_index = c.bottom
        if i == 0:
            feedback = (s[nf - 1] @ c.fw[nf - 1]).reshape((b,) + model.conv[0].pool)
        else:
            size = model.conv[i - 1].conv[1:]
            feedback = unpool_conv_transpose2d(s[nf + i - 1], index, f, size, c.cw[i - 1], p)
        new.append(rho(pooled + feedback, act))
        index = next_index
    return new


def counts(signs, sent):
    """``count(sign(W) b)``: signs (O, K) +1/-1, sent (N, K) 0/1 -> (N, O) int64, each the number
    of +1 minus the number of -1 weights over the active inputs.  (A float64 product: every
    partial sum is an integer of magnitude at most K < 2^53, so it is exact.)"""
    return (np.asarray(sent, np.float64) @ signs.T).astype(np.int64)


def binary_step(model, c, s, trace=None):
    """One synchronous step of binary neurons (DESIGN.md section 10), every layer from ``s``::

        b[k] = H(s[k] - theta)            (1 where s >= theta, else 0; what a neuron sends)
        a[k] = alpha_k count(sign(W_k) b[k+1]) + bias_k + alpha_{k-1} count(sign(W_{k-1})^T b[k-1])
        a[k] = 0 where |s[k] - theta| > 0.5                  (the mask rho'(s - theta))
        s[k] <- clamp((1 - gamma_neur) s[k] + gamma_neur a[k], 0, 1)

    theta = ``model.rho_threshold``; ``count`` is ``counts`` (exact int64), times alpha in the
    states' dtype, then + bias.  The bottom layer reads the input x in full precision: fc
    ``W x + b``, conv ``P(conv(x) + b)``.  A higher convolution i: ``P(alpha_o count(conv(b
    below, sign W_i)) + bias_o)`` per output channel o, plus the feedback: from the classifier
    ``alpha count(sign(W_fc_last)^T b_fc_last)`` reshaped (c, h, w); from the convolution above,
    ``sum_o alpha_o count_o`` of its transposed convolution of b above unpooled with the
    indices of this step (each term exact in float64, the sum rounded once to the dtype).

    ``trace`` (a dict): ``trace["near"]`` (B,) counts, per sample, the states within
    ``trace["tol"]`` (default 1e-6) of theta, or of theta +- 0.5 where that lies inside (0, 1):
    where another rounding of the same numbers could send another b or mask."""
    nf, nc, b, p, f, dtype = c.nf, c.nc, c.b, c.p, c.f, c.dtype
    theta, g = dtype(model.rho_threshold), model.gamma_neur
    sent = [(v >= theta).astype(np.float64) for v in s]
    if trace is not None:
        edges = [theta] + [u for u in (theta - 0.5, theta + 0.5) if 0 < u < 1]
        tol = trace.get("tol", 1e-6)
        near = sum((np.abs(v - u) <= tol).reshape(b, -1).sum(1) for v in s for u in edges)
        trace["near"] = trace.get("near", 0) + near
    new = []
    for k in range(nf):
        if nc == 0 and k == nf - 1:
            a = c.below_fc.copy()
        else:
            a = counts(c.signs[k], sent[k + 1].reshape(b, -1)).astype(dtype) * c.alpha_d[k] + c.bias_d[k]
        if k > 0:
            a += counts(c.signs[k - 1].T, sent[k - 1]).astype(dtype) * c.alpha_d[k - 1]
        new.append(a)
    index = None
    for i in range(nc):
        k = nf + i
        if i + 1 < nc:
            count = conv2d(sent[k + 1], c.signs[k], padding=p).astype(np.int64)  # exact, as counts
            pooled, next_index = max_pool(count.astype(dtype) * c.alpha_d[k] + c.bias_d[k], f)
        else:
            pooled, next_index = c.bottom
        if i == 0:
            count = counts(c.signs[nf - 1].T, sent[nf - 1]).astype(dtype)
            feedback = (count * c.alpha_d[nf - 1]).reshape((b,) + model.conv[0].pool)
        else:
            above = sent[k - 1] * c.alpha[k - 1][:, None, None]
            size = model.conv[i - 1].conv[1:]
            feedback = unpool_conv_transpose2d(above, index, f, size, c.signs[k - 1], p).astype(dtype)
        new.append(pooled + feedback)
        index = next_index
    for k, a in enumerate(new):
        a[np.abs(s[k] - theta) > 0.5] = 0
        new[k] = np.clip((1 - g) * s[k] + g * a, 0, 1)
    return new


def class_scores(out, expand_output):
    """The population readout: out (B, n_classes * E) output states -> (B, n_classes), the mean
    of each class's E states (class c owns states cE ... cE + E - 1)."""
    out = np.asarray(out)
    return out.reshape(out.shape[0], -1, expand_output).mean(2)


def free_phase(model, x, T=None, batch=512, dtype=np.float64):
    """Predictions (B,) int64 (the class of the first largest ``class_scores``) and output states
    (B, n_classes * E) of the free phase on x (B, C, H, W), scaled as ``meta["input_scaling"]``;
    ``batch`` samples at a time."""
    x = np.asarray(x)
    outs = [relax(model, x[i:i + batch], T, dtype)[0] for i in range(0, max(len(x), 1), batch)]
    out = np.concatenate(outs) if len(x) else np.zeros((0, model.fc[0].shape[0]), dtype)
    return class_scores(out, model.expand_output).argmax(1), out


# -- command line -------------------------------------------------------------------------------
def summary(model):
    """A few lines describing the model."""
    m = model.meta
    n = sum(l.weight.size for l in model.layers)
    scaling = (m.get("input_scaling") or {}).get("text", "?")
    conv = (f", kernel {model.kernel_size}, padding {model.padding}, pool {model.pool_size}"
            if model.conv else "")
    lines = [f"{model.path}: binary-EP export, format version {FORMAT_VERSION}, {m['archi']} network "
             f"trained on {m.get('dataset')}, input {'x'.join(map(str, model.input_shape))} ({scaling}), "
             f"activation {model.activation}, T {model.T}{conv}",
             f"  {model.neurons} neurons" + (f" (rho_threshold {model.rho_threshold:g}, gamma_neur "
                                              f"{model.gamma_neur:g})" if model.neurons == "binary" else "")
             + f", {model.expand_output} output unit(s) a class, prediction: the class of the largest mean"]
    for l in model.layers:
        alpha = f"alpha {float(l.alpha[0]):.4g}" if l.alpha.size == 1 else \
            f"alpha {float(l.alpha.min()):.4g}..{float(l.alpha.max()):.4g} per channel"
        geo = f" {l.input} -> {l.pool}" if l.kind == "conv" else ""
        lines.append(f"  {l.name}: {l.kind} {'x'.join(map(str, l.weight.shape))}{geo}, {alpha}, "
                     f"{int((l.weight > 0).sum())} of {l.weight.size} weights +alpha")
    lines.append(f"  {n} binary weights in {sum((l.weight.size + 7) // 8 for l in model.layers)} bytes "
                 f"(float32: {4 * n} bytes)")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m binary_ep.numpy_reference S-<n>/binary_model.npz", file=sys.stderr)
        return 2
    try:
        model = load_model(argv[0])
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
