"""Compiled CPU kernels (``cpu_kernels.c``), built with the system's C compiler on first use.

Two kernels of the convolutional network's relaxation:

* ``unpool_conv_transpose``: the feedback through a max-pool,
  ``base + conv_transpose2d(max_unpool2d(s, indices), w, padding)``, computed from the pooled
  state without the unpooled zeros (a quarter of the arithmetic for ``--Fpool 2``);
* ``conv_delta``: a convolution of a state kept up to date from one step to the next by adding
  the convolution of what changed, visiting only the inputs that changed;
* ``unpool_conv_transpose_delta``: the feedback kept up to date the same way.

The shared library
is built once per source version and CPU into ``$XDG_CACHE_HOME/binary-eqprop`` (default
``~/.cache/binary-eqprop``, or the system's temporary folder if that cannot be written), with
``-O3 -march=native``; concurrent first runs each build into a temporary name and rename it, so
they never see a half-written library.

Where no C compiler works, the library cannot be loaded, or with ``EP_CPU_KERNELS=0`` in the
environment, ``available()`` is False and the network uses PyTorch's dense operations
(``conv2d``, ``max_unpool2d`` + ``conv_transpose2d``) instead: the same numbers (to float32
rounding), more slowly.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.c")
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # the second for compilers without -march=native
_LOCK = threading.Lock()
_STATE = {}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def _cache_dirs():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(base, "binary-eqprop"), os.path.join(tempfile.gettempdir(), "binary-eqprop")]


def _build():
    """Path of the compiled library (building it if needed) or None, with the reason."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None, "no C compiler (cc, gcc or clang) was found"
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + compiler.encode() + _cpu_name().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    reason = "the cache folder could not be written"
    for folder in _cache_dirs():
        lib = os.path.join(folder, f"cpu_kernels-{key}.so")
        if os.path.exists(lib):
            return lib, None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".building-", dir=folder)
            os.close(fd)
        except OSError:
            continue
        try:
            for flags in FLAG_SETS:
                run = subprocess.run([compiler, *flags, "-std=c99", "-fPIC", "-shared", SOURCE, "-o", tmp],
                                     capture_output=True, text=True)
                if run.returncode == 0:
                    os.replace(tmp, lib)
                    return lib, None
            lines = (run.stderr or run.stdout).strip().splitlines()
            reason = f"{os.path.basename(compiler)} failed: {lines[-1] if lines else 'no message'}"
        except OSError as e:
            reason = f"{os.path.basename(compiler)} could not run: {e}"
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        break
    return None, reason


def _load():
    if os.environ.get("EP_CPU_KERNELS", "1") == "0":
        return None
    lib, reason = _build()
    fns = None
    if lib is not None:
        try:
            dll = ctypes.CDLL(lib)
            fns = (dll.unpool_conv_transpose, dll.conv_delta, dll.unpool_conv_transpose_delta)
        except (OSError, AttributeError) as e:  # e.g. a cache folder mounted noexec
            reason = f"{lib} could not be loaded: {e}"
    if fns is None:
        print(f"note: the compiled CPU kernels are unavailable ({reason}); the convolutional network "
              "uses PyTorch's dense convolutions instead, which give the same results "
              "more slowly", file=sys.stderr)
        return None
    for fn, restype, pointers, sizes in zip(fns, (ctypes.c_int, ctypes.c_int64, ctypes.c_int64),
                                            (5, 5, 6), (11, 10, 12)):
        fn.restype = restype
        fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * sizes
    return fns


def _kernel():
    with _LOCK:
        if "fn" not in _STATE:
            _STATE["fn"] = _load()
        return _STATE["fn"]


def available():
    """Whether the compiled kernels can be used (building it on the first call)."""
    return _kernel() is not None


def unpool_conv_transpose(s, indices, weight, conv_size, padding, fpool, base=None, out=None):
    """``base + conv_transpose2d(max_unpool2d(s, indices, output_size=conv_size), weight, padding)``
    for float32 CPU tensors: ``s`` and ``indices`` (B, C, Hp, Wp) and ``weight`` (C, Co, K, K)
    (a ``Conv2d`` weight) in the channels-last memory layout; ``base``, if given, and the result
    (B, Co, Ho, Wo) channels-last, written into ``out`` when given (it may be ``base``).  Requires
    ``available()``."""
    fn = _kernel()[0]
    b, c, hp, wp = s.shape
    co, k = weight.shape[1], weight.shape[2]
    hc, wc = conv_size
    ho, wo = hc + k - 1 - 2 * padding, wc + k - 1 - 2 * padding
    f32, result = torch.float32, (b, co, ho, wo)
    _check_tensors("unpool_conv_transpose", ("s", s, s.shape, f32), ("indices", indices, s.shape, torch.int64),
                   ("weight", weight, (c, co, k, k), f32), ("base", base, result, f32), ("out", out, result, f32))
    if out is None:
        out = torch.empty(result, dtype=f32, memory_format=torch.channels_last)
    status = fn(s.data_ptr(), indices.data_ptr(), weight.data_ptr(),
                None if base is None else base.data_ptr(), out.data_ptr(),
                b, c, hp, wp, wc, fpool, co, ho, wo, k, padding)
    _check_status("unpool_conv_transpose", status, fpool)
    return out


def _check_tensors(fname, *specs):
    """Each ``(name, tensor, shape, dtype)`` (a None tensor is skipped): that shape, dense
    channels-last, that dtype on the CPU, or one ValueError naming the function and tensor."""
    for name, t, shape, dtype in specs:
        if t is None:
            continue
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{fname}: {name} has shape {tuple(t.shape)}, not {tuple(shape)}")
        if not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"{fname}: {name} must be channels-last")
        if t.device.type != "cpu" or t.dtype != dtype:
            raise ValueError(f"{fname}: {name} must be a {dtype} CPU tensor")


def _check_status(name, status, fpool):
    if status == -1:
        raise MemoryError(f"{name}: out of memory for its scratch space")
    if status == -2:
        raise ValueError(f"{name}: an index lies outside its {fpool}x{fpool} pooling window")


def unpool_conv_transpose_delta(s, indices, prev_s, prev_idx, weight, acc, padding, fpool, max_changed=1.0):
    """Bring ``acc = conv_transpose2d(max_unpool2d(prev_s, prev_idx), weight, padding)`` up to
    date for ``(s, indices)``, which are then copied into ``prev_s``/``prev_idx``, visiting only
    the pooled values whose value or index changed; a sample in which more than the fraction
    ``max_changed`` of them changed is recomputed in full.  Tensors as for
    ``unpool_conv_transpose`` (``prev_s``/``prev_idx`` like ``s``/``indices``, ``acc`` like its
    result; the unpooled size is ``Hc = Ho - K + 1 + 2 padding``).  Returns how many samples
    were recomputed in full.  Requires ``available()``."""
    fn = _kernel()[2]
    b, c, hp, wp = s.shape
    co, k = weight.shape[1], weight.shape[2]
    ho, wo = acc.shape[2], acc.shape[3]
    wc = wo - k + 1 + 2 * padding
    f32, i64 = torch.float32, torch.int64
    _check_tensors("unpool_conv_transpose_delta", ("s", s, s.shape, f32), ("indices", indices, s.shape, i64),
                   ("prev_s", prev_s, s.shape, f32), ("prev_idx", prev_idx, s.shape, i64),
                   ("weight", weight, (c, co, k, k), f32), ("acc", acc, (b, co, ho, wo), f32))
    status = fn(s.data_ptr(), indices.data_ptr(), prev_s.data_ptr(), prev_idx.data_ptr(), weight.data_ptr(),
                acc.data_ptr(), b, c, hp, wp, wc, fpool, co, ho, wo, k, padding, int(max_changed * c * hp * wp))
    _check_status("unpool_conv_transpose_delta", status, fpool)
    return status


def flipped_weight(weight):
    """A ``Conv2d`` weight (Co, Ci, K, K) as ``conv_delta`` takes it: flipped in both spatial
    dimensions, (Ci, Co, K, K), channels-last (memory [Ci][K][K][Co])."""
    return weight.flip(2, 3).transpose(0, 1).contiguous(memory_format=torch.channels_last)


def conv_delta(s, prev, wt, acc, padding, max_changed=1.0):
    """Bring ``acc = conv2d(prev, weight, padding=padding) + c`` up to date for the input ``s``:
    ``acc += conv2d(s - prev, weight, padding)`` and ``prev`` becomes a copy of ``s``, visiting
    only the inputs that changed, in each sample where at most the fraction ``max_changed`` of
    the input values changed.  The others are left alone (the dense convolution is faster for
    them) and marked in the returned (B,) bool tensor.  ``s``, ``prev`` (B, Ci, H, W) and ``acc``
    (B, Co, Ho, Wo) float32 channels-last CPU tensors, ``wt = flipped_weight(weight)``.
    Requires ``available()``."""
    fn = _kernel()[1]
    b, ci, h, w = s.shape
    co, k = wt.shape[1], wt.shape[2]
    ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    f32 = torch.float32
    _check_tensors("conv_delta", ("s", s, s.shape, f32), ("prev", prev, s.shape, f32),
                   ("wt", wt, (ci, co, k, k), f32), ("acc", acc, (b, co, ho, wo), f32))
    skipped = torch.empty(b, dtype=torch.uint8)
    limit = int(max_changed * ci * h * w)
    if fn(s.data_ptr(), prev.data_ptr(), wt.data_ptr(), acc.data_ptr(), skipped.data_ptr(),
          b, ci, h, w, co, ho, wo, k, padding, limit) < 0:
        raise MemoryError("conv_delta: out of memory for its scratch space")
    return skipped.bool()
