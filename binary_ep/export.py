"""1-bit export of a trained binary-weight EP network (``binary_model.npz``).

A binary weight is ``alpha * sign(w)``, so a layer is stored as its sign bits packed 8 to a
byte, its scaling factor(s) alpha and its biases: 1/32 of the float32 weights, readable with
NumPy alone (``binary_ep.numpy_reference`` relaxes the network from this file).

File format (``FORMAT_VERSION`` = 1): a NumPy ``.npz`` archive (an uncompressed zip of ``.npy``
files) that loads with ``numpy.load(path, allow_pickle=False)``; every array is little-endian:

``format_version``  int64 (1,)      the format version, 1
``meta``            uint8 (n,)      UTF-8 JSON text: architecture, dynamics, conventions (``meta_for``)
``<name>.bits``     uint8 (ceil(N/8),)  ``numpy.packbits(w > 0)`` of the weight flattened in C order:
                                    the first weight in the most significant bit of byte 0; bit 1
                                    means ``+alpha``, bit 0 ``-alpha``; the unused low bits of the
                                    last byte are 0
``<name>.shape``    int64 (2,) or (4,)  the weight shape: fc (out, in); conv (out_channels,
                                    in_channels, kh, kw); N is its product
``<name>.alpha``    float32 (1,) or (out_channels,)  alpha of the layer (fc) or of each output
                                    channel (convolutions)
``<name>.bias``     float32 (out,) or (out_channels,)  the biases

``<name>`` runs over ``meta["layer_names"]``, output first (``fc0`` feeds the 10 outputs, then
``fc1`` ..., then ``conv0`` the top convolution ... the last convolution reads the image).  The
export reads the network only through ``binary_weights()``, ``biases()``, ``layer_names``,
``optW.param_groups[k]["per_channel"]``, ``args``, ``neurons`` (``kind``, and for binary neurons
``rho_threshold``, ``gamma_neur``), ``expand_output`` and, for convolutional networks, ``geometry``.
"""

import io
import json
import os

import numpy as np
import torch

from binary_ep.datasets import CIFAR10_MEAN, CIFAR10_STD
from binary_ep.files import write_bytes
from binary_ep.model_file import FORMAT_VERSION, ExportError
from binary_ep.vocabulary import INPUT_SHAPE

FILE_NAME = "binary_model.npz"

# data set -> how a stored pixel becomes the network's input (the shapes: ``INPUT_SHAPE``)
_SCALING = {
    "mnist": {"text": "pixel / 255", "divide_by": 255.0, "mean": None, "std": None},
    "fashion_mnist": {"text": "pixel / 255", "divide_by": 255.0, "mean": None, "std": None},
    "digits": {"text": "pixel / 16 (scikit-learn's 8x8 digits hold 0..16)", "divide_by": 16.0,
               "mean": None, "std": None},
    "cifar10": {"text": "ToTensor (pixel / 255), then (v - mean[c]) / std[c] per channel c",
                "divide_by": 255.0, "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},
}

ACTIVATIONS = {
    "hardsigm": "rho(a) = min(max(a, 0), 1)",
    "sigm": "rho(a) = 1 / (1 + exp(-4 (a - 0.5)))",
    "tanh": "rho(a) = min(max(tanh(a), 0), 1)",
    "heaviside": "binary neurons: a neuron of state s sends b = H(s - rho_threshold), 1 where "
                 "s >= rho_threshold, else 0 (conventions: binary_neurons)",
}

CONVENTIONS = {
    "layer_order": "output first: fc0 feeds the 10 output units, fc1 feeds fc0, ...; then conv0 "
                   "(the top convolution, read by the last fc layer) ... the last conv layer reads the image",
    "weight_value": "w[i] = alpha * (+1 if bit i is 1 else -1); conv: alpha of the output channel",
    "bit_order": "numpy.packbits, big bit order: weight i (C-order flat index) is bit 7 - i % 8 of "
                 "byte i // 8; unused bits of the last byte are 0",
    "fc_weight": "shape (out, in): s_out = W s_in",
    "conv_weight": "shape (out_channels, in_channels, kh, kw)",
    "classifier_input": "the last fc layer reads the top convolution's pooled state flattened in "
                        "(c, h, w) order; an fc network reads the image flattened in (c, h, w) order",
    "convolution": "cross-correlation (no kernel flip), stride 1, zero padding `padding` on every side, "
                   "plus the bias, then max-pool",
    "max_pool": "size and stride pool_size, no padding, trailing rows/columns dropped; the first "
                "maximum in row-major order within the window wins ties",
    "feedback": "top conv: (W_fc_last^T s_fc_last) reshaped (c, h, w); lower conv i: "
                "conv_transpose(unpool(s_{i-1}, pool indices of layer i-1 from this step), W_{i-1}, padding)",
    "dynamics": "every state starts at initial_state; T synchronous steps, each layer computed from "
                "the previous step's states; rate neurons: s <- rho(a) of the drive a above, every "
                "state clamped to [0, 1]",
    "binary_neurons": "neurons binary: every layer sends b = H(s - rho_threshold) (H(0) = 1) in place "
                      "of s, the input x stays full precision; a = the drive above with b for s (a "
                      "product with b is alpha times the integer count of +1 minus -1 weights over "
                      "the inputs where b = 1), a = 0 where |s - rho_threshold| > 0.5, then "
                      "s <- clamp((1 - gamma_neur) s + gamma_neur a, 0, 1)",
    "readout": "output unit u belongs to class u // expand_output; prediction = the class of the "
               "largest mean output state over its expand_output units (the first such class)",
}


def pack_signs(w):
    """Sign bits of ``w`` (any shape), flattened in C order, packed 8 to a byte: bit 1 where
    ``w > 0``; the first weight in the most significant bit; the unused bits are 0.
    Returns uint8 of shape (ceil(w.size / 8),)."""
    return np.packbits(np.ascontiguousarray(np.asarray(w) > 0).reshape(-1), bitorder="big")


def binary_alpha(w, per_channel, name="?"):
    """alpha of a weight stored as ``alpha * sign(w)``: float32 (1,) or (out_channels,) when
    ``per_channel``.  Raises ``ExportError`` when |w| is not the same within a layer (channel)
    or alpha is not positive."""
    w = np.asarray(w, dtype=np.float32)
    rows = np.abs(w.reshape(w.shape[0] if per_channel else 1, -1))
    alpha = rows.max(axis=1)
    if not np.all(np.isfinite(alpha)) or not np.all(alpha > 0):
        raise ExportError(f"layer {name} has a zero or non-finite scaling factor alpha")
    if np.any(rows < alpha[:, None] * (1 - 1e-6)):
        what = "an output channel" if per_channel else "the layer"
        raise ExportError(f"layer {name} is not binary: |w| takes more than one value within {what}")
    return alpha.astype("<f4")


def _input_of(args, input_size):
    """(input shape (C, H, W), input scaling dict) of the run's data set, checked against the
    number of inputs the network reads."""
    dataset = getattr(args, "dataset", None)
    if dataset not in _SCALING:
        raise ExportError(f"unknown data set {dataset!r}: cannot document the input")
    shape, scaling = INPUT_SHAPE[dataset], _SCALING[dataset]
    if input_size is not None and int(np.prod(shape)) != input_size:
        raise ExportError(f"the network reads {input_size} inputs, but {dataset} images are "
                          f"{'x'.join(map(str, shape))}")
    return list(shape), dict(scaling)


def _layers(net):
    """One dict per layer, output first: name, kind ("fc"/"conv"), weight (float32 ndarray),
    bias, per_channel, and for convolutions the geometry (input, conv, pool sizes (C, H, W))."""
    names = list(net.layer_names)
    weights, biases = net.binary_weights(), net.biases()
    groups = net.optW.param_groups
    if not (len(names) == len(weights) == len(biases) == len(groups)):
        raise ExportError("the network's layer names, weights, biases and optimizer groups differ in number")
    geometry = {g.name: g for g in getattr(net, "geometry", [])}
    layers = []
    for name, w, b, group in zip(names, weights, biases, groups):
        w = w.detach().to("cpu", torch.float32).numpy()
        b = b.detach().to("cpu", torch.float32).numpy().astype("<f4")
        kind = {2: "fc", 4: "conv"}.get(w.ndim)
        if kind is None or b.shape != (w.shape[0],):
            raise ExportError(f"layer {name}: weight {w.shape} and bias {b.shape} are neither fc nor conv")
        layer = {"name": name, "kind": kind, "weight": w, "bias": b,
                 "per_channel": bool(group["per_channel"])}
        if kind == "conv":
            if name not in geometry:
                raise ExportError(f"convolution {name} has no geometry")
            g = geometry[name]
            layer.update(input=list(g.input), conv=list(g.conv), pool=list(g.pool))
        layers.append(layer)
    return layers


def meta_for(net, layers=None):
    """The JSON-able description stored as ``meta``::

        format "binary-ep", format_version 1, archi "fc"|"conv", activation "hardsigm"|"sigm"|
        "tanh"|"heaviside" (activation_definition: its formula), neurons "rate"|"binary"
        (``net.neurons.kind``; binary with heaviside only), rho_threshold and gamma_neur (binary
        neurons' constants; null for rate), expand_output E (``net.expand_output``: output units
        a class, 10 E of them), T (free-phase steps), Kmax, padding,
        kernel_size, pool_size (conv; null for fc), initial_state 1.0, n_classes 10,
        layer_names (output first), layers [{name, kind "fc"|"conv", shape, alpha
        "per_layer"|"per_output_channel", conv only: input, conv, pool sizes [C, H, W]}],
        dataset, input_shape [C, H, W], input_scaling {text, divide_by, mean, std (null or
        per channel)}: input = (pixel / divide_by - mean[c]) / std[c], layersList, convList
        (the command line's lists), conventions {name: sentence} (bit order, layouts, pooling)
    """
    args = net.args
    layers = _layers(net) if layers is None else layers
    conv = [l for l in layers if l["kind"] == "conv"]
    archi = getattr(args, "archi", "conv" if conv else "fc")
    if (archi == "conv") != bool(conv):
        raise ExportError(f"--archi {archi} does not match the network's layers")
    input_size = None if conv else int(layers[-1]["weight"].shape[1])
    input_shape, scaling = _input_of(args, input_size)
    if conv and list(conv[-1]["input"]) != input_shape:
        raise ExportError(f"the bottom convolution reads {conv[-1]['input']}, the data set's images "
                          f"are {input_shape}")
    activation = args.activationFun
    if activation not in ACTIVATIONS:
        raise ExportError(f"unknown activation {activation!r}")
    neurons, E = _neuron_meta(net, activation), int(net.expand_output)
    outputs = int(layers[0]["weight"].shape[0])
    if E < 1 or outputs % E:
        raise ExportError(f"the output layer's {outputs} units are not --expand_output {E} units a class")
    meta = {
        "format": "binary-ep",
        "format_version": FORMAT_VERSION,
        "archi": archi,
        "activation": activation,
        "activation_definition": ACTIVATIONS[activation],
        "T": int(args.T),
        "Kmax": int(args.Kmax) if hasattr(args, "Kmax") else None,
        "padding": int(args.padding) if conv else None,
        "kernel_size": int(args.kernelSize) if conv else None,
        "pool_size": int(args.Fpool) if conv else None,
        "initial_state": 1.0,
        "n_classes": outputs // E,
        "expand_output": E,
        **neurons,
        "layer_names": [l["name"] for l in layers],
        "layers": [_layer_meta(l) for l in layers],
        "dataset": args.dataset,
        "input_shape": input_shape,
        "input_scaling": scaling,
        "layersList": [int(v) for v in args.layersList],
        "convList": [int(v) for v in args.convList] if conv else None,
        "conventions": CONVENTIONS,
    }
    return meta


def _neuron_meta(net, activation):
    """meta's neuron model: ``neurons`` ("rate" or "binary", ``net.neurons.kind``), binary:
    ``rho_threshold`` and ``gamma_neur``, rate: both null."""
    kind = net.neurons.kind
    if kind not in ("rate", "binary") or (kind == "binary") != (activation == "heaviside"):
        raise ExportError(f"{kind} neurons with the activation {activation!r} cannot be exported")
    if kind == "rate":
        return {"neurons": kind, "rho_threshold": None, "gamma_neur": None}
    return {"neurons": kind, "rho_threshold": float(net.neurons.rho_threshold),
            "gamma_neur": float(net.neurons.gamma_neur)}


def _layer_meta(layer):
    out = {"name": layer["name"], "kind": layer["kind"], "shape": list(layer["weight"].shape),
           "alpha": "per_output_channel" if layer["per_channel"] else "per_layer"}
    if layer["kind"] == "conv":
        out.update(input=layer["input"], conv=layer["conv"], pool=layer["pool"])
    return out


def export_arrays(net):
    """The arrays of the export, name -> ndarray (see the module docstring)."""
    layers = _layers(net)
    meta = meta_for(net, layers)
    text = json.dumps(meta, indent=1, sort_keys=True, ensure_ascii=False)
    arrays = {"format_version": np.array([FORMAT_VERSION], dtype="<i8"),
              "meta": np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()}
    for layer in layers:
        name, w = layer["name"], layer["weight"]
        arrays[f"{name}.bits"] = pack_signs(w)
        arrays[f"{name}.shape"] = np.array(w.shape, dtype="<i8")
        arrays[f"{name}.alpha"] = binary_alpha(w, layer["per_channel"], name)
        arrays[f"{name}.bias"] = layer["bias"]
    return arrays


def export_bytes(net):
    """The bytes of the ``.npz`` file (written in memory by ``numpy.savez``)."""
    buf = io.BytesIO()
    np.savez(buf, **export_arrays(net))
    return buf.getvalue()


def write_export(net, path):
    """Write the 1-bit export of ``net`` to ``path`` atomically (``files.write_bytes``: a disk
    error is ``WriteFailed`` and leaves neither a temporary file nor a half-written ``path``).
    Returns a dict: ``path``, ``file_bytes``, ``bits_bytes`` (the packed signs), ``n_weights``
    and ``float32_bytes`` (4 per weight)."""
    data = export_bytes(net)
    path = os.fspath(path)
    write_bytes(path, data)
    n = sum(int(w.numel()) for w in net.binary_weights())
    return {"path": path, "file_bytes": len(data), "bits_bytes": sum((int(w.numel()) + 7) // 8
                                                                     for w in net.binary_weights()),
            "n_weights": n, "float32_bytes": 4 * n}


def export_run(path, net):
    """``python main.py --resume S-<n> --export``: lock the run folder ``path``, load its
    checkpoint into ``net`` (built as the run's arguments say) and write ``path/binary_model.npz``;
    prints one summary line and returns 0."""
    from binary_ep.checkpoint import load_checkpoint
    from binary_ep.files import lock_run_folder
    lock_run_folder(path)
    epoch = load_checkpoint(path, net, {})
    info = write_export(net, os.path.join(path, FILE_NAME))
    print(f"{info['path']}: the network after epoch {epoch}, {info['n_weights']} binary weights in "
          f"{info['bits_bytes']} bytes of sign bits ({info['file_bytes']} bytes in all; float32 "
          f"weights: {info['float32_bytes']})")
    return 0
