"""Fake data sets written in the layouts torchvision reads, for the tests (no download here)."""

import pickle

import numpy as np


def write_cifar10(root, n_per_batch=10, seed=0):
    """CIFAR-10 in torchvision's layout (pickled batches, uint8 rows of 3072 = 3x32x32)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.randint(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.randint(0, 10, size=n_per_batch)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return batches
