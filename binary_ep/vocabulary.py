"""The command-line vocabulary, importable without torch (so that ``--help`` and most bad
invocations answer at once): the data sets, activations, image sizes and sample counts, the
convolution geometry of DESIGN.md section 5 (``conv_geometry``), ``UserError`` (the one-line error
a user can fix), the argparse ``Parser`` with one-line errors, the seed's ``-- layersList``
spelling and numbers glued to the next flag (``fix_seed_spelling``)."""

import argparse
import re
from collections import namedtuple

ACTIVATIONS = ("hardsigm", "sigm", "tanh", "heaviside")  # heaviside: binary neurons, and only they
BINARY_SETTINGS = ("bin_W", "bin_W_N")  # binary weights; binary weights and binary neurons
DATASETS = ("mnist", "fashion_mnist", "digits", "cifar10")
# (channels, height, width) of each data set's images; all have 10 classes.
INPUT_SHAPE = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "digits": (1, 8, 8),
               "cifar10": (3, 32, 32)}
N_CLASSES = 10
# (training, test) samples of each data set (digits: scikit-learn's 1797 images, split 1437/360)
N_SAMPLES = {"mnist": (60000, 10000), "fashion_mnist": (60000, 10000), "digits": (1437, 360),
             "cifar10": (50000, 10000)}
# The most relaxation steps --T and --Kmax accept (a file the NumPy model reads is held to it too).
MAX_STEPS = 1_000_000


class UserError(Exception):
    """A mistake the user can fix: one sentence, printed without a traceback, exit code 2."""


LayerGeometry = namedtuple("LayerGeometry", "name input conv pool")
LayerGeometry.__doc__ = """Sizes of one convolution layer: ``input``, ``conv`` (after the
convolution) and ``pool`` (after the max-pool) as (channels, height, width)."""


def _ordinal(n):
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _sizes(input_shape, channels, kernel, padding, fpool):
    """Per-layer geometry, input side first, for the given padding (sizes may be <= 0)."""
    c, h, w = input_shape
    layers = []
    for c_out in reversed(channels[:-1]):
        hc, wc = h - kernel + 1 + 2 * padding, w - kernel + 1 + 2 * padding
        hp, wp = (hc - fpool) // fpool + 1, (wc - fpool) // fpool + 1
        layers.append(((c, h, w), (c_out, hc, wc), (c_out, hp, wp)))
        c, h, w = c_out, hp, wp
    return layers


def _first_bad(layers):
    for k, (_, conv, pool) in enumerate(layers):
        if min(conv[1:]) <= 0 or min(pool[1:]) <= 0:
            return k
    return None


def conv_geometry(args, input_shape):
    """The sizes of every convolution layer, top first (``conv0`` first), as ``LayerGeometry``.

    conv out = in - kernelSize + 1 + 2 padding; pool out = floor((conv out - Fpool) / Fpool) + 1.
    A layer whose size reaches 0 raises ``UserError``: one sentence naming the layer and the
    smallest ``--padding`` that keeps every layer at least 1x1 (at most the images' largest
    side, the most ``--padding`` accepts, ``binary_ep.limits``).
    """
    channels, k, p, fp = list(args.convList), args.kernelSize, args.padding, args.Fpool
    layers = _sizes(input_shape, channels, k, p, fp)
    bad = _first_bad(layers)
    if bad is not None:
        n = len(layers)
        name = f"conv{n - 1 - bad}"
        _, conv, pool = layers[bad]
        size = "x".join(str(max(v, 0)) for v in (conv[1:] if min(conv[1:]) <= 0 else pool[1:]))
        stage = "its convolution" if min(conv[1:]) <= 0 else f"its {fp}x{fp} max-pool"
        fix = next((q for q in range(p + 1, max(input_shape[1:]) + 1)
                    if _first_bad(_sizes(input_shape, channels, k, q, fp)) is None), None)
        advice = (f"--padding {fix} keeps every layer at least 1x1" if fix is not None else
                  "use fewer convolution layers or a smaller --kernelSize/--Fpool")
        raise UserError(f"with --padding {p}, --kernelSize {k} and --Fpool {fp}, layer {name} (the "
                        f"{_ordinal(bad + 1)} convolution from the input, {layers[bad][0][0]}->{conv[0]} "
                        f"channels) shrinks to {size} after {stage}; {advice}")
    return [LayerGeometry(f"conv{n}", *layers[len(layers) - 1 - n]) for n in range(len(layers))]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``main.py: error: <what is wrong and how to fix it>``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # "-1e-6" is a negative value, not an option (argparse alone only knows "-1" and "-.5")
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see python main.py --help)\n")

    def note(self, message):
        """One line on stderr, ``main.py: note: <message>``, for input read other than as typed."""
        self._print_message(f"{self.prog}: note: {message}\n")


# a number glued to the flag after it, as in the paper's line "--classi_threshold 8e-8--conv_threshold"
GLUED = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(--[A-Za-z_]\w*)$")


def fix_seed_spelling(argv, parser):
    """Accept the seed's ``-- layersList`` (a space after ``--``) as ``--layersList``, and a
    number glued to the flag after it (``8e-8--conv_threshold``, a known option string) as the
    two arguments it was meant to be, saying so in one line on stderr."""
    names = {a.dest for a in parser._actions}
    out, i = [], 0
    while i < len(argv):
        glued = GLUED.match(argv[i])
        if argv[i] == "--" and i + 1 < len(argv) and argv[i + 1] in names:
            out.append("--" + argv[i + 1])
            i += 1
        elif glued and glued.group(2) in parser._option_string_actions:
            out += glued.groups()
            parser.note(f"read {argv[i]!r} as the two arguments {glued.group(1)!r} {glued.group(2)!r} "
                        f"(a space was missing)")
        else:
            out.append(argv[i])
        i += 1
    return out
