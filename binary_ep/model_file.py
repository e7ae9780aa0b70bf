"""Reading a 1-bit export file (``binary_model.npz``, written by ``binary_ep.export``) with NumPy
alone, the whole file checked before anything is built from it.

``load_model(path)`` returns a ``Model``, or raises ``ExportError``: one line that names the
file and what is wrong with it, for anything an export never holds.  The checks, in order:

* the zip (``zipfile`` reads its directory): every member an uncompressed, unencrypted
  ``<array>.npy`` whose sizes fit in the file; only then are the members read (CRC-checked);
* each member: an NPY 1.0 header of a 1-D C-order array of the dtype the format gives that
  array (``DTYPES``) that declares exactly the bytes the member holds (sizes are Python ints:
  nothing wraps, and no array is allocated from a size the file does not hold);
* ``format_version`` 1, then ``meta``: UTF-8 JSON nested at most ``MAX_META_DEPTH`` levels, no
  key twice, every key ``binary_ep.export.meta_for`` writes and no other, each of the type and
  range it writes (``T`` and ``Kmax`` integers 1..``MAX_STEPS``, finite input scaling, ...); the
  neuron model's keys (``NEURON_KEYS``) all or none: a file written before them holds rate
  neurons with one output per class;
* the layers: the members of exactly ``meta["layer_names"]``, the shapes ``meta["layers"]``
  gives (their product against the length of the sign bits), finite alpha > 0 and finite
  biases, and the sizes from ``input_shape`` through every layer to the ``n_classes`` outputs
  as ``meta["layers"]``, ``layersList`` and ``convList`` say, ``expand_output`` outputs a class.
"""

import json
import math
import os
import re
import struct
import zipfile
import zlib

import numpy as np

FORMAT_VERSION = 1
KINDS = ("fc", "conv")
ACTIVATIONS = ("hardsigm", "sigm", "tanh", "heaviside")  # heaviside: binary neurons, and only they
NEURONS = ("rate", "binary")
NEURON_KEYS = ("neurons", "rho_threshold", "gamma_neur", "expand_output")
# The most relaxation steps --T and --Kmax accept: binary_ep.vocabulary.MAX_STEPS (this module
# imports nothing of the project; a test holds the two equal).
MAX_STEPS = 1_000_000
MAX_META_DEPTH = 8  # the exporter's meta nests 4 levels: meta, layers, a layer, its sizes
PARTS = ("bits", "shape", "alpha", "bias")
# the dtype of each array: format_version and meta, then <layer>.<part> by its part
DTYPES = {"format_version": "<i8", "meta": "|u1", "bits": "|u1", "shape": "<i8", "alpha": "<f4",
          "bias": "<f4"}
_FLAGS = 0x0808  # the zip flags a member may carry: a data descriptor follows it, a UTF-8 name
_NPY_HEADER = re.compile(r"\{'descr': '([^']*)', 'fortran_order': (True|False), 'shape': \(([^()]*)\), \} *\n")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_LAYER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# what zipfile can raise on a damaged archive
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, OverflowError,
               NotImplementedError, struct.error, zlib.error)
_FIX = "export the run again: python main.py --resume S-<n> --export"


class ExportError(ValueError):
    """A file that is not a readable binary-EP export (one line that names the file), or a
    network that cannot be written as one (``binary_ep.export``)."""


class Layer:
    """One layer: ``name``, ``kind`` ("fc" or "conv"), ``signs`` int8 +1/-1 of shape ``shape``,
    (out, in) or (out_channels, in_channels, kh, kw), ``weight`` float32 ``alpha * signs``,
    ``alpha`` float32 (1,) or (out_channels,), ``bias`` float32 (out,); convolutions also
    ``input``, ``conv``, ``pool``: the (C, H, W) sizes of their input, of the convolution and of
    the max-pool.  ``set_bits`` builds ``signs`` and ``weight`` from the packed sign bits (None
    until then: ``load_model`` calls it once the whole file is checked)."""

    def __init__(self, name, kind, alpha, bias, shape):
        self.name, self.kind, self.alpha, self.bias = name, kind, alpha, bias
        self.shape, self.signs, self.weight = tuple(shape), None, None
        self.input = self.conv = self.pool = None

    def set_bits(self, bits):
        """``signs`` and ``weight`` from ``bits`` (uint8 (ceil(N/8),), ``numpy.packbits`` order)."""
        self.signs = unpack_signs(bits, self.shape, np.int8)
        a = self.alpha.reshape((-1,) + (1,) * (len(self.shape) - 1)) if self.alpha.size > 1 else self.alpha[0]
        self.weight = (self.signs * a).astype(np.float32)
        return self


class Model:
    """A loaded export: ``path``, ``meta`` (the JSON dict), ``layers`` (output first), ``fc`` and
    ``conv`` (the two parts, each output/top first), ``activation``, ``T``, ``padding``,
    ``kernel_size``, ``pool_size``, ``input_shape`` (C, H, W); the neuron model: ``neurons``
    ("rate" or "binary"), ``rho_threshold`` and ``gamma_neur`` (binary; None for rate) and
    ``expand_output`` E, the output units of each class (class c owns units cE ... cE + E - 1);
    meta without the neuron keys (an older file) means rate neurons and E = 1."""

    def __init__(self, path, meta, layers):
        self.path, self.meta, self.layers = path, meta, layers
        self.fc = [l for l in layers if l.kind == "fc"]
        self.conv = [l for l in layers if l.kind == "conv"]
        self.activation, self.T = meta["activation"], int(meta["T"])
        self.padding, self.kernel_size = meta.get("padding"), meta.get("kernel_size")
        self.pool_size = meta.get("pool_size")
        self.input_shape = tuple(int(v) for v in meta["input_shape"])
        self.neurons, self.expand_output = meta.get("neurons", "rate"), int(meta.get("expand_output", 1))
        self.rho_threshold, self.gamma_neur = meta.get("rho_threshold"), meta.get("gamma_neur")


def _one_line(e):
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def _clip(text, limit=80):
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short(v):
    return _clip(repr(v))


def _fail(name, reason):
    raise ExportError(f"{name} is not a binary-EP export ({' '.join(reason.split())}); {_FIX}")


def unpack_signs(bits, shape, dtype=np.float32):
    """Sign bits (``numpy.packbits`` order) -> +1/-1 array of ``shape`` and ``dtype``."""
    on = np.unpackbits(bits, count=math.prod(shape), bitorder="big").reshape(shape)
    return np.where(on == 1, dtype(1), dtype(-1))


# -- the zip and its .npy members ----------------------------------------------------------------
def _read_members(name):
    """The file's arrays, name -> 1-D ndarray (a read-only view of its member's bytes), once the
    zip directory and every .npy header were checked against the bytes they describe."""
    try:
        f = open(name, "rb")
    except FileNotFoundError:
        raise ExportError(f"{name} does not exist") from None
    except OSError as e:
        raise ExportError(f"{name} cannot be read ({_one_line(e)})") from None
    with f:
        try:
            head = f.read(4)
            if head.startswith(b"\x93NUM"):
                _fail(name, "a single .npy array, not an .npz archive")
            if head != b"PK\x03\x04":
                _fail(name, "not an .npz archive: no zip header at its start")
            size = os.fstat(f.fileno()).st_size
            with zipfile.ZipFile(f) as z:
                infos = z.infolist()
                _check_directory(name, infos, size)
                return {i.filename[:-4]: _npy(name, i.filename, z.read(i)) for i in infos}
        except ExportError:
            raise
        except _ZIP_ERRORS as e:
            _fail(name, f"a damaged or truncated .npz archive: {_one_line(e)}")


def _check_directory(name, infos, size):
    seen = set()
    for i in infos:
        member = i.filename
        if member in seen:
            _fail(name, f"it holds two members named {member}")
        seen.add(member)
        if not member.endswith(".npy"):
            _fail(name, f"its member {member} is not a .npy array")
        if i.compress_type != zipfile.ZIP_STORED:
            _fail(name, f"its member {member} is compressed (method {i.compress_type}); an export is an "
                        f"uncompressed zip")
        if i.flag_bits & ~_FLAGS:
            _fail(name, f"its member {member} has the zip flags {i.flag_bits:#x} (encryption or patches), "
                        f"which an export never sets")
        if i.file_size != i.compress_size or i.header_offset + i.compress_size > size:
            _fail(name, f"the zip directory gives its member {member} {i.compress_size} bytes "
                        f"({i.file_size} unpacked) at offset {i.header_offset} of a {size}-byte file")


def _npy(name, member, blob):
    """A member's bytes -> its 1-D array, after its NPY header was checked."""
    key = member[:-4]
    layer, _, part = key.rpartition(".")
    role = key if key in ("format_version", "meta") else part if layer and part in PARTS else None
    if role is None:
        _fail(name, f"its member {member} is not part of an export (format_version, meta, "
                    f"<layer>.bits/.shape/.alpha/.bias)")
    if len(blob) < 10 or blob[:8] != b"\x93NUMPY\x01\x00":
        _fail(name, f"its member {member} is not an NPY 1.0 array")
    start = 10 + int.from_bytes(blob[8:10], "little")
    header = _NPY_HEADER.fullmatch(blob[10:start].decode("latin-1")) if start <= len(blob) else None
    if header is None:
        _fail(name, f"its member {member} has a damaged .npy header")
    descr, fortran, dims = header.groups()
    if descr != DTYPES[role]:
        _fail(name, f"{key} is {_clip(descr)}, an export stores it as {DTYPES[role]}")
    count = re.fullmatch(r"(\d{1,30}),", dims)
    if count is None or fortran == "True":
        order = ", Fortran order" if fortran == "True" else ""
        _fail(name, f"{key} has the shape ({_clip(dims)}){order}, an export's arrays are 1-D in C order")
    count, itemsize = int(count.group(1)), np.dtype(descr).itemsize
    if count * itemsize != len(blob) - start:
        _fail(name, f"{key} declares {count} values of {itemsize} bytes, its member holds "
                    f"{len(blob) - start} bytes of data")
    return np.frombuffer(blob, descr, count, start)


def _array(arrays, key, name):
    if key not in arrays:
        _fail(name, f"the array {key} is missing")
    return arrays[key]


# -- meta --------------------------------------------------------------------------------------
def _meta(arrays, name):
    version = _array(arrays, "format_version", name)
    if version.shape != (1,):
        _fail(name, f"format_version has shape {version.shape}")
    if int(version[0]) != FORMAT_VERSION:
        raise ExportError(f"{name} has format version {int(version[0])}, this reader knows {FORMAT_VERSION}")
    meta = _json(_array(arrays, "meta", name).tobytes(), name)
    _check_meta(meta, name)
    return meta


def _json(raw, name):
    """meta's bytes -> dict: UTF-8 JSON, nested at most ``MAX_META_DEPTH`` levels (counted
    before parsing, outside strings), no key twice in an object."""
    marks = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    step = np.isin(marks, (0x5B, 0x7B)).astype(np.int64) - np.isin(marks, (0x5D, 0x7D))  # [{ and ]}
    depth = int(np.cumsum(step).max(initial=0))
    if depth > MAX_META_DEPTH:
        _fail(name, f"meta nests {depth} levels deep, an export's at most {MAX_META_DEPTH}")

    def pairs(items):
        seen = set()
        for key, _ in items:
            if key in seen:
                _fail(name, f"meta repeats the key {_short(key)}")
            seen.add(key)
        return dict(items)
    try:
        meta = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    except ExportError:
        raise
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        _fail(name, f"meta is not UTF-8 JSON: {_one_line(e)}")
    if not isinstance(meta, dict):
        _fail(name, f"meta is {_short(meta)}, not a JSON object")
    return meta


def _int(low, high=None):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(v):
    return isinstance(v, str) and v != ""


def _ints(n=None):
    """A test: a non-empty list of positive integers (of ``n`` of them)."""
    return lambda v: isinstance(v, list) and len(v) == (n or len(v)) > 0 and all(map(_int(1), v))


def _scaling(v, channels):
    if not isinstance(v, dict) or set(v) != {"text", "divide_by", "mean", "std"}:
        return False
    if not (_text(v["text"]) and _number(v["divide_by"]) and v["divide_by"] > 0):
        return False
    if v["mean"] is None and v["std"] is None:
        return True
    per_channel = [isinstance(u, list) and len(u) == channels and all(map(_number, u))
                   for u in (v["mean"], v["std"])]
    return all(per_channel) and all(u > 0 for u in v["std"])


def _layer_entry(v, name):
    """Whether ``v`` is the ``meta["layers"]`` entry of a layer ``name`` as the exporter writes it."""
    if not isinstance(v, dict) or v.get("kind") not in KINDS:
        return False
    conv = v["kind"] == "conv"
    sizes = ("input", "conv", "pool") if conv else ()
    return (set(v) == {"name", "kind", "shape", "alpha", *sizes} and v["name"] == name
            and _ints(4 if conv else 2)(v["shape"]) and v["alpha"] in ("per_layer", "per_output_channel")
            and all(_ints(3)(v[k]) for k in sizes))


def _meta_fields(meta):
    """key -> (test, what the exporter writes), for every key of meta; the tests run in order and
    may rely on the keys before theirs."""
    steps = f"an integer from 1 to {MAX_STEPS}"
    conv, binary = meta["archi"] == "conv", meta.get("activation") == "heaviside"

    def geometry(low):
        return (_int(low), f"an integer >= {low}") if conv else (lambda v: v is None, "null for an fc network")

    def names(v):
        return (isinstance(v, list) and v and all(isinstance(u, str) and _LAYER_NAME.fullmatch(u) for u in v)
                and len(set(v)) == len(v))
    return {
        "format": (lambda v: v == "binary-ep", '"binary-ep"'),
        "format_version": (lambda v: _int(FORMAT_VERSION, FORMAT_VERSION)(v), str(FORMAT_VERSION)),
        "archi": (lambda v: v in KINDS, '"fc" or "conv"'),
        "activation": (lambda v: v in ACTIVATIONS, " or ".join(ACTIVATIONS)),
        "activation_definition": (_text, "its formula"),
        "T": (_int(1, MAX_STEPS), steps),
        "Kmax": (lambda v: v is None or _int(1, MAX_STEPS)(v), "null or " + steps),
        "padding": geometry(0), "kernel_size": geometry(1), "pool_size": geometry(1),
        "initial_state": (lambda v: _number(v) and v == 1, "1.0"),
        "n_classes": (_int(1), "an integer >= 1"),
        "layer_names": (names, "a list of distinct names of letters, digits and _"),
        "layers": (lambda v: isinstance(v, list) and len(v) == len(meta["layer_names"]),
                   "one entry per layer name"),
        "dataset": (_text, "a data set's name"),
        "input_shape": (_ints(3), "[C, H, W], positive integers"),
        "input_scaling": (lambda v: _scaling(v, meta["input_shape"][0]),
                          "{text, divide_by > 0, mean and std: null, or a finite number per channel, std > 0}"),
        "layersList": (_ints(), "a list of positive integers"),
        "convList": (_ints(), "a list of positive integers") if conv else
                    (lambda v: v is None, "null for an fc network"),
        "conventions": (lambda v: isinstance(v, dict) and all(isinstance(u, str) for u in v.values()),
                        "{name: sentence}"),
        **(_neuron_fields(binary, meta.get("activation")) if set(NEURON_KEYS) & set(meta) or binary else {}),
    }


def _neuron_fields(binary, activation):
    """``_meta_fields`` of the neuron model's keys: ``binary`` neurons (the activation heaviside)
    with their threshold and filter constant, or rate neurons with neither; E outputs a class."""
    def binary_only(test, what):
        return (test, what) if binary else (lambda v: v is None, "null for rate neurons")
    return {
        "neurons": (lambda v: v == NEURONS[binary], f'"{NEURONS[binary]}" with the activation {activation}'),
        "rho_threshold": binary_only(lambda v: _number(v) and 0 <= v <= 1, "a number from 0 to 1"),
        "gamma_neur": binary_only(lambda v: _number(v) and 0 < v <= 1, "a number above 0, at most 1"),
        "expand_output": (_int(1), "an integer >= 1"),
    }


def _check_meta(meta, name):
    """Every key the exporter writes, of the type and range it writes, and no other."""
    if meta.get("format") != "binary-ep":
        _fail(name, f"meta format is {_short(meta.get('format'))}, an export's is \"binary-ep\"")
    if meta.get("archi") not in KINDS:
        _fail(name, f"meta archi is {_short(meta.get('archi'))}, an export writes \"fc\" or \"conv\"")
    fields = _meta_fields(meta)
    missing = [k for k in fields if k not in meta]
    if missing:
        _fail(name, f"meta lacks {', '.join(missing)}")
    unknown = sorted(k for k in meta if k not in fields)
    if unknown:
        _fail(name, f"meta holds the key {_short(unknown[0])}, which an export never writes")
    activation = meta["activation"]
    if isinstance(activation, str) and activation not in ACTIVATIONS:
        raise ExportError(f"{name} uses the activation {activation!r}, this reader knows {', '.join(ACTIVATIONS)}")
    for key, (test, what) in fields.items():
        if not test(meta[key]):
            _fail(name, f"meta {key} is {_short(meta[key])}, an export writes {what}")
    for i, (entry, layer) in enumerate(zip(meta["layers"], meta["layer_names"])):
        if not _layer_entry(entry, layer):
            _fail(name, f"meta layers[{i}] is {_short(entry)}, an export writes {{name {layer!r}, kind, "
                        f"shape, alpha \"per_layer\" or \"per_output_channel\", conv: input, conv, pool}}")


# -- the layers --------------------------------------------------------------------------------
def _layer(arrays, name, entry):
    """One layer from its four arrays, checked against ``entry``, its item of ``meta["layers"]``
    (its ``weight`` None: ``Layer.set_bits`` builds it once the whole file is checked)."""
    key = entry["name"] + "."
    shape = tuple(int(v) for v in _array(arrays, key + "shape", name).tolist())
    if list(shape) != entry["shape"]:
        _fail(name, f"{key}shape is {_short(shape)}, meta layers says {entry['shape']}")
    n, outs = math.prod(shape), shape[0]
    bits, alpha, bias = (_array(arrays, key + part, name) for part in ("bits", "alpha", "bias"))
    if bits.size != (n + 7) // 8:
        _fail(name, f"{key}bits holds {bits.size} bytes for {n} weights")
    if n % 8 and int(bits[-1]) & (0xFF >> (n % 8)):
        _fail(name, f"the unused bits of {key}bits are not 0")
    if alpha.shape != ((1,) if entry["alpha"] == "per_layer" else (outs,)):
        _fail(name, f"{key}alpha has shape {alpha.shape}, meta layers says {entry['alpha']} for {outs} outputs")
    bad = alpha[~(np.isfinite(alpha) & (alpha > 0))]
    if bad.size:
        _fail(name, f"{key}alpha holds {float(bad[0]):g}, an export's scaling factors are finite and > 0")
    if bias.shape != (outs,):
        _fail(name, f"{key}bias has shape {bias.shape} for {outs} outputs")
    bad = bias[~np.isfinite(bias)]
    if bad.size:
        _fail(name, f"{key}bias holds {float(bad[0]):g}, an export's biases are finite")
    return Layer(entry["name"], entry["kind"], alpha.astype(np.float32), bias.astype(np.float32), shape)


def _check_chain(model, name):
    """Every layer's input size matches what feeds it and what meta says; fills the conv geometry."""
    meta, kinds = model.meta, [l.kind for l in model.layers]
    archi = "conv" if model.conv else "fc"
    if kinds != sorted(kinds, key=KINDS.index) or not model.fc or meta["archi"] != archi:
        _fail(name, f"layers {kinds} do not make an {meta['archi']} network")
    size = model.input_shape
    entries = dict(zip(meta["layer_names"], meta["layers"]))
    if model.conv:
        k, p, f = model.kernel_size, model.padding, model.pool_size
        for layer in reversed(model.conv):
            c_out, c_in, kh, kw = layer.shape
            hc, wc = size[1] - kh + 1 + 2 * p, size[2] - kw + 1 + 2 * p
            if c_in != size[0] or kh != k or kw != k or min(hc, wc) < f:
                _fail(name, f"{layer.name} of shape {layer.shape} cannot read {size}")
            layer.input, layer.conv = size, (c_out, hc, wc)
            layer.pool = size = (c_out, (hc - f) // f + 1, (wc - f) // f + 1)
            said = [entries[layer.name][v] for v in ("input", "conv", "pool")]
            if said != [list(layer.input), list(layer.conv), list(layer.pool)]:
                _fail(name, f"{layer.name} reads {layer.input} into {layer.conv}, pooled {layer.pool}; meta "
                            f"layers says {', '.join(map(str, said))}")
    n_in = math.prod(size)
    for layer in reversed(model.fc):
        if layer.shape[1] != n_in:
            _fail(name, f"{layer.name} reads {layer.shape[1]} values, {n_in} feed it")
        n_in = layer.shape[0]
    if n_in != meta["n_classes"] * model.expand_output:
        _fail(name, f"{model.fc[0].name} has {n_in} outputs, meta n_classes says {meta['n_classes']} "
                    f"classes of expand_output {model.expand_output} outputs each")
    sizes = [l.shape[0] for l in reversed(model.fc)]
    if model.conv:
        channels = [l.shape[0] for l in model.conv] + [model.conv[-1].shape[1]]
    else:
        sizes, channels = [model.fc[-1].shape[1]] + sizes, None
    if meta["layersList"] != sizes or meta["convList"] != channels:
        _fail(name, f"meta layersList {_short(meta['layersList'])} and convList {_short(meta['convList'])} are "
                    f"not the layers' sizes {sizes} and {channels}")


def load_model(path):
    """Read a ``binary_model.npz``, checked whole (the module docstring), into a ``Model``.
    Raises ``ExportError`` (a ``ValueError``), one line naming the file, for a missing or
    unreadable file, anything an export never holds, or another format version."""
    name = os.fspath(path)
    arrays = _read_members(name)
    meta = _meta(arrays, name)
    names = meta["layer_names"]
    expected = ["format_version", "meta"] + [f"{v}.{part}" for v in names for part in PARTS]
    for key in expected:
        _array(arrays, key, name)
    extra = [k for k in arrays if k not in expected]
    if extra:
        _fail(name, f"its member {extra[0]}.npy is not part of an export of the layers {', '.join(names)}")
    model = Model(name, meta, [_layer(arrays, name, entry) for entry in meta["layers"]])
    _check_chain(model, name)
    for layer in model.layers:  # all checked: at most 40 bytes of int8 and float32 per byte of bits
        layer.set_bits(arrays[layer.name + ".bits"])
    return model
