"""Binary neurons (issue 18, DESIGN.md section 10): the math of ``--binary_settings bin_W_N``
pinned against numbers worked out here, by hand or in plain NumPy, never by the code under test.

* one step of the fc and the conv network: the bits ``b = H(s - theta)`` (H(0) = 1), the input
  as counts times alpha, the mask ``rho'`` (|s - theta| <= 0.5), the nudge (fc: from the current
  output; conv: from the free phase's final output, fixed through the nudged phase) and the
  filter ``s <- clamp((1 - gamma_neur) s + gamma_neur a, 0, 1)``;
* the EP gradient of binary neurons uses their bits, not their states;
* the count formulation equals the float product ``W b + bias`` with the real initial alpha;
* the two readouts (population mean, first neuron) and the error counts of ``loops._scores``;
* the conv bin_W_N initialisation: biases 0, filters at ``2 gamma N(0, 1)`` from the seeded
  generator, then the first filter update.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main
from binary_ep import loops
from binary_ep.activations import class_scores, first_neuron_scores
from binary_ep.network import Phase

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one stream, tiny tensors


def parse(line):
    return main.parse(line.split())[1]


def fc_args(layers, E=1, theta=0.5, g=0.5, extra=""):
    n = len(layers.split()) - 1
    return parse(f"--device -1 --dataset digits --outDir /tmp --seed 0 --layersList {layers} "
                 f"--gamma {' '.join(['1e-4'] * n)} --gradThreshold {' '.join(['1e-6'] * n)} "
                 f"--lrBias {' '.join(['0.05'] * n)} "
                 f"--binary_settings bin_W_N --activationFun heaviside --rho_threshold {theta} "
                 f"--gamma_neur {g} --expand_output {E} {extra}")


def conv_args(conv="2 1", layers=None, E=1, theta=0.5, g=0.5, extra="", settings=None):
    layers = str(10 * E) if layers is None else layers
    n = len(layers.split()) + len(conv.split()) - 1
    gammas = " ".join(f"{(k + 1) * 1e-3:g}" for k in range(n))  # a different gamma per layer
    if settings is None:
        settings = (f"--binary_settings bin_W_N --activationFun heaviside --rho_threshold {theta} "
                    f"--gamma_neur {g}")
    return parse(f"--device -1 --archi conv --dataset digits --outDir /tmp --seed 0 "
                 f"--layersList {layers} --convList {conv} --kernelSize 3 --padding 1 --Fpool 2 "
                 f"--gamma {gammas} --gradThreshold {' '.join(['1e-6'] * n)} "
                 f"--lrBias {' '.join(['0.05'] * n)} --expand_output {E} {settings} {extra}")


def set_layer(layer, alpha, signs, bias):
    """Weights ``alpha * signs`` (alpha per output channel if a list), biases ``bias``."""
    with torch.no_grad():
        a = torch.tensor(alpha, dtype=torch.float64).reshape((-1,) + (1,) * (layer.weight.dim() - 1))
        layer.weight.copy_(a * torch.as_tensor(signs, dtype=torch.float64))
        layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float64))


def f32(a):
    """``a`` rounded to float32, back as a float64 NumPy array (the values the network holds)."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def states_from(values, shape, rng):
    """A float64 array of ``shape`` drawn from ``values`` (exact in float32)."""
    return rng.choice(np.asarray(values, dtype=np.float64), size=shape)


def t(a):
    return torch.tensor(np.asarray(a), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# NumPy references (written out independently of the code under test)
# ----------------------------------------------------------------------------------------------
def np_bits(v, theta):
    return (v >= theta).astype(np.float64)


def np_filter(s, a, theta, g, nudge=None):
    """Mask the input ``a`` by rho'(s - theta), add the nudge, filter into ``s``, clamp."""
    a = a * (np.abs(s - theta) <= 0.5)
    if nudge is not None:
        a = a + nudge
    return np.clip((1 - g) * s + g * a, 0.0, 1.0)


def np_fc_step(s, x, signs, alphas, biases, theta, g, beta=0.0, y=None, ref=None):
    """One synchronous step of the fc net of binary neurons in the column layout: ``s`` the
    states (n_k, B) output first, ``x`` (B, n_in), ``signs[k]`` (n_k, n_{k+1}) (the last one
    reads x), ``ref`` the nudge's reference (default the current output)."""
    n, bits = len(s), [np_bits(v, theta) for v in s]
    new = []
    for k in range(n):
        below = x.T if k == n - 1 else bits[k + 1]
        a = alphas[k] * (signs[k] @ below) + biases[k][:, None]
        if k > 0:
            a = a + alphas[k - 1] * (signs[k - 1].T @ bits[k - 1])
        nudge = beta * (y - (s[0] if ref is None else ref)) if k == 0 and beta != 0 else None
        new.append(np_filter(s[k], a, theta, g, nudge))
    return new


def np_conv(x, w, bias, pad):
    """Cross-correlation (PyTorch's conv2d): x (B, Ci, H, W), w (Co, Ci, k, k) -> (B, Co, H', W')."""
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = xp.shape[2] - k + 1, xp.shape[3] - k + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(k):
        for j in range(k):
            out += np.einsum("bchw,oc->bohw", xp[:, :, i:i + ho, j:j + wo], w[:, :, i, j])
    return out + bias[None, :, None, None]


def np_pool(a, f):
    """Max-pool of size and stride f: (pooled, flat index h * W + w of each maximum)."""
    B, C, H, W = a.shape
    ho, wo = H // f, W // f
    win = a[:, :, :ho * f, :wo * f].reshape(B, C, ho, f, wo, f).transpose(0, 1, 2, 4, 3, 5)
    win = win.reshape(B, C, ho, wo, f * f)
    arg = win.argmax(-1)
    rows = np.arange(ho)[:, None] * f + arg // f
    cols = np.arange(wo)[None, :] * f + arg % f
    return win.max(-1), rows * W + cols


def np_conv_step(s, x, net_np, theta, g, beta=0.0, y=None, ref=None):
    """One step of the conv net ``x -> conv -> pool -> fc -> 10 E`` of binary neurons: ``s`` =
    [output (B, 10 E), conv state (B, C, H, W)]; ``net_np`` = (fc signs (10E, C H W), fc alpha,
    fc bias, conv weights (float), conv bias); the flattening is PyTorch's (c, h, w) order."""
    fc_sign, fc_alpha, fc_bias, conv_w, conv_b = net_np
    b0, b1 = np_bits(s[0], theta), np_bits(s[1], theta)
    a0 = fc_alpha * (b1.reshape(len(b1), -1) @ fc_sign.T) + fc_bias
    pooled, _ = np_pool(np_conv(x, conv_w, conv_b, 1), 2)
    a1 = pooled + (fc_alpha * (b0 @ fc_sign)).reshape(s[1].shape)
    nudge = beta * (y - (s[0] if ref is None else ref)) if beta != 0 else None
    return [np_filter(s[0], a0, theta, g, nudge), np_filter(s[1], a1, theta, g)]


def assert_close(got, expected, atol=1e-5):
    got = got.detach().double().numpy() if torch.is_tensor(got) else np.asarray(got)
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------
# One step of the fc network, worked by hand
# ----------------------------------------------------------------------------------------------
def hand_fc_net():
    """64 -> 3 -> 10 (E = 1, theta 0.5, gamma_neur 0.5), weights +-alpha set by hand.

    x = (1, 0.5, 0, ..., 0); input layer alpha 0.5, rows (+ +), (+ -), (- -) on the two live
    pixels, biases (0, 0.25, 0.5): the drive is (0.75, 0.5, -0.25).  Output layer alpha 0.25."""
    net = main.build_network(fc_args("64 3 10"))
    w1 = np.ones((3, 64))
    w1[:, :2] = [[1, 1], [1, -1], [-1, -1]]
    set_layer(net.W[1], 0.5, w1, [0.0, 0.25, 0.5])
    w0 = np.array([[1, 1, 1], [1, -1, 1], [-1, -1, 1], [1, 1, -1]] + [[-1, 1, 1]] * 5 + [[-1, -1, 1]])
    set_layer(net.W[0], 0.25, w0, [0, 0.25, 0.5, -0.5, 0, 0, 0, 0, 0, 0.125])
    x = torch.zeros(1, 64)
    x[0, :2] = torch.tensor([1.0, 0.5])
    # hidden (1, 0.5, 0.25): bits (1, 1, 0), the 0.5 exactly at the threshold sends 1
    s = [t([[1.0], [0.5], [0.0], [0.75], [0.25], [0], [0], [0], [0], [0.5]]), t([[1.0], [0.5], [0.25]])]
    return net, x, s


def test_fc_step_worked_by_hand_free_and_nudged():
    """Output bits (1 1 0 1 0 0 0 0 0 1), hidden bits (1 1 0).  Counts of the output layer
    sign(W0) (1, 1, 0) = (2, 0, -2, 2, 0, 0, 0, 0, 0, -2), so a0 = 0.25 count + bias =
    (0.5, 0.25, 0, 0, 0, 0, 0, 0, 0, -0.375); the hidden layer's feedback counts sign(W0)^T b0 over
    the units 0, 1, 3, 9 = (2, 0, 2), so a1 = drive + 0.25 (2, 0, 2) = (1.25, 0.5, 0.25).
    Free: s <- clamp(s / 2 + a / 2).  Nudged (beta 0.5, label 1): a0 += 0.5 (y - s0)."""
    net, x, s = hand_fc_net()
    drive = net.input_drive(x)
    bits = [net.neurons.send(v) for v in s]
    assert bits[0].flatten().tolist() == [1, 1, 0, 1, 0, 0, 0, 0, 0, 1]
    assert bits[1].flatten().tolist() == [1, 1, 0]
    assert_close(net._counted_input(drive, bits, 0, 2).flatten(), [0.5, 0.25, 0, 0, 0, 0, 0, 0, 0, -0.375])
    assert_close(net._counted_input(drive, bits, 1, 2).flatten(), [1.25, 0.5, 0.25])
    free = net.stepper(s, drive)
    assert_close(free[0].flatten(), [0.75, 0.375, 0, 0.375, 0.125, 0, 0, 0, 0, 0.0625])
    assert_close(free[1].flatten(), [1.0, 0.5, 0.25])  # 1.125 clamped to 1
    target = net.target(torch.tensor([1]))
    # y - s0 = (-1, 0.5, 0, -0.75, -0.25, 0, 0, 0, 0, -0.5); a0 = (0, 0.5, 0, -0.375, -0.125, 0, .., -0.625)
    nudged = net.stepper(s, drive, target, beta=0.5)
    assert_close(nudged[0].flatten(), [0.5, 0.5, 0, 0.1875, 0.0625, 0, 0, 0, 0, 0])  # -0.0625 -> 0
    assert_close(nudged[1].flatten(), [1.0, 0.5, 0.25])


def fc_case(E, theta, g, B=3, seed=0):
    """64 -> 5 -> 4 -> 10 E with random signs, hand alphas and biases, states drawn from values
    around theta (at the threshold, at the mask's edges, beyond them), inputs in [0, 1]."""
    rng = np.random.default_rng(seed)
    net = main.build_network(fc_args(f"64 5 4 {10 * E}", E, theta, g))
    alphas, signs, biases = [0.25, 0.125, 0.0625], [], []
    for k, layer in enumerate(net.W):
        sg = rng.choice([-1.0, 1.0], size=tuple(layer.weight.shape))
        bias = f32(rng.uniform(-0.5, 0.5, size=layer.weight.shape[0]))
        set_layer(layer, alphas[k], sg, bias)
        signs.append(sg)
        biases.append(bias)
    edges = (theta - 0.55, theta - 0.5, theta, theta + 0.5, theta + 0.55)  # beyond, on the mask's edge
    values = sorted({v for v in edges if 0 <= v <= 1} | {0.0, 0.1, 0.5, 0.9, 1.0})
    s = [states_from(values, (n, B), rng) for n in net.sizes[:-1]]
    x = f32(rng.uniform(0, 1, size=(B, 64)))
    return net, s, x, (signs, alphas, biases)


@pytest.mark.parametrize("E, theta, g", [(1, 0.5, 0.5), (2, 0.25, 0.25), (2, 0.75, 0.5)])
def test_fc_relaxation_against_numpy(E, theta, g):
    """Two free steps, then two nudged steps that pull from the CURRENT output at each step
    (``phases`` route: ``relax``), against the NumPy step; with theta 0.25 every state above
    0.75 (0.75 itself, on the edge, is kept), with theta 0.75 every state below 0.25, is cut off
    by the mask and, in a free step, simply decays to (1 - g) s."""
    net, s, x, (signs, alphas, biases) = fc_case(E, theta, g)
    labels = torch.tensor([0, 7, 9])
    y = net.target(labels).double().numpy()
    expected_y = np.zeros((10 * E, 3))
    for b, c in enumerate([0, 7, 9]):
        expected_y[c * E:(c + 1) * E, b] = 1
    np.testing.assert_array_equal(y, expected_y)
    drive = net.input_drive(t(x))
    got = net.relax([t(v) for v in s], drive, 2).states
    ref = np_fc_step(np_fc_step(s, x, signs, alphas, biases, theta, g), x, signs, alphas, biases, theta, g)
    for k in range(len(s)):
        assert_close(got[k], ref[k])
    one = net.stepper([t(v) for v in s], drive)
    masked = np.abs(s[0] - theta) > 0.5
    assert torch.equal(net.neurons.mask(t(s[0])), torch.from_numpy(~masked))
    if theta != 0.5:  # the mask removes neurons: their input is ignored
        assert masked.any() and (~masked).any()
        assert_close(one[0][torch.from_numpy(masked)], (1 - g) * s[0][masked])
    else:
        assert not masked.any()
    beta = 0.5
    got = net.relax([t(v) for v in s], drive, 2, net.target(labels), beta).states
    step1 = np_fc_step(s, x, signs, alphas, biases, theta, g, beta, y)
    ref = np_fc_step(step1, x, signs, alphas, biases, theta, g, beta, y)  # ref: the current output
    fixed = np_fc_step(step1, x, signs, alphas, biases, theta, g, beta, y, ref=s[0])
    for k in range(len(s)):
        assert_close(got[k], ref[k])
    assert np.abs(fixed[0] - ref[0]).max() > 1e-3  # the two references are told apart


def test_every_state_starts_at_one():
    """initHidden of both networks of binary neurons: every state 1 (so every first bit is 1)."""
    net = main.build_network(fc_args("64 5 20", 2, 0.25))
    assert all(bool((v == 1).all()) and tuple(v.shape) == (n, 4) for v, n in zip(net.initHidden(4), (20, 5)))
    conv = main.build_network(conv_args(E=2))
    assert [tuple(v.shape) for v in conv.initHidden(3)] == [(3, 20), (3, 2, 4, 4)]
    assert all(bool((v == 1).all()) for v in conv.initHidden(3))


# ----------------------------------------------------------------------------------------------
# One step of the conv network (digits 8x8, convList 2 1, kernel 3, padding 1, Fpool 2, 32 -> 10E)
# ----------------------------------------------------------------------------------------------
def conv_case(E, theta, g, B=2, seed=1):
    rng = np.random.default_rng(seed)
    net = main.build_network(conv_args(E=E, theta=theta, g=g, extra="--T 3 --Kmax 2"))
    fc_sign = rng.choice([-1.0, 1.0], size=(10 * E, 32))
    fc_bias = f32(rng.uniform(-0.5, 0.5, size=10 * E))
    set_layer(net.fc[0], 0.125, fc_sign, fc_bias)
    conv_sign = rng.choice([-1.0, 1.0], size=(2, 1, 3, 3))
    conv_b = f32(rng.uniform(-0.3, 0.3, size=2))
    set_layer(net.conv[0], [0.5, 0.25], conv_sign, conv_b)
    conv_w = np.array([0.5, 0.25])[:, None, None, None] * conv_sign
    x = f32(rng.uniform(0, 1, size=(B, 1, 8, 8)))
    values = sorted({0.0, 0.1, theta - 0.5 if theta >= 0.5 else 0.0, theta, 0.5, 0.9, 1.0})
    s = [states_from(values, (B, 10 * E), rng), states_from(values, (B, 2, 4, 4), rng)]
    return net, x, s, (fc_sign, 0.125, fc_bias, conv_w, conv_b)


@pytest.mark.parametrize("E, theta, g", [(1, 0.5, 0.5), (2, 0.75, 0.25)])
def test_conv_step_against_numpy(E, theta, g):
    """One free step from hand-set states: the top conv state reads the pooled convolution of x
    (full precision, float weights alpha_c sign) plus the classifier's feedback alpha sign(W)^T b0
    in the (c, h, w) order; the output reads alpha count(sign(W) b1) + bias.  With theta 0.75 the
    mask cuts the states below 0.25 (0.25 itself, on the edge, is kept)."""
    net, x, s, net_np = conv_case(E, theta, g)
    drive = net.input_drive(t(x))
    new = net.stepper([t(v) for v in s], drive)
    ref = np_conv_step(s, x, net_np, theta, g)
    assert_close(new[0], ref[0])
    assert_close(new[1], ref[1])
    if theta != 0.5:
        masked = np.abs(s[1] - theta) > 0.5
        assert masked.any() and (np.abs(s[1] - theta) == 0.5).any() and (s[1] == theta).any()
        assert_close(new[1][torch.from_numpy(masked)], (1 - g) * s[1][masked])


@pytest.mark.parametrize("E, theta, g", [(1, 0.5, 0.5), (2, 0.75, 0.25)])
def test_conv_nudge_pulls_from_the_free_phase_output(E, theta, g):
    """``phases``: T = 3 free steps from all-ones states, then Kmax = 2 nudged steps whose nudge
    is beta (y - s0_free) with s0_free the free phase's final output, fixed through the phase
    (the original code's conv nudge), not the current output."""
    net, x, _, net_np = conv_case(E, theta, g)
    labels = torch.tensor([3, 8])
    target = net.target(labels)
    y = np.zeros((2, 10 * E))
    for b, c in enumerate([3, 8]):
        y[b, c * E:(c + 1) * E] = 1
    np.testing.assert_array_equal(target.numpy(), y)
    beta = 0.5
    free, nudged = net.phases(t(x), target, (beta,))
    s = [np.ones((2, 10 * E)), np.ones((2, 2, 4, 4))]
    for _ in range(3):
        s = np_conv_step(s, x, net_np, theta, g)
    assert_close(free.states[0], s[0])
    assert_close(free.states[1], s[1])
    fixed, current = s, s
    for _ in range(2):
        fixed = np_conv_step(fixed, x, net_np, theta, g, beta, y, ref=s[0])
        current = np_conv_step(current, x, net_np, theta, g, beta, y)
    assert_close(nudged.states[0], fixed[0])
    assert_close(nudged.states[1], fixed[1])
    assert np.abs(fixed[0] - current[0]).max() > 1e-3  # the two references are told apart


def np_conv_transpose(u, w, pad):
    """The adjoint of ``np_conv`` (PyTorch's conv_transpose2d, stride 1): u (B, Co, H, W),
    w (Co, Ci, k, k) -> (B, Ci, H + k - 1 - 2 pad, ...)."""
    k, (B, _, H, W) = w.shape[2], u.shape
    out = np.zeros((B, w.shape[1], H + k - 1, W + k - 1))
    for i in range(k):
        for j in range(k):
            out[:, :, i:i + H, j:j + W] += np.einsum("bohw,oc->bchw", u, w[:, :, i, j])
    return out[:, :, pad:out.shape[2] - pad, pad:out.shape[3] - pad]


def np_unpool(v, idx, size):
    """Max-unpool: the values ``v`` (B, C, h, w) put at the flat indices ``idx`` of (B, C) + size."""
    out = np.zeros(v.shape[:2] + (size[0] * size[1],))
    np.put_along_axis(out, idx.reshape(v.shape[:2] + (-1,)), v.reshape(v.shape[:2] + (-1,)), axis=2)
    return out.reshape(v.shape[:2] + tuple(size))


def test_two_conv_layers_step_against_numpy():
    """convList 3 2 1 (x -> conv1 1->2, 8x8 -> pool 4x4 -> conv0 2->3, 4x4 -> pool 2x2 -> 12 ->
    10), theta 0.75, gamma_neur 0.25, one free step: the top convolution reads
    pool(alpha_c count(conv(b below, sign W)) + bias) plus the classifier's feedback; the bottom
    one reads pool(conv(x) + bias) plus conv_transpose(unpool(b top, this step's indices), W)."""
    theta, g, B = 0.75, 0.25, 2
    rng = np.random.default_rng(6)
    net = main.build_network(conv_args(conv="3 2 1", theta=theta, g=g))
    fc_sign = rng.choice([-1.0, 1.0], size=(10, 12))
    fc_bias = f32(rng.uniform(-0.5, 0.5, size=10))
    set_layer(net.fc[0], 0.125, fc_sign, fc_bias)
    ws, bs = [], []
    for layer, alpha in zip(net.conv, ([0.5, 0.25, 0.125], [0.5, 0.25])):
        sign = rng.choice([-1.0, 1.0], size=tuple(layer.weight.shape))
        bias = f32(rng.uniform(-0.3, 0.3, size=len(alpha)))
        set_layer(layer, alpha, sign, bias)
        ws.append(np.array(alpha)[:, None, None, None] * sign)
        bs.append(bias)
    x = f32(rng.uniform(0, 1, size=(B, 1, 8, 8)))
    values = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    s = [states_from(values, shape, rng) for shape in ((B, 10), (B, 3, 2, 2), (B, 2, 4, 4))]
    new = net.stepper([t(v) for v in s], net.input_drive(t(x)))
    b = [np_bits(v, theta) for v in s]
    a0 = 0.125 * (b[1].reshape(B, -1) @ fc_sign.T) + fc_bias
    pooled, idx = np_pool(np_conv(b[2], ws[0], bs[0], 1), 2)
    a1 = pooled + (0.125 * (b[0] @ fc_sign)).reshape(B, 3, 2, 2)
    a2 = np_pool(np_conv(x, ws[1], bs[1], 1), 2)[0] + np_conv_transpose(np_unpool(b[1], idx, (4, 4)), ws[0], 1)
    for k, a in enumerate((a0, a1, a2)):
        assert_close(new[k], np_filter(s[k], a, theta, g))
    masked = np.abs(s[2] - theta) > 0.5
    assert masked.any()
    assert_close(new[2][torch.from_numpy(masked)], (1 - g) * s[2][masked])


# ----------------------------------------------------------------------------------------------
# The gradient uses the bits
# ----------------------------------------------------------------------------------------------
def test_fc_gradient_uses_bits_not_states():
    """computeGradient after two hand-set phases (64 -> 3 -> 20, E = 2, theta 0.25, beta 0.5,
    B = 2): .grad = -(b+[k] b+[k+1]^T - b-[k] b-[k+1]^T) / (beta B), the input layer's
    -(b+ - b-) x / (beta B), the biases' -sum(b+ - b-) / (beta B); the same formula with the
    states gives other numbers."""
    rng = np.random.default_rng(3)
    net = main.build_network(fc_args("64 3 20", 2, 0.25))
    values = [0.0, 0.1, 0.25, 0.5, 0.8, 1.0]
    plus = [states_from(values, (n, 2), rng) for n in (20, 3)]
    minus = [states_from(values, (n, 2), rng) for n in (20, 3)]
    x = f32(rng.uniform(0, 1, size=(2, 64)))
    beta, B = 0.5, 2
    net.computeGradient(t(x), Phase([t(v) for v in plus], {}), Phase([t(v) for v in minus], {}), beta)
    grads = net.weight_grads()
    bias_grads = [b.grad for b in net.biases()]

    def formula(p, m):
        c = 1.0 / (beta * B)
        dw = [-c * (p[0] @ p[1].T - m[0] @ m[1].T), -c * ((p[1] - m[1]) @ x)]
        db = [-c * (p[k] - m[k]).sum(1) for k in range(2)]
        return dw, db

    dw, db = formula([np_bits(v, 0.25) for v in plus], [np_bits(v, 0.25) for v in minus])
    for k in range(2):
        assert_close(grads[k], dw[k])
        assert_close(bias_grads[k], db[k])
    dw_s, db_s = formula(plus, minus)
    assert np.abs(dw_s[0] - dw[0]).max() > 0.1 and np.abs(dw_s[1] - dw[1]).max() > 0.1
    assert np.abs(db_s[0] - db[0]).max() > 0.1


def test_conv_gradient_uses_bits_not_states():
    """The conv net (E = 1, theta 0.75): classifier and biases as in fc with bits; the bottom
    convolution's weight gradient is the correlation of x with the bit difference unpooled at
    the max-pool indices of conv(x) + b (computed here), over -(beta B)."""
    rng = np.random.default_rng(4)
    theta, beta, B = 0.75, 0.5, 2
    net, x, _, (fc_sign, _, _, conv_w, conv_b) = conv_case(1, theta, 0.5, seed=5)
    _, idx = np_pool(np_conv(x, conv_w, conv_b, 1), 2)
    values = [0.0, 0.2, 0.5, 0.75, 0.9, 1.0]
    plus = [states_from(values, (B, 10), rng), states_from(values, (B, 2, 4, 4), rng)]
    minus = [states_from(values, (B, 10), rng), states_from(values, (B, 2, 4, 4), rng)]
    last = {"indices": [torch.from_numpy(idx)]}
    net.computeGradient(t(x), Phase([t(v) for v in plus], last), Phase([t(v) for v in minus], last), beta)

    def formula(p, m):
        c = 1.0 / (beta * B)
        dfc = -c * (p[0].T @ p[1].reshape(B, -1) - m[0].T @ m[1].reshape(B, -1))
        unpooled = np_unpool(p[1] - m[1], idx, (8, 8))
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        dconv = np.zeros((2, 1, 3, 3))
        for i in range(3):
            for j in range(3):
                dconv[:, 0, i, j] = np.einsum("bhw,bohw->o", xp[:, 0, i:i + 8, j:j + 8], unpooled)
        return [dfc, -c * dconv], [-c * (p[0] - m[0]).sum(0), -c * (p[1] - m[1]).sum((0, 2, 3))]

    dw, db = formula([np_bits(v, theta) for v in plus], [np_bits(v, theta) for v in minus])
    for k, layer in enumerate([net.fc[0], net.conv[0]]):
        assert_close(layer.weight.grad, dw[k])
        assert_close(layer.bias.grad, db[k])
    dw_s, db_s = formula(plus, minus)
    assert all(np.abs(dw_s[k] - dw[k]).max() > 0.05 for k in range(2))
    assert all(np.abs(db_s[k] - db[k]).max() > 0.05 for k in range(2))


# ----------------------------------------------------------------------------------------------
# Counts times alpha equal the float products, with the real (XNOR) alpha
# ----------------------------------------------------------------------------------------------
def test_fc_counted_input_equals_float_product():
    """A network built normally (64 -> 30 -> 16 -> 20, alpha = mean |w| of the default init):
    ``_counted_input`` of every layer equals ``W[k] b[k+1] + bias[k] + W[k-1]^T b[k-1]`` (the
    bottom: ``W x + bias``) in float64, within float32 rounding."""
    torch.manual_seed(11)
    net = main.build_network(fc_args("64 30 16 20", 2, 0.5))
    alphas = net.alphas()
    assert all(0 < a < 0.5 for a in alphas) and len(set(alphas)) == 3  # the real alphas, not 1
    g = torch.Generator().manual_seed(2)
    s = [torch.rand(n, 5, generator=g) for n in net.sizes[:-1]]
    x = torch.rand(5, 64, generator=g)
    drive = net.input_drive(x)
    b = [net.neurons.send(v) for v in s]
    W = [layer.weight.detach().double() for layer in net.W]
    bias = [layer.bias.detach().double()[:, None] for layer in net.W]
    bd = [v.double() for v in b]
    n = len(s)
    for k in range(n):
        below = x.double().t() if k == n - 1 else bd[k + 1]
        ref = W[k] @ below + bias[k] + (W[k - 1].t() @ bd[k - 1] if k > 0 else 0)
        got = net._counted_input(drive, b, k, n).double()
        assert (ref - got).abs().max() < 2e-6 * max(1.0, float(ref.abs().max()))
        assert float(ref.abs().max()) > 0.5  # not a trivially small input


def test_conv_counted_term_equals_float_convolution():
    """convList 4 2 1 (the top convolution reads the bits of the bottom one's state), alpha per
    output channel from the default init, biases set nonzero: ``_conv_term`` equals
    ``conv2d(b, alpha sign W) + bias`` in float64 within float32 rounding."""
    torch.manual_seed(12)
    net = main.build_network(conv_args(conv="4 2 1"))
    alpha = net.conv[0].weight.detach().flatten(1).abs()
    assert bool((alpha == alpha[:, :1]).all()) and len(set(alpha[:, 0].tolist())) > 1
    assert float(alpha.max()) < 0.9
    with torch.no_grad():
        net.conv[0].bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.4]))
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 1, 8, 8, generator=g)
    drive = net.input_drive(x)
    below = net.neurons.send(torch.rand(3, 2, 4, 4, generator=g)).contiguous(memory_format=torch.channels_last)
    got = net._conv_term(drive, 0, below).double()
    ref = F.conv2d(below.double(), net.conv[0].weight.detach().double(), net.conv[0].bias.detach().double(),
                   padding=1)
    assert (ref - got).abs().max() < 2e-6 * max(1.0, float(ref.abs().max()))
    assert float(ref.abs().max()) > 0.5


# ----------------------------------------------------------------------------------------------
# Readouts and error counts
# ----------------------------------------------------------------------------------------------
# E = 2, five samples; class c owns outputs 2c, 2c + 1
HAND_OUT = np.zeros((5, 20))
HAND_OUT[0, [6, 7, 14, 15]] = [0.9, 0.9, 1.0, 0.0]   # label 3: mean 3 (0.9) > 7 (0.5); first: 7 (1.0)
HAND_OUT[1, [4, 5, 10, 11]] = [0.2, 1.0, 0.8, 0.1]   # label 5: mean 2 (0.6) > 5 (0.45); first: 5
HAND_OUT[2, [0, 1, 18, 19]] = [1.0, 0.8, 0.6, 0.6]   # label 9: mean 0 (0.9); first: 0
HAND_OUT[3, [8, 9]] = [0.7, 0.7]                     # label 4: both readouts 4
HAND_OUT[4, [12, 13, 2, 3]] = [0.3, 0.9, 0.5, 0.5]   # label 6: mean 6 (0.6) > 1 (0.5); first: 1
HAND_LABELS = [3, 5, 9, 4, 6]


def test_readouts_on_a_hand_made_output():
    out = t(HAND_OUT)
    pop = class_scores(out, 2)
    assert tuple(pop.shape) == (5, 10)
    assert_close(pop, HAND_OUT.reshape(5, 10, 2).mean(2), atol=1e-7)
    assert_close(pop[0, [3, 7]], [0.9, 0.5], 1e-7)
    assert_close(pop[1, [2, 5]], [0.6, 0.45], 1e-7)
    assert pop.argmax(1).tolist() == [3, 2, 0, 4, 6]
    first = first_neuron_scores(out, 2)
    assert_close(first, f32(HAND_OUT)[:, 0::2], atol=0)
    assert first.argmax(1).tolist() == [7, 5, 0, 4, 1]
    assert torch.equal(class_scores(out, 1), out) and torch.equal(first_neuron_scores(out, 1), out)


def test_scores_count_the_wrong_predictions_of_each_readout():
    """``loops._scores`` on the hand batch: population readout wrong on samples 1, 2 (2), the
    summed loss ||s0 - y||^2 / 2, first-neuron readout wrong on samples 0, 2, 4 (3); the error
    rates 40 % and 60 %; a rate (bin_W) network reports no first-neuron count."""
    y = np.zeros((5, 20))
    for b, c in enumerate(HAND_LABELS):
        y[b, 2 * c:2 * c + 2] = 1
    loss = 0.5 * ((HAND_OUT - y) ** 2).sum()
    labels = torch.tensor(HAND_LABELS)
    net = main.build_network(fc_args("64 3 20", 2))
    scores = loops._scores(net, [t(HAND_OUT.T), torch.ones(3, 5)], labels)
    assert scores.dtype == torch.float64
    assert_close(scores, [2, loss, 3])
    rates = loops._rates("test", scores.tolist(), 5)
    assert rates["test_error"] == pytest.approx(40.0) and rates["test_error_single"] == pytest.approx(60.0)
    assert rates["test_loss"] == pytest.approx(loss / 5, rel=1e-6)
    rate_net = main.build_network(parse("--device -1 --dataset digits --outDir /tmp --seed 0 "
                                        "--layersList 64 3 20 --expand_output 2"))
    assert_close(loops._scores(rate_net, [t(HAND_OUT.T), torch.ones(3, 5)], labels), [2, loss])


# ----------------------------------------------------------------------------------------------
# Conv bin_W_N initialisation
# ----------------------------------------------------------------------------------------------
def test_conv_binary_initialisation_and_first_filter_update():
    """The conv bin_W_N network: the weights are bin_W's (same seed, same binarised default
    init), the biases 0, and each layer's filter starts at 2 gamma_k N(0, 1), the next draws of
    the seeded torch generator (fc0 then conv0); the same seed gives the same filters, another
    seed others.  After one step with a hand .grad g: m = (1 - gamma) m0 + gamma g."""
    args = conv_args()
    gammas = args.gamma
    assert gammas == [1e-3, 2e-3]
    torch.manual_seed(21)
    net = main.build_network(args)
    torch.manual_seed(21)
    rate = main.build_network(conv_args(settings=""))
    assert rate.neurons.kind == "rate" and net.neurons.kind == "binary"
    ws, rate_ws = net.binary_weights(), rate.binary_weights()
    expected = [2 * g * torch.randn(w.shape) for g, w in zip(gammas, rate_ws)]
    m0 = [net.optW.state[w]["filtered_grad"].clone() for w in ws]
    for k in range(2):
        assert torch.equal(ws[k], rate_ws[k])
        assert torch.equal(m0[k], expected[k])
        assert bool((net.biases()[k] == 0).all()) and bool((rate.biases()[k] != 0).any())
    pooled = torch.cat([(m / (2 * g)).flatten() for m, g in zip(m0, gammas)])
    assert abs(float(pooled.mean())) < 0.25 and 0.75 < float(pooled.std()) < 1.25
    saved = net.optW.state_dict()["state"]
    assert torch.equal(saved[0]["filtered_grad"], m0[0]) and torch.equal(saved[1]["filtered_grad"], m0[1])
    torch.manual_seed(21)
    again = main.build_network(args)
    torch.manual_seed(22)
    other = main.build_network(args)
    for k, w in enumerate(again.binary_weights()):
        assert torch.equal(again.optW.state[w]["filtered_grad"], m0[k])
    assert not torch.equal(other.optW.state[other.binary_weights()[0]]["filtered_grad"], m0[0])
    grads = []
    for w in ws:
        w.grad = torch.linspace(-1e-3, 1e-3, w.numel()).reshape(w.shape)
        grads.append(w.grad.clone())
    net.optW.step()
    for k, (w, g) in enumerate(zip(ws, gammas)):
        assert_close(net.optW.state[w]["filtered_grad"], ((1 - g) * m0[k] + g * grads[k]).double().numpy(),
                     atol=1e-9)


def test_fc_binary_network_keeps_the_bin_w_initialisation():
    """Only the conv bin_W_N starts its filters and biases differently: the fc network of
    binary neurons keeps the default biases and filters that start at 0 (m = gamma g)."""
    torch.manual_seed(5)
    net = main.build_network(fc_args("64 3 20", 2))
    assert all(bool((b != 0).any()) for b in net.biases())
    ws = net.binary_weights()
    for w in ws:
        w.grad = torch.full(w.shape, 1e-3)
    net.optW.step()
    for w, g in zip(ws, net.args.gamma):
        assert_close(net.optW.state[w]["filtered_grad"], np.full(tuple(w.shape), g * 1e-3), atol=1e-12)
