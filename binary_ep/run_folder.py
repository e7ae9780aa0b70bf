"""Run folders: ``<outDir>/DATA-0-<archi>-<dataset>/<date>/S-<n>``, ``Hyperparameters.txt`` and
``results.csv`` (DESIGN.md section 7)."""

import datetime
import os
import re
import shlex
import shutil
import sys

import pandas as pd

from binary_ep import checkpoint, resume
from binary_ep.files import atomic_write, lock_run_folder, remove_stale_temporaries, write_text
from binary_ep.signals import critical


def run_root(out_dir, archi, dataset, date=None):
    """The date folder ``<out_dir>/DATA-0-<archi>-<dataset>/<YYYY-MM-DD>`` (today by default)."""
    date = date or datetime.date.today().isoformat()
    return os.path.join(out_dir, f"DATA-0-{archi}-{dataset}", date)


def create_run_folder(out_dir, archi, dataset, plot_src):
    """Create ``<out_dir>/DATA-0-<archi>-<dataset>/<YYYY-MM-DD>/S-<n>`` (n = next free number, taken
    atomically with ``mkdir``), copy the plotting script ``plot_src`` into the date folder (once),
    return the S folder."""
    date_folder = run_root(out_dir, archi, dataset)
    os.makedirs(date_folder, exist_ok=True)
    plot_dst = os.path.join(date_folder, "plotFunctions.py")
    if not os.path.exists(plot_dst):
        atomic_write(plot_dst, lambda tmp: shutil.copyfile(plot_src, tmp))
    taken = [int(m.group(1)) for m in (re.fullmatch(r"S-(\d+)", d) for d in os.listdir(date_folder)) if m]
    n = max(taken, default=0) + 1
    while True:
        path = os.path.join(date_folder, f"S-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1


GIVEN_SECTION = "[arguments as given]"
EFFECTIVE_SECTION = "[effective values]"


def _value(value):
    return " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def command_line(args, argv):
    """The shell-quoted command that re-runs ``argv`` (a drawn seed included), as one string."""
    seed = [] if "seed" in args.given else ["--seed", str(args.seed)]
    return shlex.join(["python", "main.py"] + list(argv) + seed)


def write_hyperparameters(path, args, argv):
    """``Hyperparameters.txt``: a shell-quoted ``command:`` line that re-parses to the same
    arguments (a drawn ``--seed`` included), the section ``[arguments as given]`` (the flags as
    typed, lists in the order typed: output layer first) and the section ``[effective values]``
    (every argument as the run used it: defaults filled in, lists completed), one
    ``name: value`` per line.  ``resumed after epoch N: ...`` lines are added under the command."""
    lines = ["# Hyperparameters of this run (per-layer lists: output layer first).",
             "command: " + command_line(args, argv), "", GIVEN_SECTION]
    lines += [f"{key}: {_value(value)}" for key, value in sorted(args.given.items())]
    lines += ["", EFFECTIVE_SECTION]
    lines += [f"{key}: {_value(value)}" for key, value in sorted(vars(args).items()) if key != "given"]
    write_text(os.path.join(path, "Hyperparameters.txt"), "\n".join(lines) + "\n")


def note_resume(path, done, argv):
    """Add ``resumed after epoch <done>: <command>`` under the command lines of the run's
    ``Hyperparameters.txt`` (the sections below stay as they were)."""
    hp = os.path.join(path, "Hyperparameters.txt")
    with open(hp) as f:
        text = f.read()
    line = f"resumed after epoch {done}: {shlex.join(['python', 'main.py'] + list(argv))}\n"
    head, blank, rest = text.partition("\n\n")
    text = head + "\n" + line + blank[1:] + rest if blank else text + ("" if text.endswith("\n") else "\n") + line
    write_text(hp, text)


def result_columns(layer_names):
    """Columns of ``results.csv`` (index: ``epoch``, 1-based) for layers named ``layer_names``."""
    return (["train_error", "test_error", "train_loss", "test_loss"]
            + [f"flips_{n}" for n in layer_names] + [f"fliprate_{n}" for n in layer_names]
            + [f"alpha_{n}" for n in layer_names] + ["epoch_seconds"])


def init_results(path, layer_names):
    """An empty results dataframe with the run's columns (or the existing ``results.csv``)."""
    csv = os.path.join(path, "results.csv")
    if os.path.exists(csv):
        # pandas 3 reads floats back exactly by default (and deprecates the option)
        exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
        return pd.read_csv(csv, index_col="epoch", **exact)
    df = pd.DataFrame(columns=result_columns(layer_names), dtype=float)
    df.index.name = "epoch"
    return df


def update_results(path, df, epoch, train, test, net, seconds):
    """Add the row of ``epoch`` and rewrite ``results.csv`` atomically."""
    row = {"train_error": train["train_error"], "test_error": test["test_error"],
           "train_loss": train["train_loss"], "test_loss": test["test_loss"],
           "epoch_seconds": seconds}
    for name, n, size, alpha in zip(net.layer_names, train["flips"], net.n_weights, net.alphas()):
        row[f"flips_{name}"] = n
        row[f"fliprate_{name}"] = 100.0 * n / size
        row[f"alpha_{name}"] = float(f"{alpha:.7g}")  # float32 precision: 0.0629, not 0.06289999932
    df.loc[epoch] = [row[c] for c in df.columns]
    atomic_write(os.path.join(path, "results.csv"), lambda tmp: df.to_csv(tmp, index_label="epoch"))
    return df


def open_run(args, argv, net, tools, generators):
    """Create the run folder with the architecture's ``tools`` (``createPath``,
    ``saveHyperparameters``, ``initDataframe``) and lock it, or take over ``--resume``'s (its
    checkpoint loaded into ``net`` and ``generators``, its results so far read back, the resume
    noted in Hyperparameters.txt): returns ``(S-<n> folder, epochs done, results dataframe)``."""
    if not args.resume:
        path = None
        try:
            with critical():
                path = tools.createPath(args)
                lock_run_folder(path)
                tools.saveHyperparameters(path, args, argv)
        except BaseException:  # a signal or a full disk: no half-made run folder
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
            raise
        print(f"run folder: {path}", file=sys.stderr)
        return path, 0, tools.initDataframe(path, net)
    path = args.resume
    for attempt in ("check", "locked"):  # checked before the lock touches the folder, then read under it
        done = checkpoint.load_checkpoint(path, net, generators)
        if done >= args.epochs:
            print(f"{path} already has its {done} epochs; nothing to do (raise --epochs to train longer)",
                  file=sys.stderr)
            return path, done, None
        df = resume.resumed_dataframe(path, lambda: tools.initDataframe(path, net),
                                      result_columns(net.layer_names), done)
        lock_run_folder(path)
    with critical():
        remove_stale_temporaries(path)
        note_resume(path, done, argv)
    print(f"resuming {path} after epoch {done}\nrun folder: {path}", file=sys.stderr)
    return path, done, df
