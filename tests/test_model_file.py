"""The reader of the 1-bit export file (``binary_ep.model_file``): a malformed ``binary_model.npz``
is one line from ``load_model`` (``ExportError``) and from ``python -m binary_ep.numpy_reference``
(exit 2), whatever is wrong in it; nothing is allocated from a size the file does not hold.

Every file here starts as the real export of a tiny untrained digits conv network (fc0 10x32 on
conv0 2x1x3x3, about 5 kB) and is spoiled in one place."""
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import main
from binary_ep import model_file as mf, numpy_reference as nr, vocabulary
from binary_ep.export import export_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONV = ("--device -1 --archi conv --dataset digits --layersList 10 --convList 2 1 --kernelSize 3 "
             "--padding 1 --Fpool 2 --T 6 --Kmax 3 --gamma 1e-3 1e-3 --gradThreshold 1e-5 1e-5 "
             "--lrBias 0.1 0.1")
HUGE = 2 ** 45
# a conv0 shape whose int64 product wraps to 18, the true conv0's number of weights
WRAP = 9 * pow(5, -1, 2 ** 63) % 2 ** 63
WRAPPED = [2, 1, 5, WRAP]


@pytest.fixture(scope="module")
def export():
    torch.manual_seed(0)
    return export_bytes(main.build_network(main.parse(TINY_CONV.split())[1]))


def members(data):
    """The zip members of ``data``, name -> bytes, in the file's order."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def rezip(parts, compression=zipfile.ZIP_STORED):
    """A zip of ``parts`` (name -> bytes), every CRC-32 computed afresh."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, blob in parts.items():
            z.writestr(name, blob)
    return buf.getvalue()


def npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def meta_of(data):
    return json.loads(np.load(io.BytesIO(members(data)["meta.npy"])).tobytes())


def with_arrays(data, arrays):
    """``data`` with ``arrays`` (name -> ndarray, "fc0.alpha" ...) replaced or added."""
    parts = members(data)
    parts.update({k + ".npy": npy(v) for k, v in arrays.items()})
    return rezip(parts)


def with_meta_text(data, text):
    parts = members(data)
    parts["meta.npy"] = npy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8))
    return rezip(parts)


def with_meta(data, edit):
    meta = meta_of(data)
    edit(meta)
    return with_meta_text(data, json.dumps(meta))


def with_header(data, member, old, new):
    """The .npy header of ``member`` with ``old`` replaced by ``new`` (the same length: the
    padding spaces absorb it)."""
    parts = members(data)
    blob = parts[member]
    end = 10 + int.from_bytes(blob[8:10], "little")
    header = blob[10:end].replace(old, new)
    header = header.rstrip(b" \n")
    header += b" " * (end - 10 - len(header) - 1) + b"\n"
    parts[member] = blob[:10] + header + blob[end:]
    return rezip(parts)


def set_key(path, value):
    """An edit of the meta dict: ``path`` "a.b" or "layers.1.shape"."""
    def edit(meta):
        *outer, last = path.split(".")
        node = meta
        for k in outer:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[int(last) if isinstance(node, list) else last] = value
    return edit


def deep_meta(data):
    text = json.dumps(meta_of(data))
    return with_meta_text(data, text[:-1] + ', "deep": ' + "[" * 100000 + "]" * 100000 + "}")


def flagged(data, bits):
    """``data`` with the general purpose flags of its first central directory entry set to ``bits``."""
    d = bytearray(data)
    at = d.find(b"PK\x01\x02")
    d[at + 8:at + 10] = bits.to_bytes(2, "little")
    return bytes(d)


MAX = vocabulary.MAX_STEPS
BAD = {  # how the file is spoiled -> (the spoiled bytes from the export's, words of the one line)
    "wrapping shape": (lambda d: with_meta(with_arrays(d, {"conv0.shape": np.array(WRAPPED)}),
                                           set_key("layers.1.shape", WRAPPED)),
                       f"conv0.bits holds 3 bytes for {10 * WRAP} weights"),
    "wrapping shape, meta unchanged": (lambda d: with_arrays(d, {"conv0.shape": np.array(WRAPPED)}),
                                       f"conv0.shape is (2, 1, 5, {WRAP}), meta layers says [2, 1, 3, 3]"),
    "2^45-value member": (lambda d: with_header(d, "fc0.bias.npy", b"(10,)", f"({HUGE},)".encode()),
                          f"fc0.bias declares {HUGE} values of 4 bytes, its member holds 40 bytes of data"),
    "deeply nested meta": (deep_meta, "meta nests 100001 levels deep, an export's at most 8"),
    "alpha inf": (lambda d: with_arrays(d, {"fc0.alpha": np.array([np.inf], "<f4")}),
                  "fc0.alpha holds inf, an export's scaling factors are finite and > 0"),
    "alpha 0": (lambda d: with_arrays(d, {"conv0.alpha": np.array([0.5, 0.0], "<f4")}),
                "conv0.alpha holds 0, an export's scaling factors are finite and > 0"),
    "alpha negative": (lambda d: with_arrays(d, {"fc0.alpha": np.array([-0.25], "<f4")}),
                       "fc0.alpha holds -0.25, an export's scaling factors are finite and > 0"),
    "NaN bias": (lambda d: with_arrays(d, {"fc0.bias": np.full(10, np.nan, "<f4")}),
                 "fc0.bias holds nan, an export's biases are finite"),
    "T 1e30": (lambda d: with_meta(d, set_key("T", 1e30)),
               f"meta T is 1e+30, an export writes an integer from 1 to {MAX}"),
    "T 10**30": (lambda d: with_meta(d, set_key("T", 10 ** 30)),
                 f"meta T is {10 ** 30}, an export writes an integer from 1 to {MAX}"),
    "T 0": (lambda d: with_meta(d, set_key("T", 0)), f"meta T is 0, an export writes an integer from 1 to {MAX}"),
    "T above MAX_STEPS": (lambda d: with_meta(d, set_key("T", MAX + 1)),
                          f"meta T is {MAX + 1}, an export writes an integer from 1 to {MAX}"),
    "Kmax true": (lambda d: with_meta(d, set_key("Kmax", True)),
                  f"meta Kmax is True, an export writes null or an integer from 1 to {MAX}"),
    "initial state": (lambda d: with_meta(d, set_key("initial_state", 0.5)),
                      "meta initial_state is 0.5, an export writes 1.0"),
    "padding negative": (lambda d: with_meta(d, set_key("padding", -1)),
                       "meta padding is -1, an export writes an integer >= 0"),
    "divide_by 0": (lambda d: with_meta(d, set_key("input_scaling.divide_by", 0)),
                    "meta input_scaling is {'divide_by': 0,"),
    "std infinite": (lambda d: with_meta(d, lambda m: m["input_scaling"].update(mean=[0.5], std=[float("inf")])),
                     "meta input_scaling is {'divide_by': 16.0, 'mean': [0.5], 'std': [inf],"),
    "unknown key": (lambda d: with_meta(d, set_key("extra", 1)),
                    "meta holds the key 'extra', which an export never writes"),
    "layer alpha": (lambda d: with_meta(d, set_key("layers.0.alpha", "per_unit")),
                    "meta layers[0] is {'alpha': 'per_unit',"),
    "layer geometry": (lambda d: with_meta(d, set_key("layers.1.pool", [2, 5, 5])),
                       "conv0 reads (1, 8, 8) into (2, 8, 8), pooled (2, 4, 4); meta layers says [1, 8, 8], "
                       "[2, 8, 8], [2, 5, 5]"),
    "n_classes": (lambda d: with_meta(d, set_key("n_classes", 9)), "fc0 has 10 outputs, meta n_classes says 9"),
    "layersList": (lambda d: with_meta(d, set_key("layersList", [12])),
                   "meta layersList [12] and convList [2, 1] are not the layers' sizes [10] and [2, 1]"),
    "duplicate key": (lambda d: with_meta_text(d, json.dumps(meta_of(d))[:-1] + ', "T": 7}'),
                      "meta repeats the key 'T'"),
    "compressed": (lambda d: rezip(members(d), zipfile.ZIP_DEFLATED),
                   "its member format_version.npy is compressed (method 8); an export is an uncompressed zip"),
    "encrypted flag": (lambda d: flagged(d, 1),
                       "its member format_version.npy has the zip flags 0x1 (encryption or patches)"),
    "extra member": (lambda d: with_arrays(d, {"junk": np.zeros(3)}), "its member junk.npy is not part of"),
    "float64 alpha": (lambda d: with_arrays(d, {"fc0.alpha": np.array([0.5])}),
                      "fc0.alpha is <f8, an export stores it as <f4"),
    "2-D bias": (lambda d: with_arrays(d, {"fc0.bias": np.zeros((2, 5), "<f4")}),
                 "fc0.bias has the shape (2, 5), an export's arrays are 1-D"),
}


@pytest.mark.parametrize("how", list(BAD))
def test_a_malformed_file_is_one_line(how, export, tmp_path, capsys):
    spoil, words = BAD[how]
    (tmp_path / "S-1").mkdir()
    path = tmp_path / "S-1" / "binary_model.npz"
    path.write_bytes(spoil(export))
    with pytest.raises(mf.ExportError) as e:
        mf.load_model(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path} is not a binary-EP export (")
    assert words in message, message
    capsys.readouterr()
    assert nr.main([str(path)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_the_tiny_export_itself_loads(export, tmp_path):
    """The unspoiled file (so that each error above comes from its one change)."""
    path = tmp_path / "binary_model.npz"
    path.write_bytes(export)
    model = mf.load_model(path)
    assert [l.name for l in model.layers] == ["fc0", "conv0"] and model.T == 6
    assert model.conv[0].pool == (2, 4, 4) and model.fc[0].weight.shape == (10, 32)
    assert with_meta(export, lambda m: None) != export  # the helpers rewrite the file ...
    path.write_bytes(with_meta(export, lambda m: None))
    assert mf.load_model(path).meta == model.meta  # ... and a rewritten file still loads


def test_the_command_line_prints_no_traceback(export, tmp_path):
    path = tmp_path / "binary_model.npz"
    path.write_bytes(BAD["2^45-value member"][0](export))
    done = subprocess.run([sys.executable, "-m", "binary_ep.numpy_reference", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"error: {path} is not a binary-EP export (fc0.bias declares {HUGE} values")
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_the_step_bound_is_the_command_lines():
    assert mf.MAX_STEPS == vocabulary.MAX_STEPS


def mutants(data):
    """Deterministic damaged copies of ``data``: (what, bytes).  Truncations and byte flips of the
    file (the zip's local headers, member data, central directory and end record), then byte
    flips inside the members with the CRC-32 computed afresh (the .npy headers, the JSON meta,
    the arrays' data), which only the reader's own checks can catch."""
    n, masks = len(data), (0x01, 0x20, 0x80, 0xFF)
    directory, end = data.find(b"PK\x01\x02"), data.rfind(b"PK\x05\x06")
    cuts = set(np.linspace(0, n - 1, 40).astype(int).tolist()) | {directory, directory + 20, end, end + 12, n - 1}
    for at in sorted(cuts):
        yield f"cut at {at}", data[:at]
    flips = (set(np.linspace(0, n - 1, 64).astype(int).tolist()) | set(range(30))  # (a local header)
             | set(range(directory, directory + 64)) | set(range(end, n)))
    for k, at in enumerate(sorted(flips)):
        d = bytearray(data)
        d[at] ^= masks[k % 4]
        yield f"flip {masks[k % 4]:#x} at {at}", bytes(d)
    parts = members(data)
    for member, blob in parts.items():
        start = 10 + int.from_bytes(blob[8:10], "little")
        where = list(range(0, start, 1 if member == "fc0.bias.npy" else 7))  # the .npy header
        where += list(range(start, len(blob), 23 if member == "meta.npy" else 1))  # JSON, or the data
        for k, at in enumerate(where):
            b = bytearray(blob)
            b[at] ^= masks[k % 4]
            yield f"{member} flip {masks[k % 4]:#x} at {at}", rezip(dict(parts, **{member: bytes(b)}))


def test_every_mutant_loads_as_a_model_or_fails_with_one_line(export, tmp_path):
    """Each mutant is a one-line ExportError or a model whose free phase runs (states in [0, 1]);
    no other exception, ever."""
    path = tmp_path / "binary_model.npz"
    pixels = (np.arange(2 * 64).reshape(2, 1, 8, 8) * 7) % 17
    loaded, failed, changed = 0, 0, 0
    original = members(export)
    for what, data in mutants(export):
        path.write_bytes(data)
        try:
            model = mf.load_model(path)
        except mf.ExportError as e:
            assert "\n" not in str(e) and str(e).startswith(str(path)), what
            failed += 1
            continue
        pred, out = nr.free_phase(model, nr.scale_input(model, pixels), T=min(model.T, 4))
        assert out.shape == (2, 10) and np.all((out >= 0) & (out <= 1)) and pred.shape == (2,), what
        loaded += 1
        changed += members(data) != original
    print(f"\n{loaded + failed} mutants: {loaded} load, {changed} of them with other member bytes; {failed} fail")
    assert loaded + failed >= 600 and failed >= 400 and changed >= 50


# -- the neuron model's keys (binary neurons, output populations) -----------------------------------
NEURON_KEYS = ("neurons", "rho_threshold", "gamma_neur", "expand_output")


def as_binary(meta):
    """An edit of the meta dict: the network's neurons binary (the activation heaviside)."""
    meta.update(activation="heaviside", neurons="binary", rho_threshold=0.5, gamma_neur=0.5)


def without(*keys):
    return lambda meta: [meta.pop(k) for k in keys]


def edits(*steps):
    return lambda meta: [step(meta) for step in steps]


BAD_NEURONS = {  # an edit of the rate export's meta -> words of the one line
    "gamma_neur 0": (edits(as_binary, set_key("gamma_neur", 0)),
                     "meta gamma_neur is 0, an export writes a number above 0, at most 1"),
    "gamma_neur 1.5": (edits(as_binary, set_key("gamma_neur", 1.5)),
                       "meta gamma_neur is 1.5, an export writes a number above 0, at most 1"),
    "gamma_neur text": (edits(as_binary, set_key("gamma_neur", "0.5")),
                        "meta gamma_neur is '0.5', an export writes a number above 0, at most 1"),
    "rho_threshold 1.5": (edits(as_binary, set_key("rho_threshold", 1.5)),
                          "meta rho_threshold is 1.5, an export writes a number from 0 to 1"),
    "rho_threshold NaN": (edits(as_binary, set_key("rho_threshold", float("nan"))),
                          "meta rho_threshold is nan, an export writes a number from 0 to 1"),
    "rho_threshold -0.1": (edits(as_binary, set_key("rho_threshold", -0.1)),
                           "meta rho_threshold is -0.1, an export writes a number from 0 to 1"),
    "rate with a threshold": (set_key("rho_threshold", 0.5),
                              "meta rho_threshold is 0.5, an export writes null for rate neurons"),
    "rate with gamma_neur": (set_key("gamma_neur", 0.5),
                             "meta gamma_neur is 0.5, an export writes null for rate neurons"),
    "expand_output 0": (set_key("expand_output", 0), "meta expand_output is 0, an export writes an integer >= 1"),
    "expand_output true": (set_key("expand_output", True),
                           "meta expand_output is True, an export writes an integer >= 1"),
    "expand_output 2.0": (set_key("expand_output", 2.0),
                          "meta expand_output is 2.0, an export writes an integer >= 1"),
    "expand_output 2": (set_key("expand_output", 2),
                        "fc0 has 10 outputs, meta n_classes says 10 classes of expand_output 2 outputs each"),
    "binary neurons, hardsigm": (set_key("neurons", "binary"),
                                 "meta neurons is 'binary', an export writes \"rate\" with the activation hardsigm"),
    "heaviside, rate neurons": (edits(as_binary, set_key("neurons", "rate")),
                                "meta neurons is 'rate', an export writes \"binary\" with the activation heaviside"),
    "spiking neurons": (set_key("neurons", "spiking"),
                        "meta neurons is 'spiking', an export writes \"rate\" with the activation hardsigm"),
    "some neuron keys": (without("gamma_neur"), "meta lacks gamma_neur"),
    "heaviside, no neuron keys": (edits(without(*NEURON_KEYS), set_key("activation", "heaviside")),
                                  "meta lacks neurons, rho_threshold, gamma_neur, expand_output"),
}


@pytest.mark.parametrize("how", list(BAD_NEURONS))
def test_a_bad_neuron_model_is_one_line(how, export, tmp_path, capsys):
    edit, words = BAD_NEURONS[how]
    path = tmp_path / "binary_model.npz"
    path.write_bytes(with_meta(export, edit))
    with pytest.raises(mf.ExportError) as e:
        mf.load_model(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path} is not a binary-EP export (")
    assert words in message, message
    assert nr.main([str(path)]) == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_the_neuron_model_is_in_the_file(export, tmp_path, capsys):
    """The export writes the neuron keys (rate: the constants null, one output a class); the same
    file edited to binary neurons loads with their constants; a file written before the keys
    existed (none of them) loads as rate neurons with one output a class and relaxes the same."""
    meta = meta_of(export)
    assert {k: meta[k] for k in NEURON_KEYS} == {"neurons": "rate", "rho_threshold": None, "gamma_neur": None,
                                                "expand_output": 1}
    path, x = tmp_path / "binary_model.npz", np.random.RandomState(0).rand(3, 1, 8, 8)
    path.write_bytes(export)
    model = mf.load_model(path)
    assert (model.neurons, model.rho_threshold, model.gamma_neur, model.expand_output) == ("rate", None, None, 1)
    pred, out = nr.free_phase(model, x)
    path.write_bytes(with_meta(export, without(*NEURON_KEYS)))
    old = mf.load_model(path)
    assert (old.neurons, old.rho_threshold, old.gamma_neur, old.expand_output) == ("rate", None, None, 1)
    old_pred, old_out = nr.free_phase(old, x)
    assert np.array_equal(old_out, out) and np.array_equal(old_pred, pred)
    path.write_bytes(with_meta(export, edits(as_binary, set_key("rho_threshold", 0.25), set_key("gamma_neur", 1))))
    binary = mf.load_model(path)
    assert (binary.neurons, binary.rho_threshold, binary.gamma_neur, binary.expand_output) == ("binary", 0.25, 1, 1)
    assert binary.activation == "heaviside"
    assert np.array_equal(binary.layers[1].signs, np.sign(binary.layers[1].weight))
    assert binary.layers[1].signs.dtype == np.int8
    assert nr.main([str(path)]) == 0
    assert "binary neurons (rho_threshold 0.25, gamma_neur 1)" in capsys.readouterr().out
