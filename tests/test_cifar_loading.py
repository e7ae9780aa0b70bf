"""CIFAR-10 loading with worker processes: the per-sample seeded augmentation makes the batches
(and so a run's results) independent of ``--workers``, leaves torch's global RNG alone, and is
checked against a hand computation from the raw pixels.

The data are small fake CIFAR-10 files in torchvision's layout; torchvision's md5 check is
substituted (it matters only in the main process, where the data sets are built).
"""

import hashlib
import os

import numpy as np
import pandas as pd
import pytest
import torch

import main
from fake_data import write_cifar10
from binary_ep import datasets

MEAN = np.array([0.4914, 0.4822, 0.4465]).reshape(3, 1, 1)
STD = np.array([0.247, 0.243, 0.261]).reshape(3, 1, 1)
N_PER_BATCH = 12  # 60 training images, 12 test images
CONV = ["--device", "-1", "--archi", "conv", "--dataset", "cifar10", "--layersList", "10",
        "--convList", "8", "4", "3", "--padding", "2", "--gamma", "1e-2", "1e-2", "1e-2",
        "--gradThreshold", "1e-6", "1e-6", "1e-6", "--lrBias", "0.05", "0.05", "0.05",
        "--test_batchSize", "8"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    """(data folder, {batch name: (uint8 rows (n, 3072), labels)}) of fake CIFAR-10 files."""
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    batches = write_cifar10(tmp_path / "data", n_per_batch=N_PER_BATCH, seed=7)
    return tmp_path / "data", batches


def make_args(data, out, workers, seed=3, extra=()):
    return main.parse(CONV + ["--batchSize", "16", "--seed", str(seed), "--dataDir", str(data),
                              "--outDir", str(out), "--workers", str(workers)] + list(extra))[1]


def epoch_batches(loader, epoch, seed=3):
    """The batches of one epoch, shuffled by a fresh generator seeded ``seed``."""
    loader.generator.manual_seed(seed)
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def train_images(batches):
    """The training set's raw images (N, 3, 32, 32) uint8 and labels, in torchvision's order."""
    rows = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)])
    labels = sum((batches[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    return rows.reshape(-1, 3, 32, 32), labels


def reference(raw, seed, epoch, index):
    """The documented augmentation of one raw (3, 32, 32) uint8 image, in numpy: generator seeded
    with the first 8 bytes (little-endian) of BLAKE2b("seed epoch index"); a 0/1 draw (1: mirror),
    then (top, left) in 0..8; mirror, edge-pad 4, crop, / 255, normalise."""
    digest = hashlib.blake2b(f"{seed} {epoch} {index}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    mirror = torch.randint(0, 2, (1,), generator=g).item()
    top, left = torch.randint(0, 9, (2,), generator=g).tolist()
    img = raw[:, :, ::-1] if mirror else raw
    padded = np.pad(img, ((0, 0), (4, 4), (4, 4)), mode="edge")
    crop = padded[:, top:top + 32, left:left + 32].astype(np.float64) / 255.0
    return torch.from_numpy((crop - MEAN) / STD).float(), (mirror, top, left)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores
def test_batches_do_not_depend_on_the_number_of_workers(cifar, tmp_path):
    data, _ = cifar
    runs = {}
    for workers in (0, 2, 3):
        train, test = datasets.load_data(make_args(data, tmp_path, workers), torch.Generator())
        assert train.num_workers == workers and test.num_workers == workers
        assert not train.persistent_workers
        runs[workers] = ([epoch_batches(train, e) for e in (1, 2)], [(x, y) for x, y in test])
    (epochs0, test0) = runs[0]
    assert len(epochs0[0]) == 4 and epochs0[0][0][0].shape == (16, 3, 32, 32)
    assert not torch.equal(epochs0[0][0][0], epochs0[1][0][0])
    for workers in (2, 3):
        epochs, test = runs[workers]
        for got, want in zip(epochs + [test], epochs0 + [test0]):
            assert len(got) == len(want)
            for (x, y), (x0, y0) in zip(got, want):
                assert torch.equal(x, x0) and torch.equal(y, y0)


def test_augmentation_changes_with_the_epoch_and_the_seed(cifar, tmp_path):
    data, _ = cifar
    train, _ = datasets.load_data(make_args(data, tmp_path, 0), torch.Generator())
    ds = train.dataset
    ds.epoch = 1
    one = torch.stack([ds[i][0] for i in range(len(ds))])
    train.set_epoch(2)
    two = torch.stack([ds[i][0] for i in range(len(ds))])
    other, _ = datasets.load_data(make_args(data, tmp_path, 0, seed=4), torch.Generator())
    other.dataset.epoch = 1
    three = torch.stack([other.dataset[i][0] for i in range(len(ds))])
    for a, b in ((one, two), (one, three)):
        same = [torch.equal(a[i], b[i]) for i in range(len(ds))]
        assert sum(same) < len(ds) // 4  # a coincidence of (flip, top, left) has probability 1/162


def test_augmentation_of_a_sample_depends_only_on_seed_epoch_and_index(cifar, tmp_path):
    data, batches = cifar
    raws, labels = train_images(batches)
    args = make_args(data, tmp_path, 0, extra=["--trainSubset", "40"])
    train, _ = datasets.load_data(args, torch.Generator())
    assert len(train.dataset) == 40
    ds = train.dataset  # a Subset: its indices are those of the full training set
    draws = set()
    for epoch in (1, 2, 5):
        train.set_epoch(epoch)
        forward = [ds[i] for i in range(40)]
        backward = [ds[i] for i in reversed(range(40))][::-1]
        for i in range(40):
            assert torch.equal(forward[i][0], backward[i][0]) and forward[i][1] == backward[i][1] == labels[i]
            want, draw = reference(raws[i], 3, epoch, i)
            draws.add(draw)
            assert forward[i][0].dtype == torch.float32
            assert torch.allclose(forward[i][0], want, rtol=0, atol=1e-6)
    assert {d[0] for d in draws} == {0, 1} and len({d[1:] for d in draws}) > 20
    # the full set's sample 45 (past the subset) is augmented as its index says
    full = datasets.load_data(make_args(data, tmp_path, 0), torch.Generator())[0]
    full.set_epoch(2)
    assert torch.allclose(full.dataset[45][0], reference(raws[45], 3, 2, 45)[0], rtol=0, atol=1e-6)
    train.set_epoch(2)
    assert torch.equal(full.dataset[7][0], ds[7][0])  # the same sample in the subset and the full set


def test_iterating_leaves_the_global_rng_alone(cifar, tmp_path):
    data, _ = cifar
    train, test = datasets.load_data(make_args(data, tmp_path, 0), torch.Generator())
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for epoch in (1, 2):
        epoch_batches(train, epoch)
        list(test)
    assert torch.equal(torch.get_rng_state(), state)


def test_test_images_are_normalised_raw_images_in_order(cifar, tmp_path):
    data, batches = cifar
    rows, labels = batches["test_batch"]
    for workers in (0, 2):
        _, test = datasets.load_data(make_args(data, tmp_path, workers), torch.Generator())
        xs, ys = zip(*list(test))
        x, y = torch.cat(xs), torch.cat(ys)
        raw = rows.reshape(-1, 3, 32, 32).astype(np.float64) / 255.0
        want = torch.from_numpy((raw - MEAN) / STD).float()
        assert x.shape == (N_PER_BATCH, 3, 32, 32) and x.dtype == torch.float32
        assert torch.allclose(x, want, rtol=0, atol=1e-6) and y.tolist() == labels


def test_pin_memory_is_passed_to_both_loaders(cifar, tmp_path):
    data, _ = cifar
    args = make_args(data, tmp_path, 2)
    assert all(loader.pin_memory for loader in datasets.load_data(args, torch.Generator(), pin_memory=True))
    assert not any(loader.pin_memory for loader in datasets.load_data(args, torch.Generator()))


def test_a_run_gives_the_same_results_with_and_without_workers(cifar, tmp_path):
    data, _ = cifar
    tables = []
    for workers in (2, 0):
        out = tmp_path / f"runs{workers}"
        code = main.main(CONV + ["--T", "5", "--Kmax", "2", "--epochs", "1", "--trainSubset", "32",
                                 "--batchSize", "16", "--seed", "5", "--dataDir", str(data),
                                 "--outDir", str(out), "--workers", str(workers)])
        assert code == 0
        (date,) = os.listdir(out / "DATA-0-conv-cifar10")
        tables.append(pd.read_csv(out / "DATA-0-conv-cifar10" / date / "S-1" / "results.csv"))
    with_workers, without = (t.drop(columns="epoch_seconds") for t in tables)
    assert len(with_workers) == 1
    pd.testing.assert_frame_equal(with_workers, without, check_exact=True)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 2 workers on 2 cores
def test_each_rank_loads_its_share_of_the_global_batches(cifar, tmp_path):
    """Data-parallel loading: with ``share=(rank, 3)`` each rank's loader yields its share of every
    global batch (the augmented images a single process draws, in rank order), loading and
    augmenting only those; 49 = 3 x 16 + 1 training images, so two shares of the last batch are
    empty (also in worker processes); the test set is split the same way, nothing repeated."""
    args = make_args(cifar[0], tmp_path, 0, extra=["--trainSubset", "49"])
    whole_train, whole_test = datasets.load_data(args, torch.Generator())
    assert whole_train.global_sizes == [16, 16, 16, 1]
    want = epoch_batches(whole_train, 2)
    want_test = list(whole_test)
    parts, tests = [], []
    for rank in range(3):
        args.workers = 2 if rank == 2 else 0
        train, test = datasets.load_data(args, torch.Generator(), share=(rank, 3))
        assert train.global_sizes == [16, 16, 16, 1] and len(train) == 4
        parts.append(epoch_batches(train, 2))
        tests.append(list(test))
    assert [len(p[3][1]) for p in parts] == [1, 0, 0] and parts[2][3][0].shape == (0, 3, 32, 32)
    assert [len(p[0][1]) for p in parts] == [6, 5, 5]
    for k, (x, y) in enumerate(want):
        assert torch.equal(torch.cat([p[k][0] for p in parts]), x) and torch.equal(torch.cat([p[k][1] for p in parts]), y)
    for k, (x, y) in enumerate(want_test):  # 12 test images in batches of 8: shares 3+3+2, 2+1+1
        assert torch.equal(torch.cat([t[k][0] for t in tests]), x) and torch.equal(torch.cat([t[k][1] for t in tests]), y)
