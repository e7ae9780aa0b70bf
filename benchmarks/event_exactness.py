"""Event-driven against dense relaxation (``EP_EVENT_DRIVEN=1`` / ``0``) of the paper's Section 4
lines, as the issue asks: ``main.py`` runs each line twice into one folder and the two runs are
compared, ``results.csv`` cell for cell (but ``epoch_seconds`` and the ``incremental_*`` shares,
0 for the dense run) and every tensor of ``checkpoint.pt`` bit for bit.

    python benchmarks/event_exactness.py [fc1h conv alpha symmetric] [--out DIR]

* ``fc1h``: line 13 (784-8192-100) on 4,000 + 1,000 Fashion-MNIST images, 2 epochs;
* ``conv``: line 17 (512-256 channels, T 100, Kmax 50) on 256 + 256 images, 1 epoch;
* ``alpha``: line 14 (learnt alpha, its ``--lrAlpha`` raised to 1e-3 so that alpha moves),
  1,000 + 500 images, 1 epoch;
* ``symmetric``: line 13 with ``--nudging symmetric``, 1,000 + 500 images, 1 epoch.

Prints, per line, whether the runs agree (else the first differences), each mode's seconds per
epoch and the event-driven run's activity columns.  Reads Fashion-MNIST from ``--dataDir`` or
Debian's ``/usr/share/datasets/fashion-mnist``.
"""

import argparse
import csv
import glob
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.event_speed import argv  # noqa: E402

RUNS = {
    "fc1h": ("fc1h", "--trainSubset 4000 --testSubset 1000 --epochs 2"),
    "conv": ("conv", "--trainSubset 256 --testSubset 256 --epochs 1"),
    "alpha": ("fc1h", "--trainSubset 1000 --testSubset 500 --epochs 1 --learnAlpha 1 --lrAlpha 1e-3 1e-3"),
    "symmetric": ("fc1h", "--trainSubset 1000 --testSubset 500 --epochs 1 --nudging symmetric"),
}


def rows_of(run):
    """The rows of a run folder's ``results.csv`` as dicts of strings."""
    with open(os.path.join(run, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def differences(event, dense):
    """What differs between the run folders ``event`` and ``dense`` (a list of lines; empty: they
    agree): ``results.csv`` cells but ``epoch_seconds`` and ``incremental_*`` (which must be 0 in
    ``dense``), and ``checkpoint.pt`` values (tensors and arrays bit for bit)."""
    rows = [rows_of(event), rows_of(dense)]
    out = [] if len(rows[0]) == len(rows[1]) else [f"results.csv: {len(rows[0])} and {len(rows[1])} rows"]
    for ra, rb in zip(*rows):
        if list(ra) != list(rb):
            out.append(f"results.csv columns {list(ra)} and {list(rb)}")
            break
        for column in ra:
            if column.startswith("incremental_") and float(rb[column]) != 0.0:
                out.append(f"epoch {ra['epoch']}: {column} {rb[column]} in the dense run")
            elif column != "epoch_seconds" and not column.startswith("incremental_") and ra[column] != rb[column]:
                out.append(f"epoch {ra['epoch']}: {column} {ra[column]} and {rb[column]}")
    saved = [torch.load(os.path.join(r, "checkpoint.pt"), map_location="cpu", weights_only=False) for r in (event, dense)]
    return out + _compare(*saved, "checkpoint")


def _compare(a, b, where):
    if type(a) is not type(b):
        return [f"{where}: {type(a).__name__} and {type(b).__name__}"]
    if torch.is_tensor(a):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [f"{where}: tensors differ"]
    if isinstance(a, np.ndarray):
        return [] if a.dtype == b.dtype and np.array_equal(a, b) else [f"{where}: arrays differ"]
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{where}: keys {list(a)} and {list(b)}"]
        return [d for k in a for d in _compare(a[k], b[k], f"{where}[{k!r}]")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} and {len(b)}"]
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in _compare(u, v, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} and {b!r}"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help=f"some of {', '.join(RUNS)} (default: all)")
    p.add_argument("--out", help="where the run folders go (default: a temporary folder)")
    p.add_argument("--dataDir")
    a = p.parse_args()
    unknown = [r for r in a.runs if r not in RUNS]
    if unknown:
        p.error(f"unknown run {unknown[0]!r}: choose from {', '.join(RUNS)}")
    out = a.out or tempfile.mkdtemp(prefix="event_exactness_")
    for name in a.runs or list(RUNS):
        line, extra = RUNS[name]
        folder = os.path.join(out, name)
        for mode in ("1", "0"):
            cmd = [sys.executable, os.path.join(ROOT, "main.py")] + argv(line, *extra.split(), "--seed", 0,
                                                                          "--outDir", folder)
            cmd += ["--dataDir", a.dataDir] if a.dataDir else []
            env = dict(os.environ, EP_NO_PROGRESS="1", EP_EVENT_DRIVEN=mode)
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        event, dense = sorted(glob.glob(os.path.join(folder, "DATA-0-*", "*", "S-*")),
                              key=lambda f: int(f.rsplit("-", 1)[1]))
        found = differences(event, dense)
        seconds = [" / ".join(f"{float(r['epoch_seconds']):.1f}" for r in rows_of(run)) for run in (event, dense)]
        print(f"{name}: {'the same results.csv and checkpoint.pt' if not found else 'DIFFERENT: ' + '; '.join(found[:5])}"
              f"; seconds per epoch event-driven {seconds[0]}, dense {seconds[1]} ({folder})")
        last = rows_of(event)[-1]
        print("  " + ", ".join(f"{c} {float(v):.2f}" for c, v in last.items()
                               if c.startswith(("active_", "changed_", "incremental_"))), flush=True)


if __name__ == "__main__":
    main()
