"""The range of every numeric argument, checked before anything touches the disk, and the seeds
derived from ``--seed``.  Importable without torch, like ``binary_ep.vocabulary``.

``check_arguments(args)`` raises ``UserError`` naming the first flag out of its range, the range
and the value.  The ranges:

* ``--T``, ``--Kmax``: 1 .. ``MAX_STEPS`` (relaxation steps).
* ``--batchSize``, ``--test_batchSize``, ``--epochs``, ``--epochDecayLrAlpha``, ``--trainSubset``,
  ``--testSubset``: 1 .. ``MAX_COUNT`` = 2^31 - 1.
* ``--layersList`` sizes and ``--convList`` channels: 1 .. ``MAX_UNITS`` = 2^32 - 1, so that no size
  can overflow torch's 64-bit element counts; whether the network fits in memory is checked
  from the sizes before it is built (``binary_ep.memory``).
* ``--kernelSize``, ``--Fpool``: 1 .. S and ``--padding`` 0 .. S, S the largest side of the data
  set's images (8 digits, 28 MNIST, 32 CIFAR-10): more is never a sensible convolution.
* ``--expand_output``: 1 .. ``MAX_EXPAND`` = (2^31 - 1) // 10 = 214748364 output neurons per
  class, so that the output layer's 10 x E units stay a 32-bit count.
* ``--workers``: 0 .. ``MAX_WORKERS``; ``--device``: -1 (the CPU) .. ``MAX_DEVICE`` (torch keeps
  a device index in 8 bits).
* ``--seed``: 0 .. 2^32 - 1: torch's CPU generator keeps only the low 32 bits of a seed, so wider
  seeds would repeat runs; ``derived_seeds`` keeps every seed made from it distinct and in range.
* floats (``--gamma*``, ``--gradThreshold``/``--*_threshold``, ``--lrBias``, ``--lrAlpha``,
  ``--decayLrAlpha``, ``--beta``): the value rounded to float32, the precision of the tensors,
  must be finite and normal (at least ``FLOAT32_TINY`` = 2^-126 in size), or exactly 0 where 0 is
  allowed (thresholds and learning rates); ``--gamma`` in (0, 1], the learning rates, thresholds
  and ``--decayLrAlpha`` not negative (``--decayLrAlpha`` positive), every ``lrAlpha /
  decayLrAlpha`` a finite float32.  ``--beta`` (either sign) also keeps the EP step's factor
  ``1 / (beta B)`` (``1 / (2 beta B)`` with ``--nudging symmetric``) a normal float32 for every
  mini-batch size B from 1 to ``--batchSize`` (a data-parallel run's global batch is at most it).
* binary neurons (``--binary_settings bin_W_N``; ``bin_W`` runs do not carry these): ``--gamma_neur``
  in (0, 1] (normal in float32, as ``--gamma``); ``--rho_threshold`` in [0, 1] (states live in
  [0, 1]), any float32 there, 0 and subnormals included: it is only compared with the states.
"""

import math
import struct

from binary_ep.vocabulary import INPUT_SHAPE, MAX_STEPS, N_CLASSES, UserError

MAX_COUNT = 2 ** 31 - 1
MAX_EXPAND = MAX_COUNT // N_CLASSES
MAX_UNITS = 2 ** 32 - 1
MAX_WORKERS = 256
MAX_DEVICE = 127
SEED_SPACE = 2 ** 32
FLOAT32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]  # 3.40e38
FLOAT32_TINY = 2.0 ** -126  # the smallest normal float32, 1.18e-38

SIZE_LISTS = ("layersList", "convList")
# float flags: (0 allowed, upper bound or None); the split conv spellings first, so that a bad
# value is named as it was typed (normalise merged them into --gamma / --gradThreshold)
FLOAT_LISTS = {"gamma_classi": (False, 1.0), "gamma_conv": (False, 1.0), "gamma": (False, 1.0),
               "classi_threshold": (True, None), "conv_threshold": (True, None),
               "gradThreshold": (True, None), "lrBias": (True, None), "lrAlpha": (True, None)}


def float32(value):
    """``value`` rounded to the nearest float32, as a Python float (+-inf beyond its range)."""
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def normal32(value):
    """Whether ``value`` rounds to a finite, normal float32 (not 0, not subnormal)."""
    v = abs(float32(value))
    return FLOAT32_TINY <= v <= FLOAT32_MAX


def int_ranges(args):
    """``{flag: (lowest, highest, note)}`` of every integer flag (``SIZE_LISTS``: of each size)."""
    side = max(INPUT_SHAPE[args.dataset][1:])
    image = f" (at most the {side}-pixel side of {args.dataset}'s images)"
    steps, count = (1, MAX_STEPS, ""), (1, MAX_COUNT, "")
    return {"T": steps, "Kmax": steps, "batchSize": count, "test_batchSize": count, "epochs": count,
            "epochDecayLrAlpha": count, "trainSubset": count, "testSubset": count,
            "expand_output": (1, MAX_EXPAND, f" (the output layer has {N_CLASSES} x this many units)"),
            "layersList": (1, MAX_UNITS, ""), "convList": (1, MAX_UNITS, ""),
            "kernelSize": (1, side, image), "Fpool": (1, side, image), "padding": (0, side, image),
            "workers": (0, MAX_WORKERS, ""), "device": (-1, MAX_DEVICE, " (-1: the CPU)"),
            "seed": (0, SEED_SPACE - 1, " (torch's CPU generator keeps 32 bits of a seed)")}


def _check_int(name, value, low, high, note):
    if not low <= value <= high:
        kind = "a positive integer" if low == 1 else "an integer"
        if name in SIZE_LISTS:
            raise UserError(f"--{name} sizes must be positive integers in {low}..{high}, got {value}")
        raise UserError(f"--{name} must be {kind} in {low}..{high}{note}, got {value}")


def _check_float(name, value, zero_ok, high):
    v = float32(value)
    if zero_ok:
        ok, rng = value == 0 or (value > 0 and normal32(value)), "0 or more"
        span = f"0 or a normal float32 in [{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}]"
    elif high:
        ok, rng, span = 0 < value <= high and normal32(value), "in (0, 1]", f"at least {FLOAT32_TINY:.3g}"
    else:
        ok, rng = value > 0 and normal32(value), "positive"
        span = f"a normal float32 in [{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}]"
    if not ok:
        what = " values" if name in FLOAT_LISTS else ""
        raise UserError(f"--{name}{what} must be {rng} ({span}), got {value}{_in_float32(value, v)}")


def _in_float32(value, rounded):
    """What float32 makes of a finite ``value`` that it cannot hold, in words ('' otherwise)."""
    if not math.isfinite(value) or value == 0:
        return ""
    if math.isinf(rounded):
        return " (infinite in float32)"
    if rounded == 0:
        return " (0 in float32)"
    return " (subnormal in float32)" if abs(rounded) < FLOAT32_TINY else ""


def check_beta(args):
    """``--beta``'s rule (module docstring); raises ``UserError``."""
    factor = 2 if args.nudging == "symmetric" else 1
    beta, batch = args.beta, args.batchSize
    ok = math.isfinite(beta) and beta != 0 and normal32(beta) and \
        all(normal32(1.0 / (factor * abs(beta) * b)) for b in (1, batch))
    if not ok:
        high = min(FLOAT32_MAX, 1.0 / (factor * batch * FLOAT32_TINY))
        two = "2 " if factor == 2 else ""
        raise UserError(f"--beta must be a finite non-zero number with |beta| in [{FLOAT32_TINY:.3g}, "
                        f"{high:.3g}] (a normal float32 whose 1/({two}beta B) stays a normal float32 "
                        f"for every batch size B up to --batchSize {batch}), got {beta}"
                        f"{_in_float32(beta, float32(beta))}")


def check_arguments(args, names=None):
    """Range-check the numeric flags ``names`` of ``args`` (default: all of them); the first one
    out of range raises ``UserError``."""
    ints = int_ranges(args)
    scalars = {"beta", "decayLrAlpha", "gamma_neur", "rho_threshold"}
    chosen = set(ints) | set(FLOAT_LISTS) | scalars if names is None else set(names)
    for name, (low, high, note) in ints.items():
        value = getattr(args, name, None) if name in chosen else None
        for v in (value if name in SIZE_LISTS and value is not None else [value]):
            if v is not None:
                _check_int(name, v, low, high, note)
    for name, (zero_ok, high) in FLOAT_LISTS.items():
        for v in (getattr(args, name, None) or []) if name in chosen else []:
            _check_float(name, v, zero_ok, high)
    if "decayLrAlpha" in chosen:
        _check_float("decayLrAlpha", args.decayLrAlpha, False, None)
        for v in args.lrAlpha if "lrAlpha" in chosen else []:
            if not math.isfinite(float32(v / args.decayLrAlpha)):
                raise UserError(f"--lrAlpha / --decayLrAlpha must stay a finite float32 (at most "
                                f"{FLOAT32_MAX:.3g}), got {v} / {args.decayLrAlpha} = "
                                f"{v / args.decayLrAlpha:.3g}")
    if "beta" in chosen:
        check_beta(args)
    if "gamma_neur" in chosen and getattr(args, "gamma_neur", None) is not None:
        _check_float("gamma_neur", args.gamma_neur, False, 1.0)
    rho = getattr(args, "rho_threshold", None) if "rho_threshold" in chosen else None
    if rho is not None and not 0 <= rho <= 1:  # (NaN fails too)
        raise UserError(f"--rho_threshold must be a finite number in [0, 1] (the neurons' states lie "
                        f"in [0, 1]), got {rho}")


def derived_seeds(seed):
    """The seeds a run draws from ``--seed`` (0 .. 2^32 - 1): ``torch`` (torch's global
    generator), ``numpy`` (NumPy's), ``data`` (shuffling; CIFAR-10 augmentation hashes the seed
    itself) are the seed, ``beta`` (the sign of beta) is ``(seed + 1) mod 2^32``: all in range,
    the last distinct from the others.  The same generators as ever for every seed (torch uses
    the low 32 bits of a wider one)."""
    seed %= SEED_SPACE
    return {"torch": seed, "numpy": seed, "data": seed, "beta": (seed + 1) % SEED_SPACE}
