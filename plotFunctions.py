"""Plot the training curves of binary-weight EP runs (pandas + matplotlib only).

A copy of this file sits in every date folder ``DATA-0-<archi>-<dataset>/<YYYY-MM-DD>/``.
Run it there, with no argument (or give a date folder)::

    python plotFunctions.py [FOLDER]

For every ``S-<n>`` run in the folder it draws, inside that run folder, ``errors.png``,
``losses.png``, ``fliprates.png`` and ``alpha.png``; in the folder itself it draws the same four
figures with every run and the mean +/- std across runs (``summary_*.png``).  It reads only the
runs' ``results.csv`` files, so edit your copy freely.
"""

import glob
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402

FIGURES = {
    "errors": ("error (%)", lambda df: [c for c in ("train_error", "test_error") if c in df]),
    "losses": ("loss per sample", lambda df: [c for c in ("train_loss", "test_loss") if c in df]),
    "fliprates": ("weights flipped per epoch (% of the layer)",
                  lambda df: [c for c in df.columns if c.startswith("fliprate_")]),
    "alpha": ("scaling factor alpha", lambda df: [c for c in df.columns if c.startswith("alpha_")]),
}


def read_run(folder):
    """The run's results as a dataframe indexed by epoch, or None when it has none yet."""
    csv = os.path.join(folder, "results.csv")
    if not os.path.exists(csv):
        return None
    df = pd.read_csv(csv, index_col="epoch")
    return df if len(df) else None


def _label(column):
    return column.replace("_", " ")


def _finish(ax, ylabel, name, path, log=False):
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(name)
    ax.figure.tight_layout()
    try:
        _save_png(ax.figure, path)
    finally:
        plt.close(ax.figure)


def _save_png(fig, path):
    """Save ``fig`` as PNG through a hidden temporary file and a rename, so that a crash or an
    error never leaves half a figure where the last whole one was."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plot_one(folder, df):
    """The four figures of one run, saved in its folder."""
    title = os.path.basename(os.path.normpath(folder))
    for name, (ylabel, columns) in FIGURES.items():
        cols = columns(df)
        if not cols:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in cols:
            ax.plot(df.index, df[c], marker="o", markersize=3, label=_label(c))
        positive = bool((df[cols] > 0).all().all())
        _finish(ax, ylabel, f"{title}: {name}", os.path.join(folder, f"{name}.png"),
                log=(name == "fliprates" and positive))


def plot_summary(runs, out_folder):
    """Every run (thin lines) and the mean +/- std across runs (thick line, band), per column."""
    written = []
    for name, (ylabel, columns) in FIGURES.items():
        cols = sorted({c for df in runs.values() for c in columns(df)})
        if not cols:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, c in enumerate(cols):
            color = f"C{i % 10}"
            series = [df[c].rename(run) for run, df in runs.items() if c in df]
            table = pd.concat(series, axis=1)
            for run in table.columns:
                ax.plot(table.index, table[run], color=color, alpha=0.3, linewidth=0.8)
            mean, std = table.mean(axis=1), table.std(axis=1).fillna(0.0)
            ax.plot(mean.index, mean, color=color, linewidth=2,
                    label=f"{_label(c)} (mean of {table.shape[1]})")
            ax.fill_between(mean.index, mean - std, mean + std, color=color, alpha=0.2)
        path = os.path.join(out_folder, f"summary_{name}.png")
        _finish(ax, ylabel, f"{name}: {len(runs)} run(s), mean +/- std", path)
        written.append(path)
    return written


def plot_runs(folders, out_folder, per_run=True):
    """Plot each run folder (if ``per_run``) and the summary of all of them in ``out_folder``."""
    runs = {}
    for folder in folders:
        df = read_run(folder)
        if df is None:
            continue
        runs[os.path.basename(os.path.normpath(folder))] = df
        if per_run:
            plot_one(folder, df)
    return plot_summary(runs, out_folder) if runs else []


def run_folders(folder):
    found = [p for p in glob.glob(os.path.join(folder, "S-*")) if re.fullmatch(r"S-\d+", os.path.basename(p))]
    return sorted(found, key=lambda p: int(os.path.basename(p)[2:]))


def main(argv):
    folder = argv[1] if len(argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    folders = run_folders(folder)
    written = plot_runs(folders, folder)
    if not written:
        print(f"no S-<n> run with a results.csv in {folder}", file=sys.stderr)
        return 1
    print(f"plotted {len(folders)} run(s) in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
