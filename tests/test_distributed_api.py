"""The package calls only ``torch.distributed`` names that torch 2.4 documents (DESIGN.md section
11: a GPU machine brings its own torch; data-parallel training must run on torch 2.4 and later,
not only on the pinned one).  Every attribute the package takes from ``torch.distributed``,
however the module is imported, is found with ``ast`` and must be in ``TORCH_2_4``."""

import ast
import glob
import importlib.util
import os

import torch.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The public torch.distributed names the package relies on, each documented for torch 2.4 in
# PyTorch's page "Distributed communication package - torch.distributed" (docs/source/
# distributed.rst of the PyTorch repository; looked up in stored copies of that page, since the
# 2.4 build itself was not among them):
# - the copy of the 2.2/2.3 era (it still lists torch.distributed.pipeline.sync, removed in 2.4)
#   documents init_process_group (Initialization), TCPStore (Distributed Key-Value Store),
#   broadcast_object_list, all_reduce, all_gather, all_gather_into_tensor and all_gather_object
#   (Collective functions), and torch.distributed.nn (its list of `py:module` entries);
# - the copy of the 2.4 era (no pipeline modules; its "Shutdown" section, first in 2.4) documents
#   the same names and destroy_process_group ("it is important to clean up resources on exit by
#   calling destroy_process_group");
# - docs.pytorch.org/docs/2.3/_sources/distributed.rst.txt is the same page for 2.3.
# A name documented on both sides of 2.4 is in 2.4: PyTorch does not remove a documented
# torch.distributed function and bring it back.  Not used, because they are newer or not public:
# all_gather_single (not in torch 2.11), anything starting with an underscore.
TORCH_2_4 = {
    "init_process_group", "destroy_process_group", "TCPStore",
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast_object_list",
}
TORCH_2_4_MODULES = {"nn"}  # torch.distributed.nn, imported before the group is joined (distributed.start)


def distributed_names(source):
    """Every name taken from ``torch.distributed`` in the Python ``source``: ``X.name`` where X
    is bound to the module (``import torch.distributed as X``, ``from torch import distributed
    as X``), ``torch.distributed.name``, and ``from torch.distributed import name`` (a submodule
    ``from torch.distributed.sub import ...`` counts as ``sub``)."""
    tree = ast.parse(source)
    aliases, names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed."):
            names.add(node.module.split(".")[2])
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in aliases:
            names.add(node.attr)
        elif (isinstance(base, ast.Attribute) and base.attr == "distributed" and isinstance(base.value, ast.Name)
              and base.value.id == "torch"):
            names.add(node.attr)
    return names


def test_the_scanner_finds_every_way_of_reaching_torch_distributed():
    source = ("import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
              "from torch.distributed import nn, barrier\nfrom torch.distributed.elastic import agent\n"
              "dist.all_gather_single(a, b)\nd2.TCPStore(h, p)\ntorch.distributed.get_rank()\n"
              "x = dist.ReduceOp.SUM\nother.all_reduce(t)\n")
    assert distributed_names(source) == {"nn", "barrier", "elastic", "all_gather_single", "TCPStore",
                                         "get_rank", "ReduceOp"}


def test_the_package_calls_only_torch_2_4_distributed_names():
    used = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "binary_ep", "*.py"))):
        for name in distributed_names(open(path).read()):
            used.setdefault(name, []).append(os.path.basename(path))
    newer = {name: files for name, files in used.items() if name not in TORCH_2_4 | TORCH_2_4_MODULES}
    assert not newer, f"torch.distributed names outside torch 2.4's documented API: {newer}"
    assert {"init_process_group", "all_reduce", "TCPStore"} <= set(used), used  # the scan sees the package
    # the literal sets name things that exist (a typo in them would let a wrong name through)
    assert [n for n in TORCH_2_4 if not hasattr(torch.distributed, n)] == []
    assert [n for n in TORCH_2_4_MODULES if importlib.util.find_spec(f"torch.distributed.{n}") is None] == []
