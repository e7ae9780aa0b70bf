"""Plot and summarise binary-weight EP runs (standard library, pandas and matplotlib only).

A copy of this file sits in every date folder ``DATA-0-<archi>-<dataset>/<YYYY-MM-DD>/``::

    python plotFunctions.py            # the runs S-<n> beside this file; files written here
    python plotFunctions.py DIR...     # the runs in (or given as) each DIR; files written in the
                                       # current folder, runs named <date folder>/S-<n>

A DIR is a date folder holding ``S-<n>`` runs or one ``S-<n>`` folder.  For every run this draws,
inside the run folder, ``errors.png``, ``losses.png``, ``fliprates.png`` and ``alpha.png``.  In the
output folder it draws ``summary_*.png`` (the same four figures: every run and the mean +/- std of
all runs), then groups the runs by their effective hyperparameters and writes one
``group_<i>_errors.png`` per group (mean test and train error +/- std, each run faint behind),
``summary.csv`` and ``summary.md`` (the Markdown table that it also prints).  It reads only each
run's ``results.csv``, ``Hyperparameters.txt`` and ``run.lock``, so edit your copy freely.
bin_W_N runs' ``train_error_single``/``test_error_single`` (the first output neuron of each class
alone) are drawn dashed in the colour of ``train_error``/``test_error`` wherever those are drawn.

Groups.  Two runs are in one group when their effective values (``[effective values]`` of
``Hyperparameters.txt``: every argument, defaults filled in; in older files without sections, the
``key: value`` lines) are equal, leaving out ``SAME_GROUP`` (seed, outDir, dataDir, resume, device,
epochs, workers, check, export).  Groups are numbered in the order of their first run.

Run status.  ``running``: another process holds the ``flock`` of its ``run.lock``.  ``interrupted``:
not running and fewer rows in ``results.csv`` than the epochs it asked for (``epochs``, or the
``--epochs`` of its last resuming command).  ``done`` otherwise.  Unfinished runs count with the
epochs they have.  A run without a ``results.csv``, with no row yet or with one that cannot be used
(not a file, unreadable, a cell not a number, an epoch twice) is skipped with a one-line note; an
output folder that cannot be written stops the script with one line and exit code 2.

``summary.csv``, one row per group (numbers in columns of their own; errors in percent):

* ``group`` (1, 2, ...), ``arguments`` (the effective values that differ between groups,
  ``key=value`` separated by spaces, ``?`` where a run did not record the key; ``all runs`` with
  one group), ``runs`` (how many);
* ``epochs_min``, ``epochs_max``: epochs completed by its shortest and longest run;
* ``final_test_error_mean``/``_std``: test error at each run's last epoch;
  ``final_test_error_single_mean``/``_std``: the same of ``test_error_single`` over the runs that
  have it, empty when none has (the Markdown cell adds ``(k of n runs)`` when not all have it);
  ``best_test_error_mean``/``_std``: each run's lowest test error; ``best_epochs``: the epochs
  those were reached at, in the order of ``members``; ``final_train_error_mean``/``_std``: train
  error at the last epoch; every std is the sample std (ddof = 1), empty for a group of one run;
* ``seconds_per_epoch_mean``: ``epoch_seconds`` averaged over every epoch of every run in it;
* ``running``, ``interrupted``: how many of its runs are still running / were interrupted;
* ``members``: its runs' names, separated by spaces.
"""

import glob
import os
import re
import sys

try:
    import fcntl
except ImportError:  # no flock (Windows): no run is seen as running
    fcntl = None

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402

ERRORS = [c + s for s in ("", "_single") for c in ("train_error", "test_error")]  # _single: bin_W_N only
FIGURES = {
    "errors": ("error (%)", lambda df: [c for c in ERRORS if c in df]),
    "losses": ("loss per sample", lambda df: [c for c in ("train_loss", "test_loss") if c in df]),
    "fliprates": ("weights flipped per epoch (% of the layer)",
                  lambda df: [c for c in df.columns if c.startswith("fliprate_")]),
    "alpha": ("scaling factor alpha", lambda df: [c for c in df.columns if c.startswith("alpha_")]),
}
# Arguments that do not change what a run learns: runs differing only in them form one group.
SAME_GROUP = frozenset("seed outDir dataDir resume device epochs workers check export".split())
COLUMNS = ["group", "arguments", "runs", "epochs_min", "epochs_max", "final_test_error_mean",
           "final_test_error_std", "final_test_error_single_mean", "final_test_error_single_std",
           "best_test_error_mean", "best_test_error_std", "best_epochs", "final_train_error_mean",
           "final_train_error_std", "seconds_per_epoch_mean", "running", "interrupted", "members"]


def read_run(folder):
    """The run's results as a dataframe indexed by epoch (each epoch once, every cell a number), or
    None when it has no results.csv or no row yet; ValueError saying why it cannot be used."""
    csv = os.path.join(folder, "results.csv")
    if not os.path.exists(csv):
        return None
    try:
        table = pd.read_csv(csv)
    except (OSError, ValueError) as e:  # a folder, unreadable, empty, not text, a row too long
        why = " ".join(str(getattr(e, "strerror", None) or e).split())
        raise ValueError(f"cannot read {csv}: {why}") from None
    if "epoch" not in table:
        raise ValueError(f"{csv} has no epoch column")
    numbers = table.apply(pd.to_numeric, errors="coerce")
    for row, col in zip(*numbers.isna().to_numpy().nonzero()):  # the first cell not a number
        what = "empty or NaN" if pd.isna(table.iat[row, col]) else f"{table.iat[row, col]!r}, not a number"
        raise ValueError(f"{csv}: {table.columns[col]} on line {row + 2} is {what}")
    df = numbers.set_index("epoch")
    wrong = ([f"{e} is not a whole number" for e in df.index if e % 1]
             + [f"{e} appears more than once" for e in df.index[df.index.duplicated()]])
    if wrong:
        raise ValueError(f"{csv}: epoch {wrong[0]}")
    return df.set_axis(df.index.astype("int64")) if len(df) else None


def read_hyperparameters(folder):
    """``Hyperparameters.txt`` of a run as a dict: ``command`` (str or None), ``resumed`` (list of
    ``(epoch, command)``), ``given`` and ``effective`` (dicts of str; values with single spaces).
    Lines before any ``[section]`` count as effective values (older files have no sections).
    None when the file cannot be read."""
    try:
        with open(os.path.join(folder, "Hyperparameters.txt")) as f:
            lines = f.read().splitlines()
    except (OSError, ValueError):  # absent, a folder, unreadable, not text
        return None
    hp = {"command": None, "resumed": [], "given": {}, "effective": {}}
    section, bracketed = hp["effective"], False
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith("#"):
            continue
        header = re.fullmatch(r"\[(.*)\]", line)
        if header:
            name, bracketed = header.group(1).strip().lower(), True
            section = (hp["given"] if name.startswith("arguments")
                       else hp["effective"] if name.startswith("effective") else None)
            continue
        resumed = re.fullmatch(r"resumed after epoch (\d+):\s*(.*)", line)
        if resumed:
            hp["resumed"].append((int(resumed.group(1)), resumed.group(2)))
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), " ".join(value.split())
        if sep and key == "command" and not bracketed and hp["command"] is None:
            hp["command"] = value
        elif sep and key and section is not None:
            section[key] = value
    if not hp["effective"] and hp["given"]:  # sections written without effective values
        hp["effective"] = dict(hp["given"])
    return hp


def is_running(folder):
    """True when another open file holds the ``flock`` of ``<folder>/run.lock`` (the training
    process holds it for its whole life).  Taking it here is released at once."""
    if fcntl is None:
        return False
    try:
        fd = os.open(os.path.join(folder, "run.lock"), os.O_RDONLY)
    except OSError:  # no lock file: not running
        return False
    try:
        for mode in (fcntl.LOCK_EX, fcntl.LOCK_SH):  # shared where a read-only exclusive is refused
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            except OSError:
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return False
    finally:
        os.close(fd)


def epochs_asked(hp):
    """The epochs a run asked for: ``--epochs`` of its last resuming command that gives one, else
    its effective ``epochs``; None when unknown."""
    for _, command in reversed(hp["resumed"]):
        found = re.findall(r"--epochs[= ]+(\d+)", command)
        if found:
            return int(found[-1])
    try:
        return int(hp["effective"].get("epochs"))
    except (TypeError, ValueError):
        return None


def _finish(ax, ylabel, name, path, log=False):
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_yscale("log" if log else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(name if len(name) <= 90 else name[:87] + "...", fontsize=10)
    ax.figure.tight_layout()
    try:
        _atomic(path, lambda tmp: ax.figure.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(ax.figure)


def _atomic(path, content):
    """``content(tmp)`` writes (or ``content``, a str, is the text of) a hidden temporary file beside
    ``path``, then renamed to ``path``: a crash or an error never leaves half a file where the last
    whole one was.  An OSError names ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        if isinstance(content, str):
            with open(tmp, "w") as f:
                f.write(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    except OSError as e:  # the file asked for, not its temporary
        raise OSError(e.errno, e.strerror or str(e), path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _styles(cols):
    """``{column: (colour, linestyle, label)}`` in the order of ``cols``: matplotlib's colour cycle,
    each ``<x>_error_single`` (bin_W_N) dashed in the colour of ``<x>_error``, ``<x> (first neuron)``."""
    colour = {c: f"C{i % 10}" for i, c in enumerate(c for c in cols if not c.endswith("_single"))}
    return {c: (colour[c], "-", c.replace("_", " ")) if c in colour else
            (colour.get(c[:-7], "C9"), "--", c.replace("_error_single", " (first neuron)")) for c in cols}


def plot_one(folder, df):
    """The four figures of one run, saved in its folder."""
    title = os.path.basename(os.path.normpath(folder))
    for name, (ylabel, columns) in FIGURES.items():
        cols = columns(df)
        if not cols:
            continue
        ax = plt.subplots(figsize=(6, 4))[1]
        for c, (colour, dash, label) in _styles(cols).items():
            ax.plot(df.index, df[c], color=colour, linestyle=dash, marker="o", markersize=3, label=label)
        _finish(ax, ylabel, f"{title}: {name}", os.path.join(folder, f"{name}.png"),
                log=name == "fliprates" and bool((df[cols] > 0).all().all()))


def _bands(runs, cols, ylabel, title, path):
    """The figure at ``path``: for each column of ``cols`` (dict ``runs``: name -> dataframe),
    each run's values (thin, faint) and their mean +/- std across runs (thick line, band)."""
    ax = plt.subplots(figsize=(7, 4.5))[1]
    for column, (colour, dash, label) in _styles(cols).items():
        table = pd.concat([df[column].rename(run) for run, df in runs.items() if column in df], axis=1)
        for run in table.columns:
            ax.plot(table.index, table[run], color=colour, linestyle=dash, alpha=0.3, linewidth=0.8)
        mean, std = table.mean(axis=1), table.std(axis=1).fillna(0.0)
        ax.plot(mean.index, mean, color=colour, linestyle=dash, linewidth=2,
                label=f"{label} (mean of {table.shape[1]})")
        ax.fill_between(mean.index, mean - std, mean + std, color=colour, alpha=0.2)
    _finish(ax, ylabel, title, path)
    return path


def plot_summary(runs, out_folder):
    """Every run (thin lines) and the mean +/- std across runs (thick line, band), per column."""
    written = []
    for name, (ylabel, columns) in FIGURES.items():
        cols = sorted({c for df in runs.values() for c in columns(df)})
        if cols:
            written.append(_bands(runs, cols, ylabel, f"{name}: {len(runs)} run(s), mean +/- std",
                                  os.path.join(out_folder, f"summary_{name}.png")))
    return written


def plot_group(number, label, runs, out_folder):
    """``group_<number>_errors.png``: the group's test and train error (and first-neuron errors),
    mean +/- std, each run faint behind; None when its runs have no error column."""
    cols = [c for c in sorted(ERRORS) if any(c in df for df in runs.values())]  # test first
    return _bands(runs, cols, "error (%)", f"group {number}: {label} ({len(runs)} run(s))",
                  os.path.join(out_folder, f"group_{number}_errors.png")) if cols else None


def run_folders(folder):
    """The ``S-<n>`` folders inside ``folder``, by ``n``."""
    found = [p for p in glob.glob(os.path.join(folder, "S-*")) if re.fullmatch(r"S-\d+", os.path.basename(p))]
    return sorted(found, key=lambda p: int(os.path.basename(p)[2:]))


def find_runs(dirs, qualified):
    """``[(name, folder)]`` for the runs in (or given as) each of ``dirs``, each folder once.
    Names are ``S-<n>``, or ``<date folder>/S-<n>`` when ``qualified`` (longer if still equal)."""
    found, seen, names = [], set(), set()
    for d in dirs:
        if not os.path.isdir(d):
            print(f"note: {d} is not a folder, skipped", file=sys.stderr)
            continue
        folders = [d] if re.fullmatch(r"S-\d+", os.path.basename(os.path.normpath(d))) else run_folders(d)
        if not folders:
            print(f"note: no S-<n> run in {d}", file=sys.stderr)
        for folder in folders:
            real = os.path.realpath(folder)
            if real in seen:
                continue
            seen.add(real)
            parts, depth = real.split(os.sep), 2 if qualified else 1
            name = "/".join(parts[-depth:])
            while name in names and depth < len(parts):
                depth += 1
                name = "/".join(parts[-depth:])
            names.add(name)
            found.append((name, folder))
    return found


def load_runs(found, per_run=True):
    """Each run with results as a dict (name, folder, df, effective, status); draws its own
    figures in its folder when ``per_run``.  Runs without results are skipped with a note."""
    runs = []
    for name, folder in found:
        try:
            df = read_run(folder)
        except ValueError as e:  # results.csv not a file, unreadable or damaged
            print(f"note: {name} skipped: {e}; repair it to include this run", file=sys.stderr)
            continue
        if df is None:
            print(f"note: {name}: no results.csv or no epoch in it yet, skipped", file=sys.stderr)
            continue
        hp = read_hyperparameters(folder)
        if hp is None:
            print(f"note: {name}: no readable Hyperparameters.txt, grouped with the runs without one",
                  file=sys.stderr)
            hp = {"command": None, "resumed": [], "given": {}, "effective": {}}
        asked = epochs_asked(hp)
        status = ("running" if is_running(folder)
                  else "interrupted" if asked is not None and len(df) < asked else "done")
        runs.append({"name": name, "folder": folder, "df": df, "effective": hp["effective"],
                     "status": status})
        if per_run:
            try:
                plot_one(folder, df)
            except OSError as e:  # e.g. a read-only folder: its figures stay as they are
                print(f"note: {name}: could not draw its figures ({e})", file=sys.stderr)
    return runs


def group_runs(runs):
    """``(groups, labels)``: lists of runs sharing their effective values outside ``SAME_GROUP``
    (in the order of their first run), and each group's distinguishing ``key=value`` text."""
    by_key = {}
    for run in runs:
        params = {k: v for k, v in run["effective"].items() if k not in SAME_GROUP}
        by_key.setdefault(tuple(sorted(params.items())), (params, []))[1].append(run)
    params = [p for p, _ in by_key.values()]
    keys = sorted(set().union(*params))
    differ = [k for k in keys if len({p.get(k) for p in params}) > 1]
    labels = [" ".join(f"{k}={p.get(k, '?')}" for k in differ) or "all runs" for p in params]
    return [members for _, members in by_key.values()], labels


def _final(df, column):
    return df[column].iloc[-1] if column in df else float("nan")


def summarize(groups, labels):
    """The ``summary.csv`` table (see the module docstring), one row per group."""
    rows = []
    for number, (members, label) in enumerate(zip(groups, labels), 1):
        dfs = [r["df"] for r in members]
        stats = {f"final_{c}": pd.Series([_final(df, c) for df in dfs], dtype=float)  # NaN: a run lacks c
                 for c in ("test_error", "test_error_single", "train_error")}
        stats["best_test_error"] = pd.Series([df["test_error"].min() if "test_error" in df else None
                                              for df in dfs], dtype=float)
        best_at = [str(df["test_error"].idxmin()) if "test_error" in df else "?" for df in dfs]  # no NaN: read_run
        seconds = [df["epoch_seconds"] for df in dfs if "epoch_seconds" in df]
        epochs = [len(df) for df in dfs]
        rows.append({
            "group": number, "arguments": label, "runs": len(members),
            "epochs_min": min(epochs), "epochs_max": max(epochs),
            **{f"{c}_{k}": getattr(v, k)() for c, v in stats.items() for k in ("mean", "std")},
            "best_epochs": " ".join(best_at),
            "seconds_per_epoch_mean": pd.concat(seconds).mean() if seconds else float("nan"),
            "running": sum(r["status"] == "running" for r in members),
            "interrupted": sum(r["status"] == "interrupted" for r in members),
            "members": " ".join(r["name"] for r in members)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _pm(mean, std):
    """``mean +/- std`` with two decimals; the mean alone when std is missing; "" without mean."""
    return "" if pd.isna(mean) else f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} +/- {std:.2f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def markdown(summary, groups):
    """The Markdown text: one row per group, a legend, then one row per run with its status."""
    rows, unfinished = [], False
    for (_, s), members in zip(summary.iterrows(), groups):
        star = "*" if s["running"] or s["interrupted"] else ""
        unfinished |= bool(star)
        span = f"{s['epochs_min']}" + (f"-{s['epochs_max']}" if s["epochs_max"] != s["epochs_min"] else "")
        status = ", ".join(f"{s[k]} {k}" for k in ("running", "interrupted") if s[k]) or "done"
        having = sum("test_error_single" in r["df"] for r in members)  # a mixed group says how many
        test, single, best, train = (_pm(s[f"{k}_mean"], s[f"{k}_std"]) for k in (
            "final_test_error", "final_test_error_single", "best_test_error", "final_train_error"))
        single += f" ({having} of {s['runs']} runs)" if 0 < having < s["runs"] else ""
        rows.append([s["group"], s["arguments"], s["runs"], span + star, test, single, best,
                     s["best_epochs"], train, _pm(s["seconds_per_epoch_mean"], None), status])
    lines = _table(["group", "arguments", "runs", "epochs", "final test error (%)",
                    "final test error, first neuron (%)", "best test error (%)", "best at epoch",
                    "final train error (%)", "s / epoch", "status"], rows)
    lines += ["", "Errors: mean +/- sample std (ddof = 1) over the group's runs; best at epoch: one "
                 "epoch per run, in the order of the runs below."]
    if unfinished:
        lines.append("`*` the group holds runs still running or interrupted: they count with the "
                     "epochs they have.")
    run_rows = [[r["name"], number, len(r["df"]), r["status"], _pm(_final(r["df"], "test_error"), None),
                 _pm(r["df"]["test_error"].min() if "test_error" in r["df"] else None, None)]
                for number, members in enumerate(groups, 1) for r in members]
    lines += [""] + _table(["run", "group", "epochs", "status", "final test error (%)",
                            "best test error (%)"], run_rows)
    return "\n".join(lines) + "\n"


def main(argv):
    """``argv[1:]``: folders to summarise (output in the current folder); none: the folder of
    this file (output there).  Exit code 0; 1 when no run has results; 2 when the output folder
    cannot be written."""
    here = os.path.dirname(os.path.abspath(__file__))
    dirs, out = (argv[1:], os.getcwd()) if len(argv) > 1 else ([here], here)
    runs = load_runs(find_runs(dirs, qualified=len(argv) > 1))
    if not runs:
        print(f"no S-<n> run with a results.csv in {' '.join(dirs)}", file=sys.stderr)
        return 1
    groups, labels = group_runs(runs)
    summary = summarize(groups, labels)
    text = markdown(summary, groups)
    try:
        written = plot_summary({r["name"]: r["df"] for r in runs}, out)
        for number, (members, label) in enumerate(zip(groups, labels), 1):
            path = plot_group(number, label, {r["name"]: r["df"] for r in members}, out)
            written += [path] if path else []
        for stale in set(glob.glob(os.path.join(out, "group_*_errors.png"))) - set(written):
            os.remove(stale)  # of groups gone since
        _atomic(os.path.join(out, "summary.csv"), lambda tmp: summary.to_csv(tmp, index=False))
        _atomic(os.path.join(out, "summary.md"), text)
    except OSError as e:  # a read-only (or full) output folder
        print(f"plotFunctions.py: error: cannot write {e.filename or out} ({e.strerror or e}); run it in a "
              f"folder you can write to: cd <that folder> && python {os.path.abspath(__file__)} "
              f"{' '.join(os.path.abspath(d) for d in dirs)}", file=sys.stderr)
        return 2
    print(text, end="")
    print(f"plotted {len(runs)} run(s) in {len(groups)} group(s); wrote summary.csv, summary.md and "
          f"{len(written)} figure(s) in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
