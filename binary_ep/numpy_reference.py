"""Reference free phase of a 1-bit export (``binary_model.npz``, see ``binary_ep.export``) in
NumPy alone: no torch, and of the project only ``binary_ep.model_file``, the file's reader.

``load_model(path)`` (from ``binary_ep.model_file``) reads the file and checks all of it
(``ExportError``, one line naming the file, for anything an export never holds);
``free_phase(model, x)`` runs the free phase on a batch of images ``x`` (B, C, H, W), already
scaled as ``meta["input_scaling"]`` says (``scale_input`` does it from raw pixels), and returns
the predictions (B,) and the output states (B, 10).  The arithmetic is float64 by default: the
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
puts each pooled value back where its maximum was (zeros elsewhere).  Command line:
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


def relax(model, x, T=None, dtype=np.float64, trace=None, states=None):
    """The free phase: ``T`` (default ``model.T``) steps from ``states`` (default: every state at
    1; a list like the one returned).  x (B, C, H, W).
    Returns the states, output first: fc states (B, n_k), then the pooled convolution states
    (B, C_i, H_i, W_i), top first.  ``trace`` (a dict) collects the max-pool near-ties whose
    choice moves a nonzero state (``max_pool``; the bottom pool's indices are never used in the
    free phase)."""
    x = _check_input(model, x, dtype)
    b, act, T = x.shape[0], model.activation, model.T if T is None else int(T)
    fw = [l.weight.astype(dtype) for l in model.fc]
    fb = [l.bias.astype(dtype) for l in model.fc]
    nf, nc = len(fw), len(model.conv)
    s = [np.ones((b, w.shape[0]), dtype) for w in fw]
    if nc:
        s += [np.ones((b,) + l.pool, dtype) for l in model.conv]
    if states is not None:
        if [np.shape(v) for v in states] != [v.shape for v in s]:
            raise ValueError(f"states of shapes {[np.shape(v) for v in states]}, expected "
                             f"{[v.shape for v in s]}")
        s = [np.array(v, dtype=dtype) for v in states]
    if nc == 0:
        below_fc = x.reshape(b, -1) @ fw[-1].T + fb[-1]  # the input's drive, constant
    else:
        cw = [l.weight.astype(dtype) for l in model.conv]
        cb = [l.bias.astype(dtype) for l in model.conv]
        p, f = model.padding, model.pool_size
        bottom = max_pool(conv2d(x, cw[-1], cb[-1], p), f)  # constant during the relaxation
    for _ in range(T):
        new = []
        for k in range(nf):
            if nc == 0 and k == nf - 1:
                a = below_fc.copy()
            else:
                below = s[k + 1].reshape(b, -1)
                a = below @ fw[k].T + fb[k]
            if k > 0:
                a += s[k - 1] @ fw[k - 1]
            new.append(rho(a, act))
        index = None
        for i in range(nc):
            if i + 1 < nc:
                pooled, next_index = max_pool(conv2d(s[nf + i + 1], cw[i], cb[i], p), f, trace, s[nf + i])
            else:
                pooled, next_index = bottom
            if i == 0:
                feedback = (s[nf - 1] @ fw[nf - 1]).reshape((b,) + model.conv[0].pool)
            else:
                size = model.conv[i - 1].conv[1:]
                feedback = unpool_conv_transpose2d(s[nf + i - 1], index, f, size, cw[i - 1], p)
            new.append(rho(pooled + feedback, act))
            index = next_index
        s = new
    return s


def free_phase(model, x, T=None, batch=512, dtype=np.float64):
    """Predictions (B,) int64 (the first largest output) and output states (B, 10) of the free
    phase on x (B, C, H, W), scaled as ``meta["input_scaling"]``; ``batch`` samples at a time."""
    x = np.asarray(x)
    outs = [relax(model, x[i:i + batch], T, dtype)[0] for i in range(0, max(len(x), 1), batch)]
    out = np.concatenate(outs) if len(x) else np.zeros((0, model.fc[0].weight.shape[0]), dtype)
    return out.argmax(1), out


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
             f"activation {model.activation}, T {model.T}{conv}"]
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
