"""The device a run computes on and how it computes there (issue 20, DESIGN.md section 11):
float32 unless ``--tf32 1``, deterministic cuDNN, ``--device N`` made the current CUDA device,
and the one warning that says why CUDA cannot be used.  CUDA is mocked: everything runs here,
in-process, on a machine without a GPU."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import main
from binary_ep import distributed
from binary_ep.device import cuda_problem, prepare

QUICK = ("--archi fc --dataset digits --layersList 64 16 10 --T 4 --Kmax 2 --beta 0.5 --gamma 0.01 0.01 "
         "--gradThreshold 1e-6 1e-6 --lrBias 0.05 0.1 --batchSize 32 --test_batchSize 200 "
         "--trainSubset 64 --testSubset 64 --seed 1").split()
BUILD = f"torch {torch.__version__}"
FALLBACK = "warning: --device 0 asked for a GPU but CUDA is not available; running on the CPU: "


@pytest.fixture(autouse=True)
def backends():
    """Each test starts from torch's defaults (cuDNN's TF32 on, as on an Ampere GPU) and leaves
    the process as it found it."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False, True
    yield
    torch.set_float32_matmul_precision(saved[0])
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.benchmark) = saved[1:]
    distributed.stop()


def node(monkeypatch, capabilities, arches=("sm_80", "sm_90", "compute_90")):
    """A mocked node with one GPU per entry of ``capabilities`` ((major, minor) each), a torch
    built for ``arches``; returns the list ``torch.cuda.set_device`` appends its argument to."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"GPU-{i}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capabilities[i])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arches))
    monkeypatch.setattr(torch.version, "hip", None)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


def no_cuda(monkeypatch, cuda="13.0", init_error=None, torch_warning=None):
    """A mocked machine where ``torch.cuda.is_available()`` is False (emitting ``torch_warning``,
    as torch does once for a driver it cannot use), for a torch built for CUDA ``cuda`` (None:
    a CPU build) whose ``torch.cuda.init()`` raises ``RuntimeError(init_error)``."""
    def available():
        if torch_warning:
            warnings.warn(torch_warning)
        return False

    def init():
        raise RuntimeError(init_error)
    monkeypatch.setattr(torch.cuda, "is_available", available)
    monkeypatch.setattr(torch.cuda, "init", init)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", None)


def fallback(capsys, index=0):
    """``select_device(index)`` on the mocked machine: the one stderr line it prints (it must
    return the CPU, print no other line and let no warning of torch's through)."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert distributed.select_device(pytest.fail, index) == torch.device("cpu")
    assert [str(w.message) for w in caught] == []
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_float32_unless_tf32_is_asked_for_on_a_gpu(monkeypatch):
    """cuDNN's default TF32 convolutions (a 1e-3 relative error against flip thresholds of 1e-8)
    are switched off, and so are TF32 matmuls; ``--tf32 1`` turns both on, on a GPU only (on the
    CPU "high" would let oneDNN use TF32 too)."""
    calls = node(monkeypatch, [(9, 0)])
    assert prepare(torch.device("cuda", 0), 0) == torch.device("cuda", 0)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    assert torch.get_float32_matmul_precision() == "highest"
    prepare(torch.device("cuda", 0), 1)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    assert torch.get_float32_matmul_precision() == "high"
    assert prepare(torch.device("cpu"), 1) == torch.device("cpu")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    assert torch.get_float32_matmul_precision() == "highest"
    assert calls == [torch.device("cuda", 0)] * 2  # the CPU sets no CUDA device
    text = " ".join(main.build_parser().format_help().split())
    assert "--tf32 {0,1}" in text and "1e-3 relative error" in text and "1e-8" in text


def test_cudnn_is_deterministic_and_max_unpool_still_runs(monkeypatch):
    """cuDNN picks deterministic algorithms and does not benchmark; PyTorch's global deterministic
    mode stays off, which would make the conv network's ``max_unpool2d`` raise."""
    node(monkeypatch, [(8, 0)])
    prepare(torch.device("cuda", 0), 0)
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)
    assert not torch.are_deterministic_algorithms_enabled()
    pooled, indices = F.max_pool2d(torch.arange(16.0).reshape(1, 1, 4, 4), 2, 2, return_indices=True)
    assert F.max_unpool2d(pooled, indices, 2, 2).sum().item() == 5 + 7 + 13 + 15


@pytest.mark.parametrize("tf32", [0, 1])
def test_device_1_becomes_the_current_cuda_device(monkeypatch, tmp_path, tf32):
    """``--device 1`` on a node with two GPUs: the run's device is GPU 1 and it is made the
    current CUDA device (else pinned memory and a second CUDA context land on GPU 0), with
    float32 unless ``--tf32 1``."""
    calls = node(monkeypatch, [(9, 0), (9, 0)])
    for v in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    parser, args, _ = main.parse(QUICK + ["--device", "1", "--tf32", str(tf32), "--outDir", str(tmp_path)])
    assert distributed.start(parser, args).device == torch.device("cuda", 1)
    assert calls == [torch.device("cuda", 1)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (bool(tf32),) * 2
    assert torch.backends.cudnn.deterministic


def test_a_torch_built_without_cuda(monkeypatch, capsys):
    no_cuda(monkeypatch, cuda=None, init_error="Torch not compiled with CUDA enabled")
    assert fallback(capsys) == (f"{FALLBACK}{BUILD} is built without CUDA; install a CUDA build of torch, "
                                f"or give --device -1 to run on the CPU without this warning")


def test_no_nvidia_driver(monkeypatch, capsys):
    no_cuda(monkeypatch, init_error="Found no NVIDIA driver on your system. Please check that you have an "
            "NVIDIA GPU and installed a driver from http://www.nvidia.com/Download/index.aspx")
    assert fallback(capsys) == (f"{FALLBACK}no NVIDIA driver was found (this machine has no NVIDIA GPU, or "
                                f"its driver is not installed); give --device -1 to run on the CPU without "
                                f"this warning")


def test_a_driver_too_old_for_the_build(monkeypatch, capsys):
    """The driver's CUDA version (12020: 12.2) against the build's (``torch.version.cuda``);
    torch's own warning about it does not get through: one line."""
    message = ("The NVIDIA driver on your system is too old (found version 12020). Please update your "
               "GPU driver by downloading and installing a new version from the URL: "
               "http://www.nvidia.com/Download/index.aspx")
    no_cuda(monkeypatch, cuda="13.0", init_error=message, torch_warning=f"CUDA initialization: {message}")
    assert fallback(capsys) == (f"{FALLBACK}the NVIDIA driver (version 12020, for CUDA 12.2) is too old for "
                                f"{BUILD}, built for CUDA 13.0; update the driver, or install a torch built "
                                f"for CUDA 12.2 or older")


def test_no_gpu_visible(monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    no_cuda(monkeypatch, init_error="No CUDA GPUs are available")
    assert fallback(capsys) == (f"{FALLBACK}the NVIDIA driver shows no GPU (CUDA_VISIBLE_DEVICES=''); "
                                f"give --device -1 to run on the CPU without this warning")


def test_a_gpu_whose_architecture_the_build_lacks(monkeypatch, capsys):
    """torch kernels exist for sm_75 .. sm_90: a 6.1 GPU (a GTX 1080, say) cannot run them."""
    node(monkeypatch, [(8, 0), (6, 1)], arches=("sm_75", "sm_80", "sm_90"))
    assert fallback(capsys, 1) == (
        "warning: --device 1 asked for a GPU but CUDA is not available; running on the CPU: GPU 1 (GPU-1) "
        f"has compute capability 6.1 (sm_61), which {BUILD} has no kernels for (it has sm_75, sm_80, "
        "sm_90); install a torch built for sm_61, or give --device -1 to run on the CPU without this warning")


@pytest.mark.parametrize("capability, arches, usable", [
    ((8, 6), ["sm_80"], True),  # machine code runs on later minors of its major version
    ((8, 0), ["sm_86"], False),  # ... not on earlier ones
    ((9, 0), ["sm_80"], False),  # ... nor on another major version
    ((9, 0), ["sm_80", "compute_80"], True),  # PTX, compiled by the driver, on any later GPU
    ((7, 5), ["compute_80"], False),
    ((9, 0), ["sm_90a"], True),  # architecture-specific code: that capability alone
    ((10, 3), ["sm_90a", "sm_100"], True),
    ((12, 1), ["sm_90a", "sm_100"], False),
])
def test_which_gpus_the_kernels_of_a_build_run_on(monkeypatch, capability, arches, usable):
    node(monkeypatch, [capability], arches)
    problem = cuda_problem(0)
    assert (problem is None) == usable, problem
    if not usable:
        assert f"compute capability {capability[0]}.{capability[1]}" in problem


def test_tf32_may_change_on_resume(tmp_path, monkeypatch):
    """``--tf32`` is how the GPU computes, not what the network is (like ``--device``): a resume
    may change it, and keeps the saved value when it is not given."""
    monkeypatch.setattr(main, "plot_run", lambda path: None)  # (the figures are not the point)
    assert main.main(QUICK + ["--device", "-1", "--epochs", "1", "--outDir", str(tmp_path)]) == 0
    (run,) = tmp_path.glob("DATA-0-*/*/S-*")
    assert main.parse(["--resume", str(run)])[1].tf32 == 0
    assert main.parse(["--resume", str(run), "--tf32", "1"])[1].tf32 == 1
