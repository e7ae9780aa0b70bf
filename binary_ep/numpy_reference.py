"""Reference free phase of a 1-bit export (``binary_model.npz``, see ``binary_ep.export``) in
NumPy alone: no torch, no other file of the project is needed to read the model and relax it.

``load_model(path)`` reads and checks the file (``ExportError``, one sentence naming the file,
for anything that is not a readable export of a known version); ``free_phase(model, x)`` runs
the free phase on a batch of images ``x`` (B, C, H, W), already scaled as ``meta
["input_scaling"]`` says (``scale_input`` does it from raw pixels), and returns the predictions
(B,) and the output states (B, 10).  The arithmetic is float64 by default: the sums of a
convolution of binary weights are then exact often enough that max-pool ties come out as ties
and the first position wins, where float32 rounding (PyTorch's) may pick another; away from
such ties PyTorch's float32 states agree to about 3e-7 on the digits networks of the tests,
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

import json
import os
import struct
import sys
import zipfile
import zlib

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

FORMAT_VERSION = 1
KINDS = ("fc", "conv")
ACTIVATIONS = ("hardsigm", "sigm", "tanh")
# what a damaged file can raise while numpy.load reads it
_READ_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, struct.error, zlib.error,
                NotImplementedError)


class ExportError(ValueError):
    """A file that is not a readable binary-EP export (one line that names the file), or a
    network that cannot be written as one (``binary_ep.export``)."""


class Layer:
    """One layer: ``name``, ``kind`` ("fc" or "conv"), ``weight`` float32 ``alpha * sign`` of
    shape (out, in) or (out_channels, in_channels, kh, kw), ``alpha`` float32 (1,) or
    (out_channels,), ``bias`` float32 (out,); convolutions also ``input``, ``conv``, ``pool``:
    the (C, H, W) sizes of their input, of the convolution and of the max-pool."""

    def __init__(self, name, kind, weight, alpha, bias):
        self.name, self.kind, self.weight, self.alpha, self.bias = name, kind, weight, alpha, bias
        self.input = self.conv = self.pool = None


class Model:
    """A loaded export: ``path``, ``meta`` (the JSON dict), ``layers`` (output first), ``fc`` and
    ``conv`` (the two parts, each output/top first), ``activation``, ``T``, ``padding``,
    ``kernel_size``, ``pool_size``, ``input_shape`` (C, H, W)."""

    def __init__(self, path, meta, layers):
        self.path, self.meta, self.layers = path, meta, layers
        self.fc = [l for l in layers if l.kind == "fc"]
        self.conv = [l for l in layers if l.kind == "conv"]
        self.activation, self.T = meta["activation"], int(meta["T"])
        self.padding, self.kernel_size = meta.get("padding"), meta.get("kernel_size")
        self.pool_size = meta.get("pool_size")
        self.input_shape = tuple(int(v) for v in meta["input_shape"])


# -- reading ---------------------------------------------------------------------------------------
def _one_line(e):
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def unpack_signs(bits, shape):
    """Sign bits (``numpy.packbits`` order) -> +1/-1 float32 array of ``shape``."""
    n = int(np.prod(shape))
    on = np.unpackbits(bits, count=n, bitorder="big").reshape(shape)
    return np.where(on == 1, np.float32(1), np.float32(-1))


def _read_arrays(name):
    def fail(reason):
        raise ExportError(f"{name} is not a binary-EP export ({reason})")
    try:
        with open(name, "rb") as f:
            head = f.read(4)
        if head.startswith(b"\x93NUM"):
            fail("a single .npy array, not an .npz archive")
        if head != b"PK\x03\x04":
            fail("not an .npz archive: no zip header at its start")
        with np.load(name, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        odd = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
        if odd:
            fail(f"its member {odd[0]} is not a .npy array")
        return arrays
    except ExportError:
        raise
    except FileNotFoundError:
        raise ExportError(f"{name} does not exist") from None
    except zipfile.BadZipFile as e:
        fail(f"a damaged or truncated .npz archive: {_one_line(e)}")
    except _READ_ERRORS as e:
        fail(_one_line(e))


def _array(arrays, key, name, kinds, ndim=1):
    if key not in arrays:
        raise ExportError(f"{name} is not a binary-EP export (the array {key} is missing)")
    a = arrays[key]
    if a.dtype.kind not in kinds or a.ndim != ndim:
        raise ExportError(f"{name} is not a binary-EP export ({key} is {a.dtype} of shape {a.shape})")
    return a


def _meta(arrays, name):
    version = _array(arrays, "format_version", name, "iu")
    if version.shape != (1,):
        raise ExportError(f"{name} is not a binary-EP export (format_version has shape {version.shape})")
    if int(version[0]) != FORMAT_VERSION:
        raise ExportError(f"{name} has format version {int(version[0])}, this reader knows {FORMAT_VERSION}")
    raw = _array(arrays, "meta", name, "u")
    try:
        meta = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ExportError(f"{name} is not a binary-EP export (meta is not UTF-8 JSON: "
                          f"{_one_line(e)})") from None
    need = ("archi", "activation", "T", "layer_names", "input_shape")
    missing = [k for k in need if not isinstance(meta, dict) or k not in meta]
    if missing or meta.get("format") != "binary-ep":
        raise ExportError(f"{name} is not a binary-EP export (meta lacks {', '.join(missing) or 'format'})")
    if meta["activation"] not in ACTIVATIONS:
        raise ExportError(f"{name} uses the activation {meta['activation']!r}, this reader knows "
                          f"{', '.join(ACTIVATIONS)}")
    shape = meta["input_shape"]
    if meta["archi"] not in KINDS or not _ints(meta["T"], 0) or not (
            isinstance(shape, list) and len(shape) == 3 and all(_ints(v, 1) for v in shape)):
        raise ExportError(f"{name} is not a binary-EP export (meta archi {meta['archi']!r}, T "
                          f"{meta['T']!r} or input_shape {shape!r} is not valid)")
    return meta


def _ints(v, least):
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _layer(arrays, name, layer_name):
    key = layer_name + "."
    shape = tuple(int(v) for v in _array(arrays, key + "shape", name, "iu"))
    bits = _array(arrays, key + "bits", name, "u")
    alpha = _array(arrays, key + "alpha", name, "f").astype(np.float32)
    bias = _array(arrays, key + "bias", name, "f").astype(np.float32)
    n = int(np.prod(shape)) if shape else 0
    bad = None
    if len(shape) not in (2, 4) or min(shape) <= 0:
        bad = f"{key}shape is {shape}"
    elif bits.dtype != np.uint8 or bits.size != (n + 7) // 8:
        bad = f"{key}bits holds {bits.size} bytes for {n} weights"
    elif n % 8 and int(bits[-1]) & (0xFF >> (n % 8)):
        bad = f"the unused bits of {key}bits are not 0"
    elif alpha.shape not in ((1,), (shape[0],)) or not np.all(alpha > 0):
        bad = f"{key}alpha has shape {alpha.shape} or a value <= 0"
    elif bias.shape != (shape[0],):
        bad = f"{key}bias has shape {bias.shape} for {shape[0]} outputs"
    if bad:
        raise ExportError(f"{name} is not a binary-EP export ({bad})")
    a = alpha.reshape((-1,) + (1,) * (len(shape) - 1)) if alpha.size > 1 else alpha[0]
    weight = (unpack_signs(bits, shape) * a).astype(np.float32)
    return Layer(layer_name, "fc" if len(shape) == 2 else "conv", weight, alpha, bias)


def _check_chain(model, name):
    """Every layer's input size matches what feeds it; fills the conv geometry."""
    def fail(reason):
        raise ExportError(f"{name} is not a binary-EP export ({reason})")
    kinds = [l.kind for l in model.layers]
    archi = "conv" if model.conv else "fc"
    if kinds != sorted(kinds, key=KINDS.index) or not model.fc or model.meta["archi"] != archi:
        fail(f"layers {kinds} do not make an {model.meta['archi']} network")
    size = model.input_shape
    if model.conv:
        k, p, f = model.kernel_size, model.padding, model.pool_size
        if not (_ints(k, 1) and _ints(p, 0) and _ints(f, 1)):
            fail("kernel_size, padding or pool_size is missing")
        for layer in reversed(model.conv):
            c_out, c_in, kh, kw = layer.weight.shape
            hc, wc = size[1] - kh + 1 + 2 * p, size[2] - kw + 1 + 2 * p
            if c_in != size[0] or kh != k or kw != k or min(hc, wc) < f:
                fail(f"{layer.name} of shape {layer.weight.shape} cannot read {size}")
            layer.input, layer.conv = size, (c_out, hc, wc)
            layer.pool = size = (c_out, (hc - f) // f + 1, (wc - f) // f + 1)
    n_in = int(np.prod(size))
    for layer in reversed(model.fc):
        if layer.weight.shape[1] != n_in:
            fail(f"{layer.name} reads {layer.weight.shape[1]} values, {n_in} feed it")
        n_in = layer.weight.shape[0]


def load_model(path):
    """Read a ``binary_model.npz`` (``numpy.load(..., allow_pickle=False)``) into a ``Model``.
    Raises ``ExportError`` (a ``ValueError``), one line naming the file, for a missing or
    unreadable file, a missing or malformed array, or another format version."""
    name = os.fspath(path)
    arrays = _read_arrays(name)
    meta = _meta(arrays, name)
    names = meta["layer_names"]
    if not isinstance(names, list) or not names or not all(isinstance(v, str) for v in names):
        raise ExportError(f"{name} is not a binary-EP export (meta layer_names is {names!r})")
    model = Model(name, meta, [_layer(arrays, name, v) for v in names])
    _check_chain(model, name)
    return model


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
