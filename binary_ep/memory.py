"""The memory a network needs, estimated from its sizes before anything is allocated, and the
memory this process can get: ``check_memory`` refuses, in one ``UserError`` sentence, a network
that cannot fit.  Torch-free except the CUDA query (``device_available_bytes``).

The estimate (``estimate``) is a lower bound: it counts only tensors a run is sure to hold at the
same time, in bytes (float32 = 4, int64 max-pool indices = 8), with W the elements of every weight
tensor, b those of every bias and B, B_t the samples of a training and a test batch this process
relaxes (``--batchSize``, ``--test_batchSize``, at most the samples used, a data-parallel rank's
share of them):

* ``parameters``: 4 (W + b); ``filter buffers``: 4 W (the flip rule's low-pass filter ``m``);
  ``gradients``: 4 (W + b), less the fc input layer's weights, whose gradient stays two factors;
  on a GPU ``flip scratch``: the flip rule's 3 blocks shaped like the largest layer.
* ``training batch``: 3 sets of states (the free fixed point, the nudged phase's states and the
  scratch set it steps into), the input, the input drive (fc: ``W_in x``, (n_1, B); conv: the
  bottom convolution pooled, with its int64 indices), the max-pool indices each phase's last step
  records (conv), and the batch's copies of weights (fc: the transposes of every layer but the
  input one; conv: the top classifier weight reordered, the channels-last convolution weights).
* ``test batch``: 2 sets of states, the input, the drive and the copies of a test batch.

``needed_bytes`` = the persistent parts + the larger of the two batches (never held together).
For ``--export`` only the parameters and filter buffers (the loaded checkpoint) are counted.
Temporaries of single operations, the allocator's rounding and the data set (already loaded when
the network is built, so it is part of what is no longer available) are not counted.
"""

import math
import os

from binary_ep.vocabulary import INPUT_SHAPE, N_SAMPLES, UserError, conv_geometry

FLOAT, INDEX = 4, 8
GIB = 2 ** 30
MEMINFO, CGROUP, MOUNTINFO = "/proc/meminfo", "/proc/self/cgroup", "/proc/self/mountinfo"
UNLIMITED = 2 ** 60  # a cgroup v1 limit this high means none (the kernel writes 2^63 - 4096)
CGROUP_FILES = {"2": ("memory.max", "memory.current"),  # (limit, usage) of cgroup v2 and v1
                "1": ("memory.limit_in_bytes", "memory.usage_in_bytes")}


def _counts(args):
    """Element counts of the network ``args`` describes: ``weights`` (one per weight tensor),
    ``biases``, ``outer`` (weights whose gradient stays two factors), ``copies`` (weights copied
    per batch), and per sample ``states``, ``inputs``, ``drive`` (float32), ``drive_index`` and
    ``step_index`` (int64: the drive's and one phase's recorded max-pool indices)."""
    if args.archi == "fc":
        units = list(args.layersList)  # input first
        weights = [a * b for a, b in zip(units, units[1:])]
        return {"weights": weights, "biases": sum(units[1:]), "outer": weights[0],
                "copies": sum(weights[1:]), "states": sum(units[1:]), "inputs": units[0],
                "drive": units[1], "drive_index": 0, "step_index": 0}
    shape, k = INPUT_SHAPE[args.dataset], args.kernelSize
    geometry = conv_geometry(args, shape)  # top first
    sizes = list(reversed(args.layersList)) + [math.prod(geometry[0].pool)]  # output first
    classifier = [sizes[i] * sizes[i + 1] for i in range(len(sizes) - 1)]
    convs = [g.conv[0] * g.input[0] * k * k for g in geometry]
    return {"weights": classifier + convs,
            "biases": sum(sizes[:-1]) + sum(g.conv[0] for g in geometry), "outer": 0,
            "copies": classifier[-1] + sum(w for w, g in zip(convs, geometry) if g.input[0] > 1 and k > 1),
            "states": sum(args.layersList) + sum(math.prod(g.pool) for g in geometry),
            "inputs": math.prod(shape), "drive": math.prod(geometry[-1].pool),
            "drive_index": math.prod(geometry[-1].pool),
            "step_index": sum(math.prod(g.pool) for g in geometry[:-1])}


def _batch(args, size, subset, split, world):
    """Samples of one batch this process relaxes: ``size`` capped by the samples used, shared
    among ``world`` ranks (the largest share)."""
    samples = subset if subset is not None else N_SAMPLES[args.dataset][split]
    return -(-min(size, samples) // world)


def estimate(args, device_type, world=1):
    """The parts of the lower estimate (module docstring) in bytes, ``{name: bytes}``, for a
    network on ``device_type`` (``"cpu"`` or ``"cuda"``) in a run of ``world`` processes."""
    c = _counts(args)
    w, b = sum(c["weights"]), c["biases"]
    parts = {"parameters": FLOAT * (w + b), "filter buffers": FLOAT * w}
    if getattr(args, "export", False):
        return parts
    parts["gradients"] = FLOAT * (w - c["outer"] + b)
    if device_type == "cuda":
        parts["flip scratch"] = 3 * FLOAT * max(c["weights"])
    train = _batch(args, args.batchSize, args.trainSubset, 0, world)
    test = _batch(args, args.test_batchSize, args.testSubset, 1, world)
    parts["training batch"] = FLOAT * (train * (3 * c["states"] + c["inputs"] + c["drive"]) + c["copies"]) \
        + INDEX * train * (c["drive_index"] + 2 * c["step_index"])
    parts["test batch"] = FLOAT * (test * (2 * c["states"] + c["inputs"] + c["drive"]) + c["copies"]) \
        + INDEX * test * c["drive_index"]
    return parts


def needed_bytes(args, device_type, world=1):
    """The lower estimate in bytes: the persistent parts plus the larger batch."""
    parts = estimate(args, device_type, world)
    batches = [parts.pop(name, 0) for name in ("training batch", "test batch")]
    return sum(parts.values()) + max(batches)


def gib(n):
    """``n`` bytes in GiB, as the messages write it (3 significant digits, whole GiB from 1000)."""
    return f"{n / GIB:.3g}" if n < 1000 * GIB else f"{n / GIB:.0f}"


def _read_int(path):
    """The integer in the file ``path`` (None: unreadable, or ``max``)."""
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def meminfo_available():
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or None."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_mounts():
    """``[(version, root, mount point)]`` of the cgroup file systems: ``"2"`` (cgroup v2) or
    ``"1"`` (a v1 hierarchy with the memory controller), from ``/proc/self/mountinfo``."""
    found = []
    try:
        with open(MOUNTINFO) as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        head, _, tail = line.partition(" - ")
        fields, fs = head.split(), tail.split()
        if len(fields) < 5 or len(fs) < 3:
            continue
        if fs[0] == "cgroup2" or (fs[0] == "cgroup" and "memory" in fs[2].split(",")):
            found.append(("2" if fs[0] == "cgroup2" else "1", fields[3], fields[4]))
    return found


def cgroup_headroom():
    """The least ``limit - usage`` in bytes over this process's memory cgroup and its parents
    (v2: ``memory.max - memory.current``; v1: ``memory.limit_in_bytes - memory.usage_in_bytes``),
    or None where no limit is set or none can be read."""
    paths = {}
    try:
        with open(CGROUP) as f:
            for line in f.read().splitlines():
                hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
                if hierarchy == "0" and controllers == "":
                    paths["2"] = path
                elif "memory" in controllers.split(","):
                    paths["1"] = path
    except OSError:
        return None
    best = None
    for version, root, mount in _cgroup_mounts():
        if version not in paths:
            continue
        path = paths[version]
        relative = path[len(root):] if root != "/" and path.startswith(root) else path
        folder, top = os.path.normpath(os.path.join(mount, relative.lstrip("/"))), os.path.normpath(mount)
        while folder.startswith(top):
            limit, usage = (_read_int(os.path.join(folder, name)) for name in CGROUP_FILES[version])
            if limit is not None and usage is not None and limit < UNLIMITED:
                best = max(0, limit - usage) if best is None else min(best, max(0, limit - usage))
            if folder == top:
                break
            folder = os.path.dirname(folder)
    return best


def cpu_available_bytes():
    """The CPU memory this process can still get, in bytes: the smaller of ``MemAvailable`` and
    the cgroup's headroom (``cgroup_headroom``); None where neither can be read."""
    known = [v for v in (meminfo_available(), cgroup_headroom()) if v is not None]
    return min(known) if known else None


def device_available_bytes(device):
    """Free memory of the CUDA ``device`` in bytes (``torch.cuda.mem_get_info``)."""
    import torch
    return torch.cuda.mem_get_info(device)[0]


def _refuse(need, available, where, what="weights, flip-rule filters, gradients and the states of a batch"):
    if available is not None and need > available:
        raise UserError(f"the network needs at least {gib(need)} GiB of {where} ({what}), but only "
                        f"{gib(available)} GiB is available; give smaller --layersList sizes (or "
                        f"--convList channels) or a smaller --batchSize / --test_batchSize")


def check_memory(args, device, world=1):
    """Raise ``UserError`` when ``needed_bytes`` exceeds the memory available on ``device`` (a
    ``torch.device``) for one of ``world`` processes; a network for a GPU is made in CPU memory
    first, so its parameters must fit there too.  Where the available memory cannot be read,
    nothing is refused."""
    if device.type == "cuda":
        _refuse(needed_bytes(args, "cuda", world), device_available_bytes(device), f"GPU memory on {device}")
        _refuse(estimate(args, "cuda", world)["parameters"], cpu_available_bytes(),
                f"CPU memory to make it before it moves to {device}", "its weights and biases")
    else:
        _refuse(needed_bytes(args, "cpu", world), cpu_available_bytes(), "CPU memory")
