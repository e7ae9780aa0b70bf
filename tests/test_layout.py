"""The layout (DESIGN.md section 2): imports point one way, no source file over 450 lines, the
seed's Tools modules are what main.py runs, the gradient contract, and no hidden mutation."""

import ast
import glob
import os

import pytest
import torch

import main
import Tools_conv
import Tools_fc
from binary_ep.binary_optimizer import BinaryFlip
from binary_ep.estimators import EP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_FACE = ["main.py", "Network_fc.py", "Network_conv.py", "Tools_fc.py", "Tools_conv.py", "plotFunctions.py"]


def sources():
    """Every source file of the program (tests and benchmarks are not)."""
    return SEED_FACE + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "binary_ep", "*.py")))


def imported_modules(path):
    """Top-level names of every module ``path`` imports (``import x.y``, ``from x import y``,
    ``from binary_ep import y`` as ``binary_ep.y``, and ``importlib.import_module("x")``)."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports would hide the package's edges
                names.add("<relative>")
            elif node.module == "binary_ep":
                names |= {"binary_ep." + a.name for a in node.names} | {"binary_ep"}
            else:
                names.add(node.module.split(".")[0])
                if node.module.startswith("binary_ep."):
                    names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant):
            names.add(node.args[0].value.split(".")[0])
    return names


def test_the_top_level_is_the_seed_face_and_the_package_holds_the_rest():
    top = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
    assert top == sorted(SEED_FACE)
    assert os.path.exists(os.path.join(ROOT, "binary_ep", "cpu_kernels.c"))  # the C source beside its loader


def test_no_source_file_is_over_450_lines():
    lengths = {p: sum(1 for _ in open(os.path.join(ROOT, p))) for p in sources() + ["binary_ep/cpu_kernels.c"]}
    assert max(lengths.values()) <= 450, {p: n for p, n in lengths.items() if n > 450}


def test_imports_point_one_way():
    project = {"main", "plotFunctions", "Network_fc", "Network_conv", "Tools_fc", "Tools_conv", "binary_ep"}
    edges = {p: imported_modules(p) for p in sources()}
    assert not edges["plotFunctions.py"] & project  # copied into run folders: standalone
    for path, names in edges.items():
        assert "<relative>" not in names, path
        if path != "main.py":
            assert "main" not in names, path
        if path.startswith("Network_"):
            assert not {"Tools_fc", "Tools_conv"} & names, path
        if path.startswith("binary_ep/"):
            assert not {"main", "Network_fc", "Network_conv", "Tools_fc", "Tools_conv", "plotFunctions"} & names, path
    assert "Tools_conv" not in edges["Tools_fc.py"] and "Tools_fc" not in edges["Tools_conv.py"]
    # the package's __init__ imports nothing: the command-line vocabulary stays torch-free
    assert imported_modules("binary_ep/__init__.py") == set()
    assert imported_modules("binary_ep/vocabulary.py") <= {"argparse", "collections", "re"}
    # the golden model of the 1-bit export reads it with numpy alone: its reader (model_file)
    # imports nothing of the project and no torch, its relaxation (numpy_reference) only the reader
    golden = {"binary_ep/model_file.py": set(),
              "binary_ep/numpy_reference.py": {"binary_ep", "binary_ep.model_file"}}
    for path, allowed in golden.items():
        names = imported_modules(path) - allowed
        assert not {n for n in names if n in project | {"torch"} or n.startswith("binary_ep.")}, path
    assert "binary_ep.model_file" in edges["binary_ep/numpy_reference.py"]
    # the imports checker does see edges (a checker that sees nothing would pass all of the above)
    assert "binary_ep.vocabulary" in edges["main.py"] and "binary_ep.loops" in edges["Tools_fc.py"]
    assert "binary_ep.loops" in edges["Tools_conv.py"] and "binary_ep.network" in edges["Network_fc.py"]


DIGITS_FC = ("--device -1 --archi fc --dataset digits --layersList 64 32 10 --T 8 --Kmax 4 --beta 0.5 "
             "--gamma 1e-3 1e-3 --gradThreshold 3e-5 3e-5 --lrBias 0.05 0.1 --batchSize 64 "
             "--test_batchSize 360 --epochs 1 --seed 0 --trainSubset 128")
DIGITS_CONV = ("--device -1 --archi conv --dataset digits --layersList 10 --convList 4 2 1 --kernelSize 3 "
               "--padding 1 --Fpool 2 --T 8 --Kmax 4 --gamma 1e-4 1e-4 1e-4 --gradThreshold 2e-5 2e-5 2e-5 "
               "--lrBias 0.05 0.05 0.05 --epochs 1 --seed 0 --trainSubset 128")


@pytest.mark.parametrize("line, tools, other", [(DIGITS_FC, Tools_fc, Tools_conv), (DIGITS_CONV, Tools_conv, Tools_fc)])
def test_main_runs_the_epoch_through_the_tools_module_of_its_architecture(line, tools, other, tmp_path, monkeypatch):
    calls = []
    for module in (tools, other):
        for name in ("train_bin", "test_bin", "initDataframe", "updateDataframe", "createPath",
                     "saveHyperparameters", "prepare_images"):
            original = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _o=original, _n=f"{module.__name__}.{name}": (
                calls.append(_n), _o(*a))[1])
    assert main.main(line.split() + ["--outDir", str(tmp_path)]) == 0
    mine = {c.split(".")[1] for c in calls if c.startswith(tools.__name__ + ".")}
    assert mine == {"train_bin", "test_bin", "initDataframe", "updateDataframe", "createPath",
                    "saveHyperparameters", "prepare_images"}
    assert not [c for c in calls if c.startswith(other.__name__ + ".")]
    (run,) = tmp_path.glob(f"DATA-0-{tools.ARCHI}-digits/*/S-1")
    assert (run / "results.csv").exists() and (run.parent / "plotFunctions.py").exists()


@pytest.mark.parametrize("line", [DIGITS_FC, DIGITS_CONV])
def test_forward_twice_from_the_same_states_gives_the_same_result_and_leaves_them_alone(line):
    _, args, _ = main.parse(line.split() + ["--outDir", "/tmp"])
    torch.manual_seed(0)
    net = main.build_network(args)
    tools = main.architecture(args.archi)[1]
    x = tools.prepare_images(net, torch.rand(40, 1, 8, 8))
    target = net.target(torch.randint(0, 10, (40,)))
    with torch.no_grad():
        drive = net.input_drive(x)
        s = [0.5 * torch.rand_like(v) for v in net.initHidden(40)]
        before = [v.clone() for v in s]
        first = net.forward(s, drive, 5, target, 0.5)
        assert all(torch.equal(a, b) for a, b in zip(s, before))  # the caller's states unchanged
        second = net.forward(s, drive, 5, target, 0.5)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        assert any(not torch.equal(a, b) for a, b in zip(first, s))  # it did relax
        one = net.stepper(s, drive)
        assert all(torch.equal(a, b) for a, b in zip(s, before))  # stepper without out: s only read
        assert any(not torch.equal(a, b) for a, b in zip(one, s))


def test_a_grad_written_after_a_factor_pair_takes_precedence():
    """The fc input layer's gradient may be pending as two factors; a .grad written afterwards
    (by another estimator, say) is the newer gradient and the stale pair is dropped."""
    w = torch.nn.Parameter(torch.tensor([[0.5, -0.5], [-0.5, 0.5]]))
    opt = BinaryFlip([{"params": [w], "gamma": 1.0, "threshold": 0.0, "name": "t"}])
    a, b = torch.ones(2, 1), torch.ones(1, 2)
    opt.set_outer_grad(w, a, b, -1.0)  # gradient -1 everywhere: flips the negative weights
    assert torch.equal(opt.pending_grad(w), -torch.ones(2, 2))
    w.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # the newer gradient: flip w[0, 0] alone
    assert opt.pending_factors(w) is None and torch.equal(opt.pending_grad(w), w.grad)
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([[-0.5, -0.5], [-0.5, 0.5]]))
    opt.set_outer_grad(w, a, b, -1.0)
    opt.zero_grad()  # clears the pending pair too
    assert opt.pending_factors(w) is None and w.grad is None
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.step()


def test_the_ep_estimator_leaves_a_gradient_the_optimizer_steps_on():
    _, args, _ = main.parse(DIGITS_FC.split() + ["--outDir", "/tmp"])
    torch.manual_seed(0)
    net = main.build_network(args)
    x = Tools_fc.prepare_images(net, torch.rand(8, 1, 8, 8))
    with torch.no_grad():
        s = EP(0.5).compute_gradient(net, x, net.target(torch.arange(8)))
    assert net.output(s).shape == (8, 10)
    grads = net.weight_grads()
    assert [tuple(g.shape) for g in grads] == [tuple(w.shape) for w in net.binary_weights()]
    assert all(float(g.abs().sum()) > 0 for g in grads) and all(b.grad is not None for b in net.biases())
