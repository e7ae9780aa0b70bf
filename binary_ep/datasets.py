"""Data sets (DESIGN.md section 6): MNIST, Fashion-MNIST and CIFAR-10 through torchvision, and
scikit-learn's 8x8 digits; a missing or damaged data set is one ``UserError`` sentence.  CIFAR-10's
training images are augmented per sample from (seed, epoch, index) (``CIFAR10Images``)."""

import gzip
import hashlib
import importlib.util
import math
import os
import shutil
import signal

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from binary_ep.files import atomic_write
from binary_ep.vocabulary import INPUT_SHAPE, N_CLASSES, N_SAMPLES, UserError


DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)


def share_bounds(n, rank, world):
    """``(lo, hi)``: rank ``rank``'s share ``[lo, hi)`` of ``n`` consecutive items split among
    ``world`` ranks as evenly as possible, in rank order (``torch.tensor_split``'s rule: the first
    ``n % world`` ranks take one item more; a share may be empty)."""
    q, r = divmod(n, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def global_batch_sizes(n, batch_size):
    """The sizes of the batches of ``n`` samples cut into mini-batches of ``batch_size`` (the
    last one may be smaller)."""
    return [min(batch_size, n - i) for i in range(0, n, batch_size)]


class TensorBatches:
    """Mini-batches of an in-memory tensor data set, shuffled with a seeded generator.

    With ``share=(rank, world)`` (data-parallel training) it yields rank ``rank``'s share
    (``share_bounds``) of every global batch, the global batches being the ones a single process
    draws from the same generator; ``global_sizes`` lists the global batches' sizes."""

    def __init__(self, x, y, batch_size, shuffle, generator=None, share=(0, 1)):
        self.x, self.y, self.batch_size, self.shuffle, self.generator = x, y, batch_size, shuffle, generator
        self.share = share

    def __len__(self):
        return math.ceil(len(self.y) / self.batch_size)

    @property
    def global_sizes(self):
        return global_batch_sizes(len(self.y), self.batch_size)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for i in range(0, n, self.batch_size):
            lo, hi = share_bounds(min(self.batch_size, n - i), *self.share)
            if order is None:
                yield self.x[i + lo:i + hi], self.y[i + lo:i + hi]
            else:
                idx = order[i + lo:i + hi]
                yield self.x[idx], self.y[idx]


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _remove_new_dirs(before, root):
    """Remove the empty folders a failed download created under ``root`` (but not ``root``'s
    parents that existed before)."""
    for dirpath, dirnames, filenames in sorted(os.walk(root), key=lambda t: -len(t[0])):
        if dirpath not in before and not os.listdir(dirpath):
            os.rmdir(dirpath)


def _existing_dirs(root):
    return {d for d, _, _ in os.walk(root)} if os.path.isdir(root) else set()


def _check_data_dir(data_dir):
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--dataDir {data_dir} is a file, not a folder; give a folder for the data sets")
    probe = os.path.abspath(data_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"--dataDir {data_dir} cannot be created: {probe} is a file; give a folder "
                        f"for the data sets")
    if os.path.isdir(data_dir) and not os.access(data_dir, os.R_OK | os.X_OK):
        raise UserError(f"--dataDir {data_dir} cannot be read; fix its permissions or choose another folder")


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fashion_from_debian(raw):
    """Unpack Debian's ``dataset-fashion-mnist`` files into torchvision's raw folder."""
    if all(os.path.exists(os.path.join(raw, f)) for f in MNIST_FILES):
        return
    if not all(os.path.exists(os.path.join(DEBIAN_FASHION_MNIST, f + ".gz")) for f in MNIST_FILES):
        return
    os.makedirs(raw, exist_ok=True)
    for f in MNIST_FILES:
        dst = os.path.join(raw, f)
        if not os.path.exists(dst):
            def write(tmp, src=os.path.join(DEBIAN_FASHION_MNIST, f + ".gz")):
                with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout)
            atomic_write(dst, write)


def _load_mnist_like(dataset, data_dir):
    """Images (N, 1, 28, 28) in [0, 1] and labels of MNIST or Fashion-MNIST, train and test."""
    import torchvision
    cls = torchvision.datasets.MNIST if dataset == "mnist" else torchvision.datasets.FashionMNIST
    raw = os.path.join(data_dir, cls.__name__, "raw")
    if dataset == "fashion_mnist":
        try:
            _fashion_from_debian(raw)
        except OSError:
            pass
    before = _existing_dirs(data_dir)
    parts = []
    for train in (True, False):
        try:
            ds = cls(data_dir, train=train, download=True)
        except PermissionError as e:
            raise UserError(f"the {dataset} data set in {raw} cannot be read or stored ({e.strerror}: "
                            f"{e.filename}); fix the permissions or choose another --dataDir") from None
        except (RuntimeError, OSError) as e:
            _remove_new_dirs(before, data_dir)
            missing = [f for f in MNIST_FILES if not os.path.exists(os.path.join(raw, f))]
            if not missing:
                raise UserError(f"the {dataset} files in {raw} are truncated or corrupted "
                                f"({_first_line(e)}); delete them so they download again, or "
                                f"replace them") from None
            where = (f"is not in {raw}" if len(missing) == len(MNIST_FILES) else
                     f"is incomplete in {raw} (missing {', '.join(missing)})")
            raise UserError(f"the {dataset} data set {where} and could not be downloaded "
                            f"(no network?); put the files {', '.join(MNIST_FILES)} (or their .gz) "
                            f"there") from None
        except Exception as e:  # torchvision asserts on malformed IDX headers
            raise UserError(f"the {dataset} files in {raw} are truncated or corrupted ({type(e).__name__}); "
                            f"delete them so they download again, or replace them") from None
        x, y = ds.data, ds.targets
        if x.dim() != 3 or tuple(x.shape[1:]) != (28, 28) or len(x) != len(y) or len(y) == 0 \
                or int(y.min()) < 0 or int(y.max()) >= N_CLASSES:
            raise UserError(f"the {dataset} files in {raw} are truncated or corrupted (images "
                            f"{tuple(x.shape)}, labels {tuple(y.shape)}); delete them so they "
                            f"download again, or replace them")
        parts.append((x.unsqueeze(1).to(torch.float32).div_(255.0), y.long()))
    return parts


def _digits_file():
    """The path of the data file scikit-learn's ``load_digits`` reads (1797 rows: 64 pixels in
    0..16, then the label), found without importing scikit-learn; None where it is not there."""
    spec = importlib.util.find_spec("sklearn")
    folders = spec.submodule_search_locations if spec is not None else None
    for folder in folders or []:
        path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            return path
    return None


def load_digits_split():
    """scikit-learn's 8x8 digits as (N, 1, 8, 8) in [0, 1]; a fixed split: 1437 train, 360 test
    (``N_SAMPLES``).
    Read straight from scikit-learn's data file (importing scikit-learn would add over a second
    to every run's start); through ``sklearn.datasets.load_digits`` where that file is not found."""
    path = _digits_file()
    if path is not None:
        rows = np.loadtxt(path, delimiter=",", dtype=np.float64)
        pixels, labels = rows[:, :-1], rows[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits
        d = load_digits()
        pixels, labels = d.data, d.target
    x = torch.tensor(pixels, dtype=torch.float32).div_(16.0).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    x, y, n_test = x[order], y[order], N_SAMPLES["digits"][1]
    return [(x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])]


CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")


def augmentation_seed(seed, epoch, index):
    """The seed (0 .. 2^32 - 1) of the generator that augments sample ``index`` (of the full
    training set) in ``epoch``: the low 32 bits of the 8-byte BLAKE2b digest of the text ``"seed
    epoch index"`` read little-endian, i.e. its first 4 bytes (torch's CPU generator kept only
    those bits of the whole 8-byte value used before: the same augmentation)."""
    digest = hashlib.blake2b(f"{seed} {epoch} {index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little")


class CIFAR10Images(torch.utils.data.Dataset):
    """CIFAR-10 images held as uint8 tensors (N, 3, 32, 32); item ``i`` is (image, label), the
    image a (3, 32, 32) float32 tensor: pixels / 255, normalised per channel with CIFAR10_MEAN
    and CIFAR10_STD.

    With ``augment`` (training set) the image is augmented first, as the seed's torchvision
    pipeline (RandomHorizontalFlip(0.5), then RandomCrop(32, padding=4, padding_mode="edge")),
    but drawn from a generator of its own, seeded with ``augmentation_seed(seed, epoch, i)``:
    one ``randint(0, 2, (1,))`` (1: mirror the columns), then ``randint(0, 9, (2,))`` (top, left);
    the (mirrored) image is padded by 4 replicating its edges and cropped to rows top..top+31,
    columns left..left+31.  A sample's augmentation thus depends only on (seed, epoch, i), not on
    the worker process or the order samples are read, and torch's global RNG is never drawn.
    ``i`` is the index into this (full) data set: a ``Subset`` of it passes its own indices.
    ``epoch`` (default 1) is set before each pass (``AugmentedLoader.set_epoch``)."""

    def __init__(self, images, labels, augment, seed):
        self.images, self.labels, self.augment, self.seed, self.epoch = images, labels, augment, seed, 1
        self.mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR10_STD).view(3, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].to(torch.float32).div_(255.0)
        if self.augment:
            g = torch.Generator().manual_seed(augmentation_seed(self.seed, self.epoch, i))
            flip = int(torch.randint(0, 2, (1,), generator=g))
            top, left = torch.randint(0, 9, (2,), generator=g).tolist()
            if flip:
                x = x.flip(-1)
            x = F.pad(x[None], (4, 4, 4, 4), mode="replicate")[0, :, top:top + 32, left:left + 32]
        return (x - self.mean) / self.std, int(self.labels[i])


class AugmentedLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` whose ``set_epoch(epoch)`` selects the epoch of ``augmentation`` (a
    ``CIFAR10Images`` that augments, the loader's data set or the one under its ``Subset``).  Worker
    processes are started, with a copy of the data set, each time an iterator is made
    (``persistent_workers=False``), so setting the epoch before the pass reaches them all."""

    def __init__(self, augmentation, dataset, **kwargs):
        super().__init__(dataset, **kwargs)
        self.augmentation = augmentation

    def set_epoch(self, epoch):
        self.augmentation.epoch = epoch

    @property
    def global_sizes(self):
        return self.batch_sampler.global_sizes


class ShareOfBatches:
    """A batch sampler that yields rank ``rank``'s share (``share_bounds``) of every batch of
    indices of ``batches`` (a ``BatchSampler`` over ``n`` samples), ``share = (rank, world)``:
    each rank loads and augments only its own samples of the global batch.  ``global_sizes``
    lists the global batches' sizes."""

    def __init__(self, batches, share, n):
        self.batches, self.share, self.n = batches, share, n

    def __len__(self):
        return len(self.batches)

    @property
    def global_sizes(self):
        return global_batch_sizes(self.n, self.batches.batch_size)

    def __iter__(self):
        for idx in self.batches:
            lo, hi = share_bounds(len(idx), *self.share)
            yield idx[lo:hi]


def _collate(samples):
    """``default_collate`` of (image, label) pairs; an empty share of a batch (more ranks than
    samples in the last batch) is an empty batch of CIFAR-10's shape."""
    if not samples:
        return torch.empty((0,) + INPUT_SHAPE["cifar10"]), torch.empty(0, dtype=torch.long)
    return torch.utils.data.default_collate(samples)


def _worker_signals(worker_id):
    """In a loader worker: Ctrl-C / SIGTERM end it quietly (the main process's handlers, inherited
    through fork, would print a traceback per worker); the main process shuts the workers down."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _load_cifar10(data_dir, train):
    """Images (N, 3, 32, 32) uint8 and labels (N,) of CIFAR-10's train or test set."""
    import torchvision
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    before = _existing_dirs(data_dir)
    try:
        ds = torchvision.datasets.CIFAR10(data_dir, train=train, download=True)
    except Exception as e:
        _remove_new_dirs(before, data_dir)
        if os.path.isdir(folder) and all(os.path.exists(os.path.join(folder, f)) for f in CIFAR10_FILES):
            raise UserError(f"the cifar10 files in {folder} are truncated or corrupted "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); delete them "
                            f"so they download again") from None
        raise UserError(f"the cifar10 data set is not in {folder} and could not be downloaded (no "
                        f"network?); put cifar-10-python.tar.gz in {data_dir} or its files "
                        f"{', '.join(CIFAR10_FILES)} in {folder}") from None
    x, y = torch.from_numpy(ds.data), torch.tensor(ds.targets, dtype=torch.long)
    if x.dim() != 4 or tuple(x.shape[1:]) != (32, 32, 3) or len(x) != len(y) or len(y) == 0 \
            or int(y.min()) < 0 or int(y.max()) >= N_CLASSES:
        raise UserError(f"the cifar10 files in {folder} are truncated or corrupted (images "
                        f"{tuple(x.shape)}, labels {tuple(y.shape)}); delete them so they download again")
    return x.permute(0, 3, 1, 2).contiguous(), y


def _record_used(args, name, n):
    """A given ``--trainSubset``/``--testSubset`` becomes the ``n`` samples used."""
    if getattr(args, name) is not None:
        setattr(args, name, n)


def load_data(args, generator, pin_memory=False, share=(0, 1)):
    """Train and test loaders for ``args.dataset`` (first ``--trainSubset``/``--testSubset``
    samples when given; ``args.trainSubset``/``args.testSubset`` are then set to the numbers of
    samples used, at most the data set's, which the run folder records).  Batches are (x of
    shape (B, C, H, W), labels).  With ``share=(rank, world)`` (data-parallel training) every
    batch is rank ``rank``'s share (``share_bounds``) of the global batch a single process would
    draw from the same ``generator``; the train loader's ``global_sizes`` lists the global
    batches' sizes (the EP estimate divides by them).

    CIFAR-10: ``DataLoader``s with ``args.workers`` worker processes (0: the main process) and
    ``pin_memory`` (give True when training on CUDA); the training set is shuffled by
    ``generator`` and augmented per sample from ``args.seed`` (``CIFAR10Images``), so batches do
    not depend on the number of workers; the train loader has ``set_epoch``.  The test loader
    draws its iterators' (unused) worker base seed from a generator of its own, not from torch's
    global RNG.  The in-memory data sets ignore ``pin_memory``."""
    _check_data_dir(args.dataDir)
    train_n, test_n = args.trainSubset, args.testSubset
    if args.dataset == "cifar10":
        loaders = []
        data = torch.utils.data
        for train, n, bs in ((True, train_n, args.batchSize), (False, test_n, args.test_batchSize)):
            images = CIFAR10Images(*_load_cifar10(args.dataDir, train), augment=train, seed=args.seed)
            ds = images if n is None else data.Subset(images, range(min(n, len(images))))
            _record_used(args, "trainSubset" if train else "testSubset", len(ds))
            # the sampler and batches DataLoader(shuffle=train, generator=...) would make itself
            order = data.RandomSampler(ds, generator=generator) if train else data.SequentialSampler(ds)
            batches = ShareOfBatches(data.BatchSampler(order, bs, drop_last=False), share, len(ds))
            options = dict(batch_sampler=batches, collate_fn=_collate, num_workers=args.workers,
                           pin_memory=pin_memory, persistent_workers=False,
                           worker_init_fn=_worker_signals if args.workers else None)
            if train:
                loaders.append(AugmentedLoader(images, ds, generator=generator, **options))
            else:
                loaders.append(data.DataLoader(ds, generator=torch.Generator().manual_seed(0), **options))
        return loaders
    if args.dataset == "digits":
        parts = load_digits_split()
    else:
        parts = _load_mnist_like(args.dataset, args.dataDir)
    (xtr, ytr), (xte, yte) = parts
    if train_n is not None:
        xtr, ytr = xtr[:train_n], ytr[:train_n]
    if test_n is not None:
        xte, yte = xte[:test_n], yte[:test_n]
    _record_used(args, "trainSubset", len(ytr))
    _record_used(args, "testSubset", len(yte))
    return (TensorBatches(xtr, ytr, args.batchSize, True, generator, share),
            TensorBatches(xte, yte, args.test_batchSize, False, share=share))
