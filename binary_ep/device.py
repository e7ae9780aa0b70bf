"""How a run computes on the device it was given (DESIGN.md section 11): why CUDA cannot be used,
when it cannot, and the set-up of the chosen device (``binary_ep.distributed.select_device``
chooses it).

* ``cuda_problem(index)``: None when this torch's kernels can run on GPU ``index``, else why not
  (a torch built without CUDA, no NVIDIA driver, a driver too old for the build's CUDA, no GPU
  visible, or a GPU whose architecture the build has no kernels for) and what to do, as a clause
  for the one warning of a run that falls back to the CPU.
* ``prepare(device, tf32)``: float32 stays float32 (TF32 only with ``--tf32 1``, on a GPU), cuDNN
  picks deterministic algorithms, and a GPU becomes the current CUDA device.
"""

import os
import re
import warnings

import torch

QUIET = "give --device -1 to run on the CPU without this warning"


def cuda_problem(index=0):
    """Why CUDA cannot run this torch's kernels on GPU ``index``, as a clause ending in what to do;
    None when it can (also for an ``index`` beyond the node's GPUs: the caller names those).  The
    warnings torch gives on the way (the driver's, the architecture's) are left out: the caller
    prints one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not torch.cuda.is_available():
            return _unavailable()
        if torch.version.hip is not None or index >= torch.cuda.device_count():
            return None  # ROCm names its architectures otherwise (gfx...), and runs what it loads
        arches = torch.cuda.get_arch_list()
        major, minor = torch.cuda.get_device_capability(index)
        if not arches or _runs_on(arches, major, minor):
            return None
        return (f"GPU {index} ({torch.cuda.get_device_name(index)}) has compute capability {major}.{minor} "
                f"(sm_{major}{minor}), which torch {torch.__version__} has no kernels for (it has "
                f"{', '.join(arches)}); install a torch built for sm_{major}{minor}, or {QUIET}")


def _unavailable():
    """Why ``torch.cuda.is_available()`` is False, from the build and from the error
    ``torch.cuda.init()`` gives."""
    build = f"torch {torch.__version__}"
    if torch.version.cuda is None and torch.version.hip is None:
        return f"{build} is built without CUDA; install a CUDA build of torch, or {QUIET}"
    try:
        torch.cuda.init()
        text = ""
    except Exception as e:  # noqa: BLE001 - its message is the reason
        text = str(e).strip()
    old = re.search(r"too old \(found version (\d+)\)", text)
    if old:  # the driver's version is the newest CUDA it runs, 1000 major + 10 minor
        found = int(old.group(1))
        cuda = f"{found // 1000}.{found % 1000 // 10}"
        return (f"the NVIDIA driver (version {found}, for CUDA {cuda}) is too old for {build}, built for "
                f"CUDA {torch.version.cuda}; update the driver, or install a torch built for CUDA "
                f"{cuda} or older")
    if "too old" in text:
        return (f"the NVIDIA driver is too old for {build}, built for CUDA {torch.version.cuda}; update "
                f"the driver, or install a torch built for an older CUDA")
    if "no NVIDIA driver" in text:
        return (f"no NVIDIA driver was found (this machine has no NVIDIA GPU, or its driver is not "
                f"installed); {QUIET}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})"
    if "No CUDA GPUs are available" in text:
        return f"the NVIDIA driver shows no GPU{shown}; {QUIET}"
    said = f": {text.splitlines()[0]}" if text else ""
    return f"CUDA could not start{shown}{said}; {QUIET}"


def _runs_on(arches, major, minor):
    """Whether code built for one of ``arches`` (``torch.cuda.get_arch_list()``) runs on a GPU of
    compute capability ``major.minor``: machine code ``sm_XY`` on major version X from minor Y on
    (``sm_XYa``, architecture-specific, on X.Y alone), PTX ``compute_XY`` (compiled by the
    driver) on every capability from X.Y on."""
    for arch in arches:
        parsed = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
        if parsed is None:
            continue
        kind, x, y, suffix = parsed.group(1), int(parsed.group(2)), int(parsed.group(3)), parsed.group(4)
        if kind == "compute" and (x, y) <= (major, minor):
            return True
        if kind == "sm" and x == major and (y == minor if suffix == "a" else y <= minor):
            return True
    return False


def prepare(device, tf32=False):
    """Set up ``device`` (a ``torch.device``) for a run; returns it.

    * Float32 is computed in float32: cuDNN's convolutions default to TF32 on Ampere and later GPUs
      (10-bit mantissa products, a relative error near 1e-3, where the flip thresholds act on
      gradients of 1e-8 that are differences of two correlations), and so would matmuls at a
      precision below "highest".  ``tf32`` (``--tf32 1``) allows TF32 for both, on a GPU only
      (on the CPU, "high" would let oneDNN use it too).
    * cuDNN picks deterministic algorithms and does not benchmark (its choice could differ from
      run to run).  PyTorch's global deterministic mode stays off: it would make ``max_unpool2d``
      raise, which has no deterministic CUDA kernel (its writes do not collide here: the pooling
      windows do not overlap).
    * A GPU becomes the current CUDA device, so that pinned memory, the data loader and the CUDA
      context are made on it, not on GPU 0.
    """
    fast = bool(tf32) and device.type == "cuda"
    torch.set_float32_matmul_precision("high" if fast else "highest")
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device
