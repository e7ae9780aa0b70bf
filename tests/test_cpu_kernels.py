"""The compiled CPU kernel of the convolutional feedback (cpu_kernels.c) against PyTorch's dense
``max_unpool2d`` + ``conv_transpose2d``, inside the network and on its own, and its build."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import Tools_conv
from binary_ep import cpu_kernels
from Network_conv import Network_conv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CL = torch.channels_last

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="no working C compiler here")


def pooled_case(batch, c_in, c_out, size, kernel, padding, fpool, zeros, seed=0):
    """A convolution's pooled states, indices and weight as the network makes them."""
    g = torch.Generator().manual_seed(seed)
    below = torch.rand(batch, c_in, size, size, generator=g).contiguous(memory_format=CL)
    w = torch.randn(c_out, c_in, kernel, kernel, generator=g).contiguous(memory_format=CL)
    conv = F.conv2d(below, w, padding=padding)
    _, indices = F.max_pool2d(conv, fpool, fpool, return_indices=True)
    s = torch.rand(indices.shape, generator=g)
    s[torch.rand(indices.shape, generator=g) < zeros] = 0.0  # rho clamps many states to 0
    return s.contiguous(memory_format=CL), indices.contiguous(memory_format=CL), w, conv.shape[2:]


def dense(s, indices, w, conv_size, padding, fpool):
    return F.conv_transpose2d(F.max_unpool2d(s, indices, fpool, fpool, output_size=conv_size), w,
                              padding=padding)


GEOMETRIES = [  # batch, channels in/out of the convolution, input size, kernel, padding, Fpool
    (6, 32, 64, 12, 5, 0, 2),   # the seed's MNIST top convolution
    (4, 3, 8, 16, 5, 2, 2),     # padding: kernel taps fall outside the image
    (3, 5, 7, 11, 3, 1, 3),     # Fpool 3, a convolution output not divisible by the pool
    (2, 4, 6, 9, 5, 2, 2),      # odd size with padding
    (2, 1, 3, 7, 7, 3, 4),      # kernel as large as the image
]


@needs_kernel
@pytest.mark.parametrize("batch,c_in,c_out,size,kernel,padding,fpool", GEOMETRIES)
def test_kernel_equals_dense_unpool_and_transposed_convolution(batch, c_in, c_out, size, kernel, padding, fpool):
    s, indices, w, conv_size = pooled_case(batch, c_in, c_out, size, kernel, padding, fpool, zeros=0.4)
    ref = dense(s, indices, w, conv_size, padding, fpool)
    base = torch.randn(ref.shape).contiguous(memory_format=CL)
    got = cpu_kernels.unpool_conv_transpose(s, indices, w, conv_size, padding, fpool, base=base)
    assert got.shape == ref.shape and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, ref + base, rtol=1e-5, atol=1e-5)
    alone = cpu_kernels.unpool_conv_transpose(s, indices, w, conv_size, padding, fpool)  # base None
    torch.testing.assert_close(alone, ref, rtol=1e-5, atol=1e-5)
    inplace = base.clone()
    out = cpu_kernels.unpool_conv_transpose(s, indices, w, conv_size, padding, fpool, base=inplace, out=inplace)
    assert out.data_ptr() == inplace.data_ptr()
    torch.testing.assert_close(inplace, ref + base, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("batch,c_in,c_out,size,kernel,padding,fpool", GEOMETRIES)
def test_the_feedback_kept_up_to_date_equals_the_dense_feedback(batch, c_in, c_out, size, kernel, padding, fpool):
    s, indices, w, conv_size = pooled_case(batch, c_in, c_out, size, kernel, padding, fpool, zeros=0.4)
    g = torch.Generator().manual_seed(3)
    w = w.sign() * 0.05  # binary weights, as the network's
    acc = cpu_kernels.unpool_conv_transpose(s, indices, w, conv_size, padding, fpool)
    prev_s, prev_idx = s.clone(memory_format=CL), indices.clone(memory_format=CL)
    hp, wp = s.shape[2:]
    corner = (torch.arange(hp).view(hp, 1) * fpool * conv_size[1] + torch.arange(wp) * fpool)
    for fraction in [0.05, 0.3, 0.0, 1.0, 0.1, 0.6, 0.02] * 3:
        moved = torch.rand(s.shape, generator=g) < fraction
        s = s.clone()
        s[moved] = torch.rand(int(moved.sum()), generator=g)
        s[moved & (torch.rand(s.shape, generator=g) < 0.4)] = 0.0  # some to zero, some from zero
        # some indices move elsewhere in their window
        jump = moved & (torch.rand(s.shape, generator=g) < 0.5)
        offset = (torch.randint(0, fpool, s.shape, generator=g) * conv_size[1]
                  + torch.randint(0, fpool, s.shape, generator=g))
        new_idx = torch.where(jump, corner + offset, indices)
        s, indices = s.contiguous(memory_format=CL), new_idx.contiguous(memory_format=CL)
        changed = ((s != prev_s) | ((s != 0) & (indices != prev_idx))).flatten(1).sum(1)
        full = cpu_kernels.unpool_conv_transpose_delta(s, indices, prev_s, prev_idx, w, acc, padding, fpool, 0.5)
        assert full == int((changed > int(0.5 * s[0].numel())).sum())  # the samples recomputed in full
        assert torch.equal(prev_s, s) and torch.equal(prev_idx, indices)
        torch.testing.assert_close(acc, dense(s, indices, w, conv_size, padding, fpool), rtol=1e-5, atol=1e-5)
    far = indices.clone()
    far[0, 0, 0, 0] = conv_size[1] * 3 + fpool  # outside the first window
    with pytest.raises(ValueError, match=f"outside its {fpool}x{fpool} pooling window"):
        cpu_kernels.unpool_conv_transpose_delta(s.clone(memory_format=CL).add_(1), far, prev_s, prev_idx, w, acc,
                                                padding, fpool)


@needs_kernel
def test_a_samples_feedback_does_not_depend_on_its_batch():
    s, indices, w, conv_size = pooled_case(8, 32, 64, 12, 5, 0, 2, zeros=0.4)
    whole = cpu_kernels.unpool_conv_transpose(s, indices, w, conv_size, 0, 2)
    for b in (0, 5):
        one = cpu_kernels.unpool_conv_transpose(s[b:b + 1].contiguous(memory_format=CL),
                                                indices[b:b + 1].contiguous(memory_format=CL), w, conv_size, 0, 2)
        assert torch.equal(one[0], whole[b])


@needs_kernel
def test_bad_inputs_are_refused():
    s, indices, w, conv_size = pooled_case(2, 4, 6, 9, 5, 2, 2, zeros=0.0)
    with pytest.raises(ValueError, match="channels-last"):
        cpu_kernels.unpool_conv_transpose(s.contiguous(), indices, w, conv_size, 2, 2)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.unpool_conv_transpose(s.double().contiguous(memory_format=CL), indices, w.double(), conv_size, 2, 2)
    far = indices.clone()
    far[0, 0, 0, 0] = conv_size[1] * 3  # a position two rows below the first window
    with pytest.raises(ValueError, match="outside its 2x2 pooling window"):
        cpu_kernels.unpool_conv_transpose(s, far, w, conv_size, 2, 2)


TRACKED = [  # batch, channels in/out, input size, kernel, padding
    (3, 32, 64, 12, 5, 0),      # the seed's MNIST top convolution
    (2, 5, 7, 9, 5, 2),         # padding: inputs reach outputs through part of the kernel only
    (2, 3, 4, 6, 3, 1),
    (1, 2, 9, 7, 7, 3),         # kernel as large as the image
]


@needs_kernel
@pytest.mark.parametrize("batch,c_in,c_out,size,kernel,padding", TRACKED)
def test_conv_delta_keeps_a_convolution_up_to_date(batch, c_in, c_out, size, kernel, padding):
    g = torch.Generator().manual_seed(1)
    # binary weights, +-alpha per output channel, as the network's
    alpha = 0.02 + 0.08 * torch.rand(c_out, 1, 1, 1, generator=g)
    w = torch.randn(c_out, c_in, kernel, kernel, generator=g).sign() * alpha
    bias = torch.randn(c_out, generator=g) * 0.1
    s = torch.rand(batch, c_in, size, size, generator=g).contiguous(memory_format=CL)
    acc = F.conv2d(s, w, bias, padding=padding).contiguous(memory_format=CL)
    prev = s.clone(memory_format=CL)
    wt = cpu_kernels.flipped_weight(w)
    # a relaxation-like sequence: few, many, all and no inputs change, some to exactly 0
    for step, fraction in enumerate([0.05, 0.3, 1.0, 0.0, 0.6, 0.2, 0.01, 0.5] * 3):
        new = s.clone()
        moved = torch.rand(s.shape, generator=g) < fraction
        new[moved] = torch.rand(int(moved.sum()), generator=g)
        new[moved & (torch.rand(s.shape, generator=g) < 0.3)] = 0.0
        s = new.contiguous(memory_format=CL)
        skipped = cpu_kernels.conv_delta(s, prev, wt, acc, padding)
        assert not skipped.any() and torch.equal(prev, s)
        torch.testing.assert_close(acc, F.conv2d(s, w, bias, padding=padding), rtol=1e-5, atol=1e-5)
    # a sample's update does not depend on the batch it is in
    if batch > 1:
        old = s[1:2].clone(memory_format=CL)
        one_acc, one_prev = acc[1:2].clone(memory_format=CL), old.clone(memory_format=CL)
        whole_prev = s.clone(memory_format=CL)
        s2 = torch.rand(s.shape, generator=g).contiguous(memory_format=CL)
        cpu_kernels.conv_delta(s2, whole_prev, wt, acc, padding)
        cpu_kernels.conv_delta(s2[1:2].contiguous(memory_format=CL), one_prev, wt, one_acc, padding)
        assert torch.equal(one_acc[0], acc[1])


@needs_kernel
def test_conv_delta_leaves_samples_with_too_many_changes_alone():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 4, 3, 3, generator=g).sign() * 0.05
    s = torch.rand(3, 4, 6, 6, generator=g).contiguous(memory_format=CL)
    acc = F.conv2d(s, w, padding=1).contiguous(memory_format=CL)
    prev = s.clone(memory_format=CL)
    new = s.clone()
    new[0, :, :2] += 1.0        # 48 of 144 values: a third
    new[1, 0, 0, :2] += 1.0     # 2 values
    new[2] += 1.0               # all of them
    new = new.contiguous(memory_format=CL)
    acc0 = acc.clone()
    skipped = cpu_kernels.conv_delta(new, prev, wt=cpu_kernels.flipped_weight(w), acc=acc, padding=1,
                                     max_changed=0.3)
    assert skipped.tolist() == [True, False, True]
    for b in (0, 2):  # untouched
        assert torch.equal(acc[b], acc0[b]) and torch.equal(prev[b], s[b])
    torch.testing.assert_close(acc[1], F.conv2d(new, w, padding=1)[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(prev[1], new[1])


@needs_kernel
@pytest.mark.parametrize("changes", [(1.0, 0.01), (1.0, 1.0), (0.0, 0.0), (0.05, 0.2)],
                         ids=["mixed", "all-dense", "unchanged", "all-updates"])
def test_a_tracked_convolution_equals_the_convolution_of_its_input(changes):
    """Network_conv's tracked convolution, whichever way each sample is brought up to date."""
    torch.manual_seed(0)
    net = Network_conv(conv_args(0))
    with torch.no_grad():
        drive = net.input_drive(Tools_conv.prepare_images(net, torch.rand(2, 1, 28, 28)))
        below = net.initHidden(2)[-1].uniform_()
        first = net._tracked_conv(drive, 0, below).clone()
        torch.testing.assert_close(first, F.conv2d(below, net.conv[0].weight, net.conv[0].bias))
        for b, fraction in enumerate(changes):
            below[b][torch.rand(below[b].shape) < fraction] = 0.0
        got = net._tracked_conv(drive, 0, below)
        assert drive.tracked[("conv", 0)].updates == 1
        torch.testing.assert_close(got, F.conv2d(below, net.conv[0].weight, net.conv[0].bias),
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(drive.tracked[("conv", 0)].prev, below)


@needs_kernel
def test_conv_delta_refuses_bad_inputs():
    w = torch.randn(6, 4, 3, 3)
    s = torch.rand(2, 4, 8, 8).contiguous(memory_format=CL)
    acc = F.conv2d(s, w, padding=1).contiguous(memory_format=CL)
    wt = cpu_kernels.flipped_weight(w)
    with pytest.raises(ValueError, match="prev must be channels-last"):
        cpu_kernels.conv_delta(s, s.contiguous(), wt, acc, 1)
    with pytest.raises(ValueError, match="acc has shape"):
        cpu_kernels.conv_delta(s, s.clone(), wt, acc, 0)  # padding 0 gives 6x6 outputs
    with pytest.raises(ValueError, match="wt has shape"):
        cpu_kernels.conv_delta(s, s.clone(), w.contiguous(memory_format=CL), acc, 1)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.conv_delta(s.double(), s.double(), wt.double(), acc.double(), 1)


def conv_args(padding):
    return SimpleNamespace(dataset="mnist", convList=[16, 8, 1], kernelSize=5, padding=padding, Fpool=2,
                           layersList=[10], activationFun="hardsigm", gamma=[1e-4] * 3,
                           gradThreshold=[1e-6] * 3, lrBias=[0.01] * 3, lrAlpha=[0.0] * 3, learnAlpha=0,
                           binary_settings="bin_W", expand_output=1)  # rate neurons: the kernels' path


@needs_kernel
@pytest.mark.parametrize("padding,convs", [(0, [16, 8, 1]), (2, [16, 8, 1]), (2, [12, 8, 6, 1])],
                         ids=["pad0", "pad2", "three-convs"])
def test_relaxation_with_the_kernel_equals_the_dense_path(padding, convs, monkeypatch):
    """T = 60 takes the tracked convolutions through two full recomputations and many updates."""
    torch.manual_seed(0)
    args = conv_args(padding)
    n = len(convs)
    args.convList, args.gamma, args.gradThreshold, args.lrBias, args.lrAlpha = \
        convs, [1e-4] * n, [1e-6] * n, [0.01] * n, [0.0] * n
    net = Network_conv(args)
    net.args = SimpleNamespace(T=60, Kmax=5, nudging="one-sided")
    x = Tools_conv.prepare_images(net, torch.rand(6, 1, 28, 28))
    target = net.target(torch.randint(0, 10, (6,)))
    updates = []
    for name in ("conv_delta", "unpool_conv_transpose_delta"):
        delta = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, name=name, delta=delta: updates.append(name) or delta(*a))
    with torch.no_grad():
        fast = net.phases(x, target, (0.5,))
        # every state-driven convolution and every feedback, every step but the full
        # recomputations (steps 1, 27, 53)
        for name in ("conv_delta", "unpool_conv_transpose_delta"):
            assert updates.count(name) == (n - 2) * (60 + 5 - 3)
        monkeypatch.setitem(cpu_kernels._STATE, "fn", None)  # as without a compiler
        assert not cpu_kernels.available()
        slow = net.phases(x, target, (0.5,))
    for a, b in zip(fast, slow):
        for u, v in zip(a.states, b.states):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


def run_python(code, env_extra, tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), **env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_without_a_compiler_the_network_says_so_once_and_uses_the_dense_path(tmp_path):
    code = ("import torch\nfrom binary_ep import cpu_kernels\n"
            "print(cpu_kernels.available(), cpu_kernels.available())\n")
    run = run_python(code, {"CC": str(tmp_path / "no-such-cc")}, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]
    assert run.stderr.count("note: the compiled CPU kernels are unavailable") == 1
    assert "no-such-cc could not run" in run.stderr and "Traceback" not in run.stderr
    quiet = run_python(code, {"EP_CPU_KERNELS": "0"}, tmp_path)
    assert quiet.stdout.split() == ["False", "False"] and quiet.stderr == ""


@needs_kernel
def test_concurrent_first_builds_all_get_a_whole_library(tmp_path):
    code = "from binary_ep import cpu_kernels; print(cpu_kernels.available())"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [o.strip() for o, _ in outs] == ["True"] * 4, outs
    built = os.listdir(tmp_path / "cache" / "binary-eqprop")
    assert len(built) == 1 and built[0].startswith("cpu_kernels-") and built[0].endswith(".so")


def test_a_library_that_cannot_be_loaded_falls_back_with_the_note(tmp_path, monkeypatch, capsys):
    junk = tmp_path / "cpu_kernels-junk.so"
    junk.write_text("not a shared library")
    monkeypatch.setattr(cpu_kernels, "_build", lambda: (str(junk), None))
    assert cpu_kernels._load() is None
    err = capsys.readouterr().err
    assert "note: the compiled CPU kernels are unavailable" in err and "could not be loaded" in err
