"""Run folders and what a run leaves on disk: numbering, Hyperparameters.txt, results.csv,
checkpoint.pt, the copied plotFunctions.py and its figures, device fallback, offline data."""

import ast
import gzip
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
import torch

import main
import Tools_fc
from binary_ep import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ("--archi fc --dataset digits --layersList 64 32 10 --T 8 --Kmax 3 --beta 0.5 --gamma 1e-2 1e-2 "
         "--gradThreshold 1e-4 1e-4 --lrBias 0.05 0.1 --batchSize 32 --test_batchSize 200 "
         "--trainSubset 256 --testSubset 200 --seed 0").split()
PNG = b"\x89PNG\r\n\x1a\n"


def cli(args, **kw):
    env = dict(os.environ, EP_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py")] + args, capture_output=True,
                          text=True, env=env, timeout=300, **kw)


def only_run(out):
    runs = sorted(out.glob("DATA-0-*/*/S-*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_two_epoch_run_writes_every_file_and_column(tmp_path):
    assert main.main(["--device", "-1", "--epochs", "2", "--outDir", str(tmp_path)] + QUICK) == 0
    run = only_run(tmp_path)
    assert run.name == "S-1" and run.parent.parent.name == "DATA-0-fc-digits"
    assert (run.parent / "plotFunctions.py").read_bytes() == open(os.path.join(ROOT, "plotFunctions.py"), "rb").read()
    df = pd.read_csv(run / "results.csv", index_col="epoch")
    assert list(df.index) == [1, 2]
    assert list(df.columns) == ["train_error", "test_error", "train_loss", "test_loss",
                                "flips_fc0", "flips_fc1", "fliprate_fc0", "fliprate_fc1",
                                "alpha_fc0", "alpha_fc1", "epoch_seconds"]
    assert ((df[["train_error", "test_error"]] >= 0) & (df[["train_error", "test_error"]] <= 100)).all().all()
    assert (df[["train_loss", "test_loss"]] > 0).all().all()
    assert df["fliprate_fc0"].tolist() == pytest.approx((100 * df["flips_fc0"] / (10 * 32)).tolist())
    assert df["fliprate_fc1"].tolist() == pytest.approx((100 * df["flips_fc1"] / (32 * 64)).tolist())
    assert (df["flips_fc1"] > 0).all() and (df["epoch_seconds"] > 0).all()
    # fixed alpha: the XNOR-Net initial value, 4 decimals, unchanged
    assert df["alpha_fc1"].round(4).tolist() == df["alpha_fc1"].tolist()[:1] * 2
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and set(ckpt) >= {"model", "optW", "optB", "rng", "generators", "args"}
    assert ckpt["optW"]["state"][1]["filtered_grad"].shape == (32, 64)
    for png in ("errors.png", "losses.png", "fliprates.png", "alpha.png"):
        assert (run / png).read_bytes()[:8] == PNG
    hp = (run / "Hyperparameters.txt").read_text().splitlines()
    assert hp[1].startswith("command: python main.py --device -1 --epochs 2")
    effective = hp[hp.index("[effective values]") + 1:]
    values = dict(line.split(": ", 1) for line in effective)
    assert values["gamma"] == "0.01 0.01" and values["layersList"] == "64 32 10"
    assert values["seed"] == "0" and values["archi"] == "fc" and values["learnAlpha"] == "0"
    neurons = {"rho_threshold", "gamma_neur"}  # the binary-neuron constants: bin_W carries neither
    assert set(values) >= {a.dest for a in main.build_parser()._actions if a.dest != "help"} - neurons
    assert not neurons & set(values)
    assert not list(run.glob(".*.tmp"))


def test_parallel_runs_take_distinct_folders(tmp_path):
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), "--device", "-1",
                               "--epochs", "1", "--outDir", str(tmp_path)] + QUICK,
                              env=dict(os.environ, EP_NO_PROGRESS="1", OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    runs = sorted(p.name for p in tmp_path.glob("DATA-0-fc-digits/*/S-*"))
    assert runs == ["S-1", "S-2"]
    for name in runs:
        (run,) = tmp_path.glob(f"DATA-0-fc-digits/*/{name}")
        assert len(pd.read_csv(run / "results.csv")) == 1 and (run / "checkpoint.pt").exists()


def test_createPath_is_atomic_under_threads(tmp_path):
    args = main.argparse.Namespace(outDir=str(tmp_path), archi="fc", dataset="digits", resume=None,
                                   check="none")
    made, barrier = [], threading.Barrier(16)

    def take():
        barrier.wait()
        made.append(Tools_fc.createPath(args))
    threads = [threading.Thread(target=take) for _ in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(os.path.basename(p) for p in made) == sorted(f"S-{i}" for i in range(1, 17))


def synthetic_results(folder, seed, epochs=5):
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(epochs, generator=g).tolist()
    df = pd.DataFrame({"train_error": [50 / (e + 1) + n for e, n in enumerate(noise)],
                       "test_error": [55 / (e + 1) + n for e, n in enumerate(noise)],
                       "train_loss": [0.5 / (e + 1) for e in range(epochs)],
                       "test_loss": [0.6 / (e + 1) for e in range(epochs)],
                       "flips_fc0": [100.0] * epochs, "fliprate_fc0": [10.0 / (e + 1) for e in range(epochs)],
                       "alpha_fc0": [0.03] * epochs, "epoch_seconds": [1.0] * epochs},
                      index=pd.Index(range(1, epochs + 1), name="epoch"))
    os.makedirs(folder)
    df.to_csv(os.path.join(folder, "results.csv"))


def test_plotFunctions_draws_every_run_and_the_summary(tmp_path):
    date = tmp_path / "DATA-0-fc-mnist" / "2026-01-01"
    date.mkdir(parents=True)
    (date / "plotFunctions.py").write_bytes(open(os.path.join(ROOT, "plotFunctions.py"), "rb").read())
    for i in (1, 2, 3):
        synthetic_results(date / f"S-{i}", seed=i)
    os.makedirs(date / "S-4")  # a run that has not finished an epoch yet is skipped
    r = subprocess.run([sys.executable, "plotFunctions.py"], cwd=date, capture_output=True, text=True,
                       timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    for name in ("errors", "losses", "fliprates", "alpha"):
        assert (date / f"summary_{name}.png").read_bytes()[:8] == PNG
        for i in (1, 2, 3):
            assert (date / f"S-{i}" / f"{name}.png").stat().st_size > 5000
    # standalone: it imports nothing from the project
    tree = ast.parse(open(os.path.join(ROOT, "plotFunctions.py")).read())
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"fcntl", "glob", "os", "re", "sys", "matplotlib", "pandas"}


def test_a_figure_that_fails_halfway_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    import matplotlib.figure
    import plotFunctions
    run = tmp_path / "S-1"
    synthetic_results(run, seed=1)
    df = plotFunctions.read_run(run)
    plotFunctions.plot_one(run, df)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert before["errors.png"][:8] == PNG

    def broken_savefig(self, fname, **kwargs):  # half a file, then the disk fills up
        with open(fname, "wb") as f:
            f.write(PNG[:4])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="No space left"):
        plotFunctions.plot_one(run, df)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # no temporary left either


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_device_0_without_cuda_warns_and_runs_on_cpu(tmp_path):
    r = cli(["--device", "0", "--epochs", "1", "--outDir", str(tmp_path)] + QUICK)
    assert r.returncode == 0, r.stderr
    assert "warning: --device 0 asked for a GPU but CUDA is not available; running on the CPU" in r.stderr
    assert "Traceback" not in r.stderr
    only_run(tmp_path)


def test_mnist_offline_without_files_is_one_clear_sentence(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    r = cli(["--device", "-1", "--dataset", "mnist", "--dataDir", str(data), "--outDir", str(out), "--epochs", "1"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    msg = r.stderr.strip().splitlines()[-1]
    assert "MNIST/raw" in msg and "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert not out.exists() and list(data.iterdir()) == []


def idx_gz(path, array):
    """Write ``array`` (uint8) as a gzip'd IDX file, the format of (Fashion-)MNIST's files."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return header + array.astype(np.uint8).tobytes()


def test_fashion_mnist_unpacked_from_a_debian_folder(tmp_path, monkeypatch):
    """A folder laid out like Debian's dataset-fashion-mnist package (the four gzip'd IDX files)
    is unpacked into torchvision's FashionMNIST/raw under --dataDir and loaded from there:
    the same bytes, images / 255 in (N, 1, 28, 28), the labels with their images, the subsets."""
    rs = np.random.RandomState(0)
    debian = tmp_path / "debian"
    debian.mkdir()
    raw_bytes, parts = {}, {}
    for split, n in (("train", 30), ("t10k", 20)):
        images = rs.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
        images[:, 0, 0] = np.arange(n)  # each image carries its index
        labels = rs.randint(0, 10, size=n).astype(np.uint8)
        raw_bytes[f"{split}-images-idx3-ubyte"] = idx_gz(debian / f"{split}-images-idx3-ubyte.gz", images)
        raw_bytes[f"{split}-labels-idx1-ubyte"] = idx_gz(debian / f"{split}-labels-idx1-ubyte.gz", labels)
        parts[split] = (images, labels)
    before = {p.name: p.read_bytes() for p in debian.iterdir()}
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", str(debian))
    data = tmp_path / "data"
    args = main.argparse.Namespace(dataset="fashion_mnist", dataDir=str(data), trainSubset=24,
                                   testSubset=15, batchSize=8, test_batchSize=15)
    train, test = datasets.load_data(args, torch.Generator().manual_seed(0))
    raw = data / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(datasets.MNIST_FILES)
    assert {f: (raw / f).read_bytes() for f in datasets.MNIST_FILES} == raw_bytes
    assert {p.name: p.read_bytes() for p in debian.iterdir()} == before  # the package's folder untouched
    assert (len(train), len(test)) == (3, 1)
    (x, y), = list(test)
    images, labels = parts["t10k"]
    assert x.shape == (15, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(images[:15]).float().div(255).unsqueeze(1))
    assert y.tolist() == labels[:15].tolist()
    images, labels = parts["train"]
    seen = []
    for x, y in train:  # shuffled: every image of the first 24 once, each with its own label
        assert x.shape[1:] == (1, 28, 28)
        index = (x[:, 0, 0, 0] * 255).round().long()
        assert torch.equal(x, torch.from_numpy(images[index.numpy()]).float().div(255).unsqueeze(1))
        assert y.tolist() == labels[index.numpy()].tolist()
        seen += index.tolist()
    assert sorted(seen) == list(range(24)) and seen != list(range(24))


def test_digits_are_scikit_learns_whether_read_from_its_file_or_through_load_digits(monkeypatch):
    """The digits come from scikit-learn's data file, read without importing scikit-learn: the
    same 1797 images and labels as sklearn.datasets.load_digits, in the same fixed split, and the
    same tensors when the file is not found and load_digits reads them."""
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.RandomState(0).permutation(1797)
    (xtr, ytr), (xte, yte) = direct = datasets.load_digits_split()
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8) and xtr.dtype == torch.float32
    assert torch.equal(torch.cat([xte, xtr]), torch.tensor(d.images[order] / 16.0, dtype=torch.float32).unsqueeze(1))
    assert torch.cat([yte, ytr]).tolist() == d.target[order].tolist()
    monkeypatch.setattr(datasets, "_digits_file", lambda: None)
    through = datasets.load_digits_split()
    assert all(torch.equal(a, b) for part_a, part_b in zip(direct, through) for a, b in zip(part_a, part_b))


def test_a_run_on_digits_does_not_import_scikit_learn():
    code = ("import sys; from binary_ep import datasets; datasets.load_digits_split(); "
            "print('sklearn' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_fashion_mnist_found_in_debian_folder(tmp_path):
    """The real package's folder (/usr/share/datasets/fashion-mnist), which .ci/run installs: in
    CI its absence is a failure, elsewhere the test is skipped without the package."""
    if not all(os.path.isfile(os.path.join(datasets.DEBIAN_FASHION_MNIST, f + ".gz")) for f in datasets.MNIST_FILES):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{datasets.DEBIAN_FASHION_MNIST} lacks the .gz files of Debian's dataset-fashion-mnist "
                        f"package; .ci/run installs it (apt-get install dataset-fashion-mnist)")
        pytest.skip("Debian's dataset-fashion-mnist package is not installed")
    args = main.argparse.Namespace(dataset="fashion_mnist", dataDir=str(tmp_path), trainSubset=100,
                                   testSubset=50, batchSize=10, test_batchSize=50)
    train, test = datasets.load_data(args, torch.Generator().manual_seed(0))
    assert (len(train), len(test)) == (10, 1)
    x, y = next(iter(test))
    assert x.shape == (50, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert sorted(os.listdir(tmp_path / "FashionMNIST" / "raw")) == sorted(datasets.MNIST_FILES)
    assert y.tolist()[:5] == [9, 2, 1, 1, 6]  # the first labels of Fashion-MNIST's test set


def test_make_last_demo_run_is_the_newest_date_and_highest_run_number(tmp_path):
    """`make demo` closes with the newest run folder: the last date, and there S-10 after S-9
    (numeric order, not the text order that puts S-9 last)."""
    runs = tmp_path / "runs"
    for folder in ("2024-05-01/S-12", "2024-05-02/S-2", "2024-05-02/S-9", "2024-05-02/S-10"):
        (runs / "DATA-0-fc-digits" / folder).mkdir(parents=True)
    (runs / "DATA-0-conv-digits" / "2024-05-03" / "S-30").mkdir(parents=True)  # not the demo's
    r = subprocess.run(["make", "-s", "-C", ROOT, "last-demo-run", f"RUNS={runs}"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{runs}/DATA-0-fc-digits/2024-05-02/S-10\n"


def test_help_and_bad_arguments_answer_without_loading_torch():
    """--help and argument errors (conv geometry included) need no torch, so they answer at once."""
    code = ("import sys, main\n"
            "for argv in (['--help'], ['--bogus'], ['--gamma', '2'], ['--archi', 'conv', '--dataset', 'cifar10',\n"
            "             '--convList', '256', '256', '128', '64', '3', '--gamma'] + ['1e-7'] * 5\n"
            "             + ['--gradThreshold'] + ['1e-8'] * 5 + ['--lrBias'] + ['0.1'] * 5):\n"
            "    try:\n"
            "        main.parse(argv)\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, 2), e.code\n"
            "    else:\n"
            "        raise AssertionError(argv)\n"
            "print('torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "False"
    assert "shrinks to 0x0" in r.stderr and "--gamma" in r.stderr
