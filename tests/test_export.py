"""The 1-bit export (``binary_ep.export``) and its NumPy reference (``binary_ep.numpy_reference``).

Tiny networks are trained on scikit-learn's digits through the real command line, exported,
read back with NumPy alone and relaxed on the whole digits test set (360 samples) next to
PyTorch (in float64: agreement everywhere; in float32: see the max-pool ties below).  Measured
numbers are printed (``pytest -s``).
"""
import argparse
import contextlib
import csv
import errno
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main
from binary_ep import activations, datasets, files, model_file as mf, numpy_reference as nr
from binary_ep.export import export_arrays, pack_signs, write_export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FC_RUN = ("--device -1 --archi fc --dataset digits --layersList 64 128 10 --T 20 --Kmax 6 --beta 0.5 "
          "--gamma 1e-3 1e-3 --gradThreshold 3e-5 3e-5 --lrBias 0.05 0.1 --batchSize 32 "
          "--test_batchSize 360 --epochs 2 --seed 0")
# 3 epochs at these rates reach about 50 % test error (the 1-epoch line of 1e-4 stays near chance)
CONV_RUN = ("--device -1 --archi conv --dataset digits --layersList 10 --convList 6 4 1 --kernelSize 3 "
            "--padding 1 --Fpool 2 --T 30 --Kmax 8 --beta 0.5 --gamma 1e-3 1e-3 1e-3 "
            "--gradThreshold 5e-5 5e-5 5e-5 --lrBias 0.1 0.1 0.1 --batchSize 32 --test_batchSize 360 "
            "--epochs 3 --seed 0")
# other weights: whether float32 rounding breaks a pool tie differently depends on them (float32 test)
CONV_RUN_64 = CONV_RUN.replace("--batchSize 32", "--batchSize 64")
FC_1H = "--device -1 --archi fc --dataset mnist --layersList 784 4096 10"
CONV_MNIST = ("--device -1 --archi conv --dataset mnist --layersList 10 --convList 64 32 1 --padding 0 "
              "--kernelSize 5 --Fpool 2 --gamma 5e-8 5e-8 5e-8 --gradThreshold 1e-8 1e-8 1e-8 "
              "--lrBias 0.025 0.05 0.1")


def digits_test_set():
    """The 360 test images of digits, a float32 tensor (360, 1, 8, 8) in [0, 1]."""
    return datasets.load_digits_split()[1][0]


class Run:
    """A run trained through ``main.main(argv)`` on one thread: its checkpoint rebuilt as a
    network (``net(dtype)``), its export (``path``, written by ``write_export``) and ``model``."""

    def __init__(self, folder, argv):
        with single_thread():
            assert main.main(argv.split() + ["--outDir", str(folder)]) == 0
        (ckpt,) = glob.glob(os.path.join(folder, "DATA-0-*", "*", "S-1", "checkpoint.pt"))
        self.ckpt = torch.load(ckpt, map_location="cpu", weights_only=False)
        self.args = argparse.Namespace(**self.ckpt["args"])
        self.path = os.path.join(os.path.dirname(ckpt), "binary_model.npz")
        write_export(self.net(), self.path)
        self.model = nr.load_model(self.path)

    def net(self, dtype=torch.float32):
        net = main.build_network(self.args)
        net.load_state_dict(self.ckpt["model"])
        return net.to(dtype)


@contextlib.contextmanager
def single_thread():
    """One PyTorch thread: a batch relaxes in one piece (no CPU streams).  The thread count sets
    how the CPU splits a batch, hence the float32 rounding: trained this way, a fixture gives the
    same network whichever test asks for it first."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fc_run(tmp_path_factory):
    return Run(tmp_path_factory.mktemp("run"), FC_RUN)


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
    return Run(tmp_path_factory.mktemp("run"), CONV_RUN)


@pytest.fixture(scope="module")
def conv_run_64(tmp_path_factory):
    return Run(tmp_path_factory.mktemp("run"), CONV_RUN_64)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


def net_input(net, x):
    """Images (B, C, H, W) as the network reads them, in its dtype (``Tools_<archi>``'s)."""
    return main.architecture(net.args.archi)[1].prepare_images(net, x.to(net.binary_weights()[0].dtype))


def torch_states(net, x, T):
    """PyTorch's free phase: the states after ``T`` steps from ``initHidden``."""
    with torch.no_grad():
        drive = net.input_drive(net_input(net, x))
        return net.forward(net.initHidden(len(x)), drive, T)


def torch_trajectory(net, x, T):
    """Conv networks: PyTorch's states at every step 0..T, each a list of float64 arrays laid
    out like the reference's (batch first)."""
    with torch.no_grad():
        drive = net.input_drive(net_input(net, x))
        s = net.initHidden(len(x))
        out = [[v.double().numpy().copy() for v in s]]
        for _ in range(T):
            s = net.forward([v.clone() for v in s], drive, 1)
            out.append([v.double().numpy().copy() for v in s])
    return out


def per_sample_diff(a, b):
    """Largest |a - b| of each sample over a list of state arrays (batch first)."""
    return np.max([np.abs(np.asarray(u) - np.asarray(v)).reshape(len(u), -1).max(1) for u, v in zip(a, b)], 0)


def margins(out):
    return np.diff(np.sort(out, 1)[:, -2:], axis=1)[:, 0]  # largest - second largest


# -- the file ------------------------------------------------------------------------------------
def test_sign_bits_hand_worked_example():
    signs = np.array([+1, -1, -1, +1, +1, +1, -1, +1, -1], dtype=np.float32) * 0.25
    assert pack_signs(signs).tolist() == [0b10011101, 0b00000000]  # first weight = top bit
    signs[-1] = 0.25
    assert pack_signs(signs).tolist() == [0b10011101, 0b10000000]  # unused bits stay 0
    assert nr.unpack_signs(pack_signs(signs), (9,)).tolist() == [1, -1, -1, 1, 1, 1, -1, 1, 1]
    w = np.array([[1.0, -1.0, -1.0], [1.0, 1.0, -1.0]])  # C order: row 0 then row 1
    assert pack_signs(w).tolist() == [0b10011000]
    assert np.array_equal(nr.unpack_signs(pack_signs(w), w.shape), w)


@pytest.mark.parametrize("which", ["fc", "conv"])
def test_export_holds_the_binary_weights_exactly(which, fc_run, conv_run):
    run = fc_run if which == "fc" else conv_run
    net = run.net()
    with np.load(run.path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    names = list(net.layer_names)
    parts = ("bits", "shape", "alpha", "bias")
    assert set(arrays) == {"format_version", "meta"} | {f"{n}.{p}" for n in names for p in parts}
    assert arrays["format_version"].tolist() == [1] and arrays["format_version"].dtype == np.dtype("<i8")
    meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
    assert meta["layer_names"] == names and meta["archi"] == which and meta["dataset"] == "digits"
    assert meta["input_shape"] == [1, 8, 8] and meta["input_scaling"]["divide_by"] == 16
    assert meta["T"] == run.args.T and meta["activation"] == "hardsigm"
    groups = net.optW.param_groups
    for name, w, b, layer, group in zip(names, net.binary_weights(), net.biases(), run.model.layers, groups):
        w, b = w.detach().numpy(), b.detach().numpy()
        bits, shape, alpha, bias = (arrays[f"{name}.{p}"] for p in parts)
        assert bits.dtype == np.uint8 and bits.size == (w.size + 7) // 8
        assert shape.tolist() == list(w.shape) and shape.dtype == np.dtype("<i8")
        assert alpha.dtype == np.dtype("<f4") and bias.dtype == np.dtype("<f4")
        assert alpha.shape == ((w.shape[0],) if group["per_channel"] else (1,))
        assert np.array_equal(layer.weight, w) and np.array_equal(layer.bias, b)
    with torch.no_grad():
        net.binary_weights()[1][0, 0] *= 0.5
    with pytest.raises(nr.ExportError, match=f"layer {names[1]} is not binary"):
        export_arrays(net)


# -- agreement with PyTorch ------------------------------------------------------------------------
def test_fc_free_phase_matches_pytorch(fc_run, one_thread):
    x = digits_test_set()
    for T in (fc_run.args.T, 60):
        net = fc_run.net()
        out = net.output(torch_states(net, x, T)).double().numpy()
        pred, mine = nr.free_phase(fc_run.model, x.numpy(), T)
        diff, margin = np.abs(mine - out).max(), margins(out)
        print(f"\nfc T={T}: max |numpy - torch float32| = {diff:.3g}, samples with margin <= 1e-4: "
              f"{(margin <= 1e-4).sum()}, smallest margin {margin.min():.3g}")
        assert diff <= 1e-5
        assert np.array_equal(pred[margin > 1e-4], out.argmax(1)[margin > 1e-4])
        net64 = fc_run.net(torch.float64)
        out64 = net64.output(torch_states(net64, x.double(), T)).numpy()
        assert np.abs(mine - out64).max() <= 1e-9 and np.array_equal(pred, out64.argmax(1))


@pytest.mark.parametrize("T", [30, 60])
def test_conv_free_phase_matches_pytorch_float64(conv_run, one_thread, T):
    x = digits_test_set()
    net = conv_run.net(torch.float64)
    theirs = [v.numpy() for v in torch_states(net, x.double(), T)]
    start = time.perf_counter()
    mine, seconds = nr.relax(conv_run.model, x.numpy(), T), time.perf_counter() - start
    diff = per_sample_diff(mine, theirs)
    print(f"\nconv T={T}: max |numpy - torch float64| over all states = {diff.max():.3g}; "
          f"reference relaxation of the 360 samples: {seconds:.2f} s")
    assert diff.max() <= 1e-9
    assert np.array_equal(mine[0].argmax(1), theirs[0].argmax(1))
    assert seconds < 30  # a few seconds on one core


@pytest.mark.parametrize("run_name,T", [("conv_run", 30), ("conv_run", 60), ("conv_run_64", 30),
                                        ("conv_run_64", 60)])
def test_conv_free_phase_matches_pytorch_float32_except_pool_ties(run_name, T, one_thread, request):
    """With binary weights, inputs in multiples of 1/16 and every state starting at 1, the two
    largest values of a max-pool window are often mathematically equal (the convolution of the
    all-ones state at step 1 has such windows in every sample).  The reference computes in
    float64, where these sums are exact, and takes the first maximum; PyTorch's float32 rounding
    can make either the larger.  So PyTorch's trajectory is replayed one step at a time: a step
    of the reference from PyTorch's states must agree to 1e-5 unless a window that matters was
    within 1e-6 of a tie; samples without such a step must agree to 1e-5 at the end, and all
    agree when started from PyTorch's states after the last such step."""
    conv_run = request.getfixturevalue(run_name)
    x = digits_test_set()
    xn, model, B = x.numpy(), conv_run.model, len(x)
    traj = torch_trajectory(conv_run.net(), x, T)
    full = [v.double().numpy() for v in torch_states(conv_run.net(), x, T)]
    assert per_sample_diff(traj[-1], full).max() <= 1e-6  # step by step = all at once
    decided = np.zeros((T, B), bool)
    other = 0.0
    for t in range(T):
        trace = {"tol": 1e-6}
        d = per_sample_diff(nr.relax(model, xn, 1, trace=trace, states=traj[t]), traj[t + 1])
        decided[t] = d > 1e-5
        assert not np.any(decided[t] & (trace["fragile"] == 0)), f"step {t + 1}: a difference, no pool tie"
        other = max(other, float(d[~decided[t]].max(initial=0)))
    tied = decided.any(0)
    steps = (np.nonzero(decided.any(1))[0] + 1).tolist()
    mine = nr.relax(model, xn, T)
    d, out, margin = per_sample_diff(mine, full), full[0], margins(full[0])
    assert d[~tied].max(initial=0) <= 1e-5
    keep = ~tied & (margin > 1e-4)
    assert np.array_equal(mine[0].argmax(1)[keep], out.argmax(1)[keep])
    t0 = max(steps, default=0)  # from PyTorch's states after the last such step: all agree
    rest = nr.relax(model, xn, T - t0, states=traj[t0])
    d0 = per_sample_diff(rest, full)
    assert d0.max() <= 1e-5
    assert np.array_equal(rest[0].argmax(1)[margin > 1e-4], out.argmax(1)[margin > 1e-4])
    flipped = int((mine[0].argmax(1) != out.argmax(1)).sum())
    print(f"\n{run_name} T={T} vs torch float32: samples with a pool tie decided differently: "
          f"{int(tied.sum())} (at steps {steps}); their max state difference "
          f"{d[tied].max(initial=0):.3g}, output {np.abs(mine[0] - out)[tied].max(initial=0):.3g}, "
          f"argmax differs in {flipped}; other "
          f"samples: max {d[~tied].max(initial=0):.3g}; one step from torch's states otherwise: "
          f"{other:.3g}; from torch's step-{t0} states: max {d0.max():.3g}; margins <= 1e-4: "
          f"{int((margin <= 1e-4).sum())}")


@pytest.mark.parametrize("act", ["hardsigm", "sigm", "tanh"])
def test_each_activation_matches_pytorch(act, tmp_path, one_thread):
    """Untrained digits networks (PyTorch's initialisation), fc with two hidden layers and conv
    with a hidden classifier layer, relaxed 12 steps in float64 by both."""
    x = digits_test_set()[:64].double()
    for line in ("--archi fc --layersList 64 32 16 10 --gamma 1e-3 1e-3 1e-3 --gradThreshold 1e-5 1e-5 1e-5 "
                 "--lrBias 0.1 0.1 0.1",
                 "--archi conv --layersList 12 10 --convList 6 4 1 --kernelSize 3 --padding 1 --gamma 1e-3 "
                 "1e-3 1e-3 1e-3 --gradThreshold 1e-5 1e-5 1e-5 1e-5 --lrBias 0.1 0.1 0.1 0.1"):
        args = main.parse(f"--device -1 --dataset digits --activationFun {act} --seed 1 {line}".split())[1]
        torch.manual_seed(1)
        net = main.build_network(args)
        write_export(net, tmp_path / "m.npz")
        theirs = [v.numpy() for v in torch_states(net.double(), x, 12)]
        theirs = [v.T for v in theirs] if args.archi == "fc" else theirs  # fc states are (n, B) there
        mine = nr.relax(nr.load_model(tmp_path / "m.npz"), x.numpy(), 12)
        assert per_sample_diff(mine, theirs).max() <= 1e-9, (act, args.archi)


# -- the operations ------------------------------------------------------------------------------
def test_max_pool_takes_the_first_maximum_like_pytorch():
    rng = np.random.RandomState(0)
    a = rng.randint(0, 3, size=(4, 3, 7, 9)).astype(np.float64)  # many ties; 7x9 drops a row and a column
    a[0, 0, :2, :2] = 5.0  # a window of four equal values
    for f in (2, 3):
        pooled, index = nr.max_pool(a, f)
        tp, ti = F.max_pool2d(torch.from_numpy(a), f, f, return_indices=True)
        rows, cols = ti.numpy() // a.shape[3], ti.numpy() % a.shape[3]
        assert np.array_equal(pooled, tp.numpy())
        assert np.array_equal(index, (rows % f) * f + cols % f)
    assert nr.max_pool(a, 2)[1][0, 0, 0, 0] == 0


@pytest.mark.parametrize("k,p,f,size", [(3, 1, 2, 8), (3, 0, 2, 9), (5, 0, 2, 12), (5, 2, 2, 8),
                                        (3, 2, 3, 7)])
def test_convolutions_match_pytorch(k, p, f, size):
    rng = np.random.RandomState(k * 10 + p)
    x, w, b = rng.rand(3, 4, size, size), rng.randn(5, 4, k, k), rng.randn(5)
    tx, tw, tb = (torch.from_numpy(v) for v in (x, w, b))
    conv = nr.conv2d(x, w, b, p)
    assert np.allclose(conv, F.conv2d(tx, tw, tb, padding=p).numpy(), atol=1e-12)
    pooled, index = nr.max_pool(conv, f)
    s = rng.rand(*pooled.shape)
    tp, ti = F.max_pool2d(torch.from_numpy(conv), f, f, return_indices=True)
    up = F.max_unpool2d(torch.from_numpy(s), ti, f, f, output_size=conv.shape[2:])
    expected = F.conv_transpose2d(up, tw, padding=p).numpy()
    up = nr.max_unpool(s, index, f, conv.shape[2:])
    assert np.allclose(nr.conv_transpose2d(up, w, p), expected, atol=1e-12)
    assert np.allclose(nr.unpool_conv_transpose2d(s, index, f, conv.shape[2:], w, p), expected, atol=1e-12)


# -- binary neurons (DESIGN.md section 10) -----------------------------------------------------------
def hand_model(layers, T=2, theta=0.75, gamma=0.5, E=1, n_inputs=2):
    """An fc ``Model`` built in memory: ``layers`` [(signs (out, in) of +1/-1, alpha, bias)],
    output first, each stored as its packed sign bits; binary neurons; input (1, 1, n_inputs)."""
    meta = {"activation": "heaviside", "T": T, "input_shape": [1, 1, n_inputs], "neurons": "binary",
            "rho_threshold": theta, "gamma_neur": gamma, "expand_output": E}
    built = []
    for k, (signs, alpha, bias) in enumerate(layers):
        signs = np.array(signs)
        layer = mf.Layer(f"fc{k}", "fc", np.array([alpha], np.float32), np.array(bias, np.float32), signs.shape)
        built.append(layer.set_bits(pack_signs(signs)))
        assert np.array_equal(layer.signs, signs) and np.array_equal(layer.weight, alpha * signs)
    return mf.Model("hand", meta, built)


def test_binary_step_hand_worked_example():
    """Input 2 -> hidden 3 -> output 2, theta = 0.75 (so the mask |s - theta| <= 0.5 turns a
    state under 0.25 off), gamma_neur = 0.5, every state 1 at the start.  Drive of the hidden
    layer from x = (1, 0.5): 0.5 (x0 - x1, x0 + x1, -x0 + x1) + (0, 0.25, -0.5) = (0.25, 1, -0.75).
    Step 1, every b = 1: output a = 0.25 (1 + 1 - 1, -1 + 1 + 1) + (0.125, 0.25) = (0.375, 0.5),
    s = 0.5 + a / 2 = (0.6875, 0.75); hidden feedback 0.25 (1 - 1, 1 + 1, -1 + 1) = (0, 0.5, 0),
    s = 0.5 + (0.25, 1.5, -0.75) / 2 = (0.625, 1.25 -> 1, 0.125).
    Step 2: b_hidden = (0, 1, 0), b_out = (0, 1) (0.75 >= theta: H(0) = 1); hidden mask (1, 1, 0).
    Output a = 0.25 (1, 1) + (0.125, 0.25), s = (0.6875 + 0.375, 0.75 + 0.5) / 2 = (0.53125, 0.625);
    hidden a = (0.25, 1, -0.75) + 0.25 (-1, 1, 1) = (0, 1.25, -0.5), masked (0, 1.25, 0),
    s = ((0.625, 1, 0.125) + (0, 1.25, 0)) / 2 = (0.3125, 1.125 -> 1, 0.0625)."""
    model = hand_model([([[1, 1, -1], [-1, 1, 1]], 0.25, [0.125, 0.25]),
                        ([[1, -1], [1, 1], [-1, 1]], 0.5, [0.0, 0.25, -0.5])])
    x = np.array([[[[1.0, 0.5]]]])
    expected = {1: [[0.6875, 0.75], [0.625, 1.0, 0.125]], 2: [[0.53125, 0.625], [0.3125, 1.0, 0.0625]]}
    for dtype in (np.float64, np.float32):
        for T, (out, hidden) in expected.items():
            trace = {}
            s = nr.relax(model, x, T, dtype, trace=trace)
            assert s[0].dtype == dtype and s[0].tolist() == [out] and s[1].tolist() == [hidden], (T, s)
            assert trace["near"].tolist() == [T - 1]  # the output's 0.75 = theta before step 2
        assert nr.free_phase(model, x, dtype=dtype)[0].tolist() == [1]
    # the counts are integers: number of +1 minus number of -1 over the active inputs
    signs = np.array([[1, -1, -1, 1, 1], [-1, -1, -1, -1, 1]], np.float64)
    sent = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    counts = nr.counts(signs, sent)
    assert counts.dtype == np.int64 and counts.tolist() == [[1, -3], [0, 0], [1, -3]]


def test_population_readout_is_the_class_mean():
    """E = 2 output units a class: the prediction is the class of the largest mean, here class 1
    (means 0.45, 0.55), where the first unit of each class alone (0.9, 0.5) would say class 0."""
    out = np.array([[0.9, 0.0, 0.5, 0.6], [0.2, 0.4, 0.3, 0.3]])
    assert np.allclose(nr.class_scores(out, 2), [[0.45, 0.55], [0.3, 0.3]])
    assert nr.class_scores(out, 1).tolist() == out.tolist()
    model = hand_model([([[1, 1], [-1, -1], [1, -1], [1, 1]], 0.25, [0.5, -1.0, 0.25, 0.5])], T=1, E=2)
    # one layer reading x = (0.5, 0.25): a = 0.25 (0.75, -0.75, 0.25, 0.75) + bias, s = (1 + a) / 2:
    # class means 0.421875 and 0.75, first units 0.84375 and 0.65625
    pred, states = nr.free_phase(model, np.array([[[[0.5, 0.25]]]]))
    assert states.tolist() == [[0.84375, 0.0, 0.65625, 0.84375]] and pred.tolist() == [1]


BINARY_NETS = {  # untrained digits networks with binary neurons, {out} = 10 E output units
    "fc": "--archi fc --layersList 64 32 16 {out} --gamma 1e-3 1e-3 1e-3 --gradThreshold 1e-5 1e-5 1e-5 "
          "--lrBias 0.1 0.1 0.1",
    "conv": "--archi conv --layersList 12 {out} --convList 6 4 1 --kernelSize 3 --padding 1 --gamma 1e-3 1e-3 "
            "1e-3 1e-3 --gradThreshold 1e-5 1e-5 1e-5 1e-5 --lrBias 0.1 0.1 0.1 0.1"}


@pytest.mark.parametrize("archi,E,theta,gamma", [("fc", 1, 0.5, 0.5), ("fc", 2, 0.3, 0.25),
                                                 ("conv", 1, 0.45, 0.5), ("conv", 2, 0.5, 0.25)])
def test_binary_neurons_match_pytorch(archi, E, theta, gamma, tmp_path, one_thread):
    """Built through main's path (``--binary_settings bin_W_N --activationFun heaviside``),
    exported and relaxed 20 steps in float32 by both on the 360 digits test samples.  A random
    network: the input layer's alpha times 4 (so that the input, not the biases, sets most
    states) and biases drawn in +-0.05 (with the conv network's zero biases a count of 0 puts a
    state exactly on theta in every sample: exactly in both, no rounding, but the trace cannot
    tell it from a state that rounding put there).  theta = 0.3 and 0.45 put an edge of the mask
    inside (0, 1).  A sample where no state came within 1e-6 of theta (or of theta +- 0.5 inside
    (0, 1)) during the relaxation agrees within 1e-6 and predicts the same."""
    line = BINARY_NETS[archi].format(out=10 * E)
    args = main.parse(f"--device -1 --dataset digits --T 20 --seed 1 --binary_settings bin_W_N "
                      f"--activationFun heaviside --expand_output {E} --rho_threshold {theta} "
                      f"--gamma_neur {gamma} {line}".split())[1]
    torch.manual_seed(E)
    net = main.build_network(args)
    with torch.no_grad():
        net.binary_weights()[-1].mul_(4)
        for b in net.biases():
            b.uniform_(-0.05, 0.05)
    write_export(net, tmp_path / "m.npz")
    model = nr.load_model(tmp_path / "m.npz")
    assert (model.neurons, model.rho_threshold, model.gamma_neur, model.expand_output) == ("binary", theta, gamma, E)
    assert model.meta["n_classes"] == 10 and model.activation == "heaviside"
    x = digits_test_set()
    with torch.no_grad():
        states = torch_states(net, x, args.T)
        scores = activations.class_scores(net.output(states), E).numpy()
    theirs = [v.numpy().T if archi == "fc" else v.numpy() for v in states]
    trace = {"tol": 1e-6}
    mine = nr.relax(model, x.numpy(), args.T, np.float32, trace=trace)
    near, diff = trace["near"] > 0, per_sample_diff(mine, theirs)
    pred = nr.class_scores(mine[0], E).argmax(1)
    agree, outputs = pred == scores.argmax(1), len(np.unique(mine[0], axis=0))
    print(f"\n{archi} E={E} theta={theta} gamma={gamma}: samples with a state within 1e-6 of an edge: "
          f"{near.sum()} of {len(x)}; max |numpy - torch float32| elsewhere {diff[~near].max(initial=0):.3g}, "
          f"there {diff[near].max(initial=0):.3g}; predictions that differ: {(~agree).sum()}; "
          f"{outputs} distinct outputs, {len(set(pred.tolist()))} classes predicted")
    assert near.sum() <= 0.1 * len(x)
    assert diff[~near].max(initial=0) <= 1e-6
    assert agree[~near].all() and np.array_equal(nr.free_phase(model, x[:40].numpy(), dtype=np.float32)[0], pred[:40])
    assert outputs >= 20  # (a network that relaxed every sample to the same states would compare little)


def test_rate_neurons_with_an_output_population(tmp_path, one_thread):
    """Rate neurons (bin_W) with --expand_output 3: the file says rate and E = 3, the states
    agree with PyTorch's in float64 and the prediction is the class of the largest mean."""
    args = main.parse(("--device -1 --dataset digits --T 12 --seed 1 --expand_output 3 "
                       + BINARY_NETS["fc"].format(out=30)).split())[1]
    torch.manual_seed(3)
    net = main.build_network(args)
    write_export(net, tmp_path / "m.npz")
    model = nr.load_model(tmp_path / "m.npz")
    assert (model.neurons, model.rho_threshold, model.gamma_neur, model.expand_output) == ("rate", None, None, 3)
    x = digits_test_set()[:64].double()
    states = torch_states(net.double(), x, args.T)
    theirs = activations.class_scores(net.output(states), 3).numpy()
    pred, out = nr.free_phase(model, x.numpy())
    assert out.shape == (64, 30) and np.abs(out - net.output(states).numpy()).max() <= 1e-9
    assert np.abs(nr.class_scores(out, 3) - theirs).max() <= 1e-9 and np.array_equal(pred, theirs.argmax(1))
    assert not np.array_equal(pred, out[:, ::3].argmax(1))  # (the first unit of each class alone differs)


# -- sizes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line,largest", [(FC_1H, 1 / 30), (CONV_MNIST, 1 / 16)], ids=["fc-1h", "conv-mnist"])
def test_one_bit_file_size(line, largest, tmp_path):
    args = main.parse(line.split())[1]
    net = main.build_network(args)
    info = write_export(net, tmp_path / "binary_model.npz")
    arrays = export_arrays(net)
    for name, w in zip(net.layer_names, net.binary_weights()):
        assert arrays[f"{name}.bits"].nbytes == -(-w.numel() // 8)
    assert info["bits_bytes"] / info["float32_bytes"] <= 1 / 32 + 1e-6
    size = os.path.getsize(tmp_path / "binary_model.npz")
    assert size == info["file_bytes"] and size <= largest * info["float32_bytes"]
    print(f"\n{args.archi} {args.layersList} {args.convList if args.archi == 'conv' else ''}: "
          f"{info['n_weights']} weights, float32 {info['float32_bytes']} B, sign bits "
          f"{info['bits_bytes']} B (1/{info['float32_bytes'] / info['bits_bytes']:.2f}), whole file "
          f"{size} B (1/{info['float32_bytes'] / size:.2f})")
    model = nr.load_model(tmp_path / "binary_model.npz")
    pred, out = nr.free_phase(model, np.random.RandomState(0).rand(2, 1, 28, 28), T=3)
    assert pred.shape == (2,) and out.shape == (2, 10)


def test_meta_documents_the_input_scaling(tmp_path):
    cases = [("--device -1 --archi fc --dataset fashion_mnist --layersList 784 10 --gamma 1e-4 "
              "--gradThreshold 1e-8 --lrBias 0.1", [1, 28, 28], "pixel / 255"),
             ("--device -1 --archi conv --dataset cifar10 --layersList 10 --convList 8 4 3 --padding 2 "
              "--kernelSize 5 --gamma 1e-4 1e-4 1e-4 --gradThreshold 1e-8 1e-8 1e-8 --lrBias 0.1 0.1 0.1",
              [3, 32, 32], "ToTensor")]
    for line, shape, text in cases:
        meta = json.loads(export_arrays(main.build_network(main.parse(line.split())[1]))["meta"].tobytes())
        assert meta["input_shape"] == shape and meta["input_scaling"]["text"].startswith(text)
    mean, std = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]
    assert meta["input_scaling"]["mean"] == mean and meta["input_scaling"]["std"] == std
    assert (meta["padding"], meta["kernel_size"], meta["pool_size"]) == (2, 5, 2)
    write_export(main.build_network(main.parse(cases[1][0].split())[1]), tmp_path / "cifar.npz")
    x = nr.scale_input(nr.load_model(tmp_path / "cifar.npz"), np.full((1, 3, 32, 32), 255.0))
    assert np.allclose(x[0, :, 0, 0], (1 - np.array(mean)) / np.array(std))


# -- errors and the write ---------------------------------------------------------------------------
BAD_FILES = {  # how the file is spoiled -> words of the error
    "truncated": "a damaged or truncated .npz archive", "random bytes": "no zip header",
    "version 2": "has format version 2, this reader knows 1", "missing array": "the array fc0.alpha is missing",
    "meta not JSON": "meta is not UTF-8 JSON", "a .npy file": "a single .npy array", "no file": "does not exist"}


@pytest.mark.parametrize("how", list(BAD_FILES))
def test_a_bad_file_is_a_one_line_error(how, fc_run, tmp_path, capsys):
    (tmp_path / "S-1").mkdir()
    path, rng = tmp_path / "S-1" / "binary_model.npz", np.random.RandomState(1)
    with np.load(fc_run.path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if how in ("truncated", "random bytes"):  # (the file holds about 6 kB)
        path.write_bytes(open(fc_run.path, "rb").read()[:3000] if how == "truncated" else rng.bytes(6000))
    elif how in ("version 2", "missing array", "meta not JSON"):
        arrays.update({"version 2": {"format_version": np.array([2])},
                       "meta not JSON": {"meta": np.frombuffer(b"{not json", dtype=np.uint8)}}.get(how, {}))
        if how == "missing array":
            del arrays["fc0.alpha"]
        np.savez(path, **arrays)
    elif how == "a .npy file":
        with open(path, "wb") as f:  # (numpy.save would add ".npy" to the name)
            np.save(f, np.zeros(3))
    words = BAD_FILES[how]
    with pytest.raises(nr.ExportError) as e:
        nr.load_model(path)
    message = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in message
    assert message.startswith(str(path)) and words in message, message
    capsys.readouterr()
    assert nr.main([str(path)]) == 2  # python -m binary_ep.numpy_reference FILE: the same line
    assert capsys.readouterr().err == f"error: {message}\n"


def test_damaged_bytes_never_load_as_another_model(conv_run, tmp_path):
    """300 damaged copies (a byte changed, truncated, or 8 bytes zeroed anywhere): each is a
    one-line ExportError, or (damage to zip fields that hold no data: the members carry CRC-32
    checksums) loads as the very same model."""
    data, rng, path, loaded = open(conv_run.path, "rb").read(), np.random.RandomState(0), tmp_path / "m.npz", 0
    for trial in range(300):
        d, i = bytearray(data), rng.randint(len(data))
        if trial % 3 == 0:
            d[i] ^= 1 + rng.randint(255)  # one byte changed
        elif trial % 3 == 1:
            del d[i:]  # truncated
        else:
            d[i:i + 8] = bytes(len(d[i:i + 8]))  # up to 8 bytes zeroed
        path.write_bytes(bytes(d))
        try:
            model = nr.load_model(path)
        except nr.ExportError as e:
            assert "\n" not in str(e) and str(e).startswith(str(path))
            continue
        loaded += 1
        assert model.meta == conv_run.model.meta
        for a, b in zip(model.layers, conv_run.model.layers):
            assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
    assert loaded < 100


def test_the_write_is_atomic(fc_run, tmp_path, monkeypatch):
    net, target = fc_run.net(), tmp_path / "binary_model.npz"
    target.write_bytes(b"previous")

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(files.WriteFailed) as e:
        write_export(net, target)
    assert e.value.reason == "no space left on the device" and e.value.name == "binary_model.npz"
    monkeypatch.undo()
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["binary_model.npz"]
    with pytest.raises(files.WriteFailed) as e:
        write_export(net, tmp_path / "missing" / "binary_model.npz")
    assert e.value.reason == "no such file or directory"
    write_export(net, target)
    assert os.listdir(tmp_path) == ["binary_model.npz"] and nr.load_model(target).meta["archi"] == "fc"


def test_the_reader_needs_numpy_only(fc_run, tmp_path):
    """The golden model's three files copied alone (the package's empty __init__, the reader
    binary_ep.model_file and the relaxation) load and relax the export without torch."""
    np.save(tmp_path / "x.npy", digits_test_set().numpy())
    np.save(tmp_path / "expected.npy", nr.free_phase(fc_run.model, np.load(tmp_path / "x.npy"))[0])
    (tmp_path / "binary_ep").mkdir()
    for name in ("__init__.py", "model_file.py", "numpy_reference.py"):
        shutil.copy(os.path.join(ROOT, "binary_ep", name), tmp_path / "binary_ep" / name)
    code = ("import sys, numpy as np\n"
            "from binary_ep import numpy_reference as ref\n"
            f"assert ref.__file__ == {str(tmp_path / 'binary_ep' / 'numpy_reference.py')!r}, ref.__file__\n"
            f"model = ref.load_model({fc_run.path!r})\n"
            f"pred, out = ref.free_phase(model, np.load({str(tmp_path / 'x.npy')!r}))\n"
            f"assert np.array_equal(pred, np.load({str(tmp_path / 'expected.npy')!r}))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    cli = subprocess.run([sys.executable, "-m", "binary_ep.numpy_reference", fc_run.path],
                         capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    assert "fc network trained on digits" in cli.stdout and "fc1: fc 128x64" in cli.stdout
    bad = subprocess.run([sys.executable, "-m", "binary_ep.numpy_reference", str(tmp_path / "x.npy")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "x.npy" in bad.stderr


def test_the_export_command_writes_the_file_under_the_run_folder_lock(tmp_path, capsys):
    """``python main.py --resume S-<n> --export`` as a user types it: the file appears in the run
    folder, loads with NumPy alone and holds the trained network; the run folder is otherwise
    unchanged; a second process cannot export while the folder is locked."""
    argv = FC_RUN.split() + ["--outDir", str(tmp_path)]
    with single_thread():
        assert main.main(argv) == 0
    (run,) = tmp_path.glob("DATA-0-fc-digits/*/S-1")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "run.lock"}
    capsys.readouterr()
    assert main.main(["--resume", str(run), "--export"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(run / "binary_model.npz")) and "sign bits" in out
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "run.lock"}
    assert after.pop("binary_model.npz")[:2] == b"PK" and after == before
    model = nr.load_model(run / "binary_model.npz")
    net = main.build_network(argparse.Namespace(**torch.load(run / "checkpoint.pt", weights_only=False)["args"]))
    net.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=False)["model"])
    for layer, w in zip(model.layers, net.binary_weights()):
        assert np.array_equal(layer.weight, w.detach().numpy())
    files.lock_run_folder(run)  # another writer holds the folder
    try:
        env = dict(os.environ, EP_NO_PROGRESS="1")
        r = subprocess.run([sys.executable, "main.py", "--resume", str(run), "--export"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    finally:
        files.release_run_folders()
    assert r.returncode == 5 and r.stderr.strip() == (
        f"main.py: error: {run} is in use by process {os.getpid()} (a run, --resume, --check or --export); "
        f"wait for it to end or stop it, then try again")


BINARY_RUN = ("--device -1 --archi fc --dataset digits --layersList 64 16 20 --T 8 --Kmax 4 --beta 0.5 "
              "--gamma 1e-3 1e-3 --gradThreshold 3e-5 3e-5 --lrBias 0.05 0.1 --batchSize 32 --test_batchSize 360 "
              "--epochs 1 --seed 0 --trainSubset 64 --binary_settings bin_W_N --activationFun heaviside "
              "--expand_output 2 --rho_threshold 0.4 --gamma_neur 0.3")


def test_the_export_of_a_binary_neuron_run_records_its_neuron_model(tmp_path, capsys):
    """``python main.py --resume S-<n> --export`` of a bin_W_N run (in process): the file says
    binary neurons with the run's rho_threshold, gamma_neur and expand_output, and the NumPy
    model relaxes it as PyTorch does (PyTorch's test_bin: the run's results.csv)."""
    with single_thread():
        assert main.main(BINARY_RUN.split() + ["--outDir", str(tmp_path)]) == 0
    (run,) = tmp_path.glob("DATA-0-fc-digits/*/S-1")
    assert main.main(["--resume", str(run), "--export"]) == 0
    capsys.readouterr()
    with np.load(run / "binary_model.npz", allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
    assert {k: meta[k] for k in ("neurons", "rho_threshold", "gamma_neur", "expand_output", "n_classes",
                                 "activation")} == {"neurons": "binary", "rho_threshold": 0.4, "gamma_neur": 0.3,
                                                    "expand_output": 2, "n_classes": 10, "activation": "heaviside"}
    model, trace = nr.load_model(run / "binary_model.npz"), {"tol": 1e-6}
    x, labels = datasets.load_digits_split()[1]
    out = nr.relax(model, x.numpy(), dtype=np.float32, trace=trace)[0]
    wrong = int((nr.class_scores(out, 2).argmax(1) != labels.numpy()).sum())
    with open(run / "results.csv") as f:
        logged = float(next(csv.DictReader(f))["test_error"]) * 360 / 100  # misclassified samples
    near = int((trace["near"] > 0).sum())
    print(f"\nbin_W_N fc run: {wrong} of 360 wrong, results.csv: {logged:.6g}; samples near an edge: {near}")
    assert out.shape == (360, 20) and abs(wrong - logged) <= near + 1e-6


def test_export_without_a_checkpoint_or_a_run_is_one_line(tmp_path, capsys):
    empty = tmp_path / "S-1"
    empty.mkdir()
    for argv, words in ((["--resume", str(empty), "--export"], "is not a run folder with checkpoint.pt"),
                        (["--export"], "--export writes the network of a finished epoch")):
        with pytest.raises(SystemExit) as e:
            main.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert os.listdir(empty) == []
