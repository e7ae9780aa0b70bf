"""Run folders: ``<outDir>/DATA-0-<archi>-<dataset>/<date>/S-<n>``, ``Hyperparameters.txt`` and
``results.csv`` (DESIGN.md section 7)."""

import csv
import datetime
import io
import math
import os
import re
import shlex
import shutil
import sys

import pandas as pd

from binary_ep import checkpoint, resume
from binary_ep.activity import activity_columns
from binary_ep.files import atomic_write, lock_run_folder, stage, write_text
from binary_ep.files import reason_of
from binary_ep.signals import critical
from binary_ep.vocabulary import UserError


def run_root(out_dir, archi, dataset, date=None):
    """The date folder ``<out_dir>/DATA-0-<archi>-<dataset>/<YYYY-MM-DD>`` (today by default)."""
    date = date or datetime.date.today().isoformat()
    return os.path.join(out_dir, f"DATA-0-{archi}-{dataset}", date)


def date_folder(args, archi):
    """Where a new ``S-<n>`` folder goes: beside the run it checks for ``--check`` of a
    ``--resume`` run (its date folder), else today's date folder under ``--outDir``."""
    if args.resume and args.check != "none":
        return os.path.dirname(os.path.abspath(args.resume))
    return run_root(args.outDir, archi, args.dataset)


def create_run_folder(folder, plot_src):
    """Create ``folder/S-<n>`` (n = next free number, taken atomically with ``mkdir``), copy the
    plotting script ``plot_src`` into ``folder`` (once), return the S folder; it is recorded as
    made by this process (``discard_unfinished``)."""
    os.makedirs(folder, exist_ok=True)
    plot_dst = os.path.join(folder, "plotFunctions.py")
    if not os.path.exists(plot_dst):
        atomic_write(plot_dst, lambda tmp: shutil.copyfile(plot_src, tmp))
    taken = [int(m.group(1)) for m in (re.fullmatch(r"S-(\d+)", d) for d in os.listdir(folder)) if m]
    n = max(taken, default=0) + 1
    while True:
        path = os.path.join(folder, f"S-{n}")
        try:
            os.mkdir(path)
            _CREATED.add(os.path.abspath(path))
            return path
        except FileExistsError:
            n += 1


_CREATED = set()  # the S-<n> folders this process made: the only ones it may ever remove


def discard_unfinished(path):
    """Remove the run folder ``path`` if, and only if, this process created it and no epoch
    finished in it (no ``checkpoint.pt``): returns whether it did.  Every other folder stays as
    it is, whatever went wrong."""
    path = os.path.abspath(path)
    if path not in _CREATED or os.path.exists(os.path.join(path, "checkpoint.pt")):
        return False
    shutil.rmtree(path, ignore_errors=True)
    _CREATED.discard(path)
    return True


def new_run_folder(args, argv, tools):
    """The one way to start a run folder (training and ``--check`` alike): created by the
    architecture's ``tools.createPath``, locked, described by ``tools.saveHyperparameters``;
    a signal or a failed write on the way removes it again (``discard_unfinished``).  Returns
    the ``S-<n>`` folder."""
    path = None
    try:
        with critical():
            path = tools.createPath(args)
            lock_run_folder(path)
            tools.saveHyperparameters(path, args, argv)
    except BaseException:  # a signal or a full disk: no half-made run folder
        if path is not None:
            discard_unfinished(path)
        raise
    return path


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
    ``Hyperparameters.txt`` (the sections below stay as they were): written now, in place with
    the first epoch this process saves (``files.stage``)."""
    hp = os.path.join(path, "Hyperparameters.txt")
    text = read_text(hp)
    line = f"resumed after epoch {done}: {shlex.join(['python', 'main.py'] + list(argv))}\n"
    head, blank, rest = text.partition("\n\n")
    text = head + "\n" + line + blank[1:] + rest if blank else text + ("" if text.endswith("\n") else "\n") + line
    stage(hp, text.encode())


RESUMED = re.compile(r"resumed after epoch \d+: ")


def read_text(path):
    """The text of the run file ``path`` (Hyperparameters.txt, results.csv), which must be UTF-8:
    a byte that is not, or a file that cannot be read, is one ``UserError`` naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{path} cannot be read ({reason_of(e)}); make it readable or restore it "
                        f"from a copy") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path} is damaged: line {line} holds the byte 0x{data[e.start]:02x}, which is "
                        f"not UTF-8 text; retype that line in a text editor or restore the file from "
                        f"a copy") from None


def read_hyperparameters(path):
    """``path/Hyperparameters.txt`` read back: ``(given, effective)``, the ``name: value`` lines of
    its sections ``[arguments as given]`` and ``[effective values]`` as dicts of strings, as
    ``write_hyperparameters`` wrote them (lists space-separated).  The oldest format (before
    commit 4e77073) has no sections: its value lines under the command are ``vars(args)``, every
    argument as the run used it, so they are the effective values and ``given`` is empty.
    Comments and the ``command:`` and ``resumed after epoch N:`` lines are no values."""
    given, effective = {}, {}
    sections = {GIVEN_SECTION: given, EFFECTIVE_SECTION: effective}
    current, head = effective, True  # before any section: the oldest format's values
    for line in read_text(os.path.join(path, "Hyperparameters.txt")).splitlines():
        if line in sections:
            current, head = sections[line], False
        elif not line.startswith("#") and not (head and (line.startswith("command: ") or RESUMED.match(line))):
            name, sep, value = line.partition(": ")
            if sep:
                current[name] = value
    return given, effective


def recorded_differences(path, values, names):
    """The ``names`` whose value in ``values`` (``{name: value}`` as a run uses them) is not the
    effective value ``path/Hyperparameters.txt`` records: ``[(name, value, recorded value)]``, both
    as the file writes them; a name the file does not record is not compared."""
    _, effective = read_hyperparameters(path)
    return [(n, _value(values[n]), effective[n]) for n in names
            if n in effective and _value(values[n]) != effective[n]]


def result_columns(layer_names, single=False):
    """Columns of ``results.csv`` (index: ``epoch``, 1-based) for layers named ``layer_names``;
    ``single`` (binary neurons): the errors of the first output neuron of each class alone too,
    and the activity of the training phases (``activity.activity_columns``)."""
    return (["train_error", "test_error"] + (["train_error_single", "test_error_single"] if single else [])
            + ["train_loss", "test_loss"]
            + [f"flips_{n}" for n in layer_names] + [f"fliprate_{n}" for n in layer_names]
            + [f"alpha_{n}" for n in layer_names] + (activity_columns(layer_names) if single else [])
            + ["epoch_seconds"])


def init_results(path, layer_names, single=False):
    """An empty results dataframe with the run's columns (``result_columns``), or the existing
    ``results.csv``, read back and checked by ``read_results``."""
    results = os.path.join(path, "results.csv")
    if os.path.exists(results):
        return read_results(results)
    df = pd.DataFrame(columns=result_columns(layer_names, single), dtype=float)
    df.index.name = "epoch"
    return df


def read_results(path):
    """The ``results.csv`` at ``path`` as ``update_results`` wrote it: a dataframe of floats (the
    values exactly as written) indexed by ``epoch`` (int64).  Every row must be sound, or it is one
    ``UserError`` naming the line, the epoch and the column: an epoch that is a positive integer,
    above the row before it (each epoch once, in order), as many cells as the header, and each
    cell a finite number.  No column can be NaN or infinite in a run's own file: the errors and
    losses are sums divided by ``max(n, 1)``, a fliprate divides by the layer's weight count,
    non-finite states, biases and alpha stop training (``Diverged``) before their epoch is saved."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header, epochs, rows, lines = None, [], [], {}

    def bad(what):
        return UserError(f"{path} line {reader.line_num}{what}; restore results.csv from a copy or "
                         f"start a new run")
    try:
        for cells in reader:
            if not cells:
                continue  # a blank line holds nothing
            if header is None:
                header = cells
                if header[0] != "epoch":
                    raise bad(f": the first column is {header[0]!r}, not 'epoch'")
                continue
            if not re.fullmatch(r"[0-9]+", cells[0]) or int(cells[0]) == 0:
                raise bad(f": the epoch {cells[0]!r} is not a positive integer")
            epoch = int(cells[0])
            if epoch in lines:
                raise bad(f" (epoch {epoch}): epoch {epoch} again, first on line {lines[epoch]}")
            if epochs and epoch < epochs[-1]:
                raise bad(f" (epoch {epoch}): epoch {epoch} after epoch {epochs[-1]}; the rows go in epoch order")
            if len(cells) != len(header):
                raise bad(f" (epoch {epoch}) has {len(cells)} cells, the header {len(header)}")
            rows.append([_number(cell, name, bad, epoch) for name, cell in zip(header[1:], cells[1:])])
            epochs.append(epoch)
            lines[epoch] = reader.line_num
    except csv.Error as e:
        raise bad(f" is not CSV ({e})") from None
    if header is None:
        raise UserError(f"{path} is empty (not even its header line); restore it from a copy or start "
                        f"a new run")
    return pd.DataFrame(rows, columns=header[1:], index=pd.Index(epochs, dtype="int64", name="epoch"),
                        dtype=float)


def _number(cell, name, bad, epoch):
    """The float of the results.csv ``cell`` of column ``name``; ``bad(what)`` makes the error."""
    try:
        value = float(cell)
    except ValueError:
        raise bad(f" (epoch {epoch}), column {name}: " + ("the cell is empty" if not cell.strip() else
                                                           f"{cell!r} is not a number")) from None
    if not math.isfinite(value):
        raise bad(f" (epoch {epoch}), column {name}: {cell!r} is not a finite number")
    return value


def update_results(path, df, epoch, train, test, net, seconds):
    """Add the row of ``epoch`` and rewrite ``results.csv`` atomically."""
    row = {**train, **test, "epoch_seconds": seconds}
    for name, n, size, alpha in zip(net.layer_names, train["flips"], net.n_weights, net.alphas()):
        row[f"flips_{name}"] = n
        row[f"fliprate_{name}"] = 100.0 * n / size
        row[f"alpha_{name}"] = float(f"{alpha:.7g}")  # float32 precision: 0.0629, not 0.06289999932
    df.loc[epoch] = [row[c] for c in df.columns]
    atomic_write(os.path.join(path, "results.csv"), lambda tmp: df.to_csv(tmp, index_label="epoch"))
    return df


def open_run(args, argv, net, tools, generators, made=None):
    """A new run folder (``new_run_folder``) or ``--resume``'s: its checkpoint loaded into
    ``net`` and ``generators``, its results so far read back, the resume's note staged for
    Hyperparameters.txt (it lands with the first epoch this process saves, so a resume that
    cannot go on changes nothing).  ``made(path)`` is told a new folder as soon as it exists.
    Returns ``(S-<n> folder, epochs done, results dataframe)``."""
    if not args.resume:
        path = new_run_folder(args, argv, tools)
        if made is not None:  # the caller knows its folder before anything else can go wrong
            made(path)
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
                                      result_columns(net.layer_names, net.neurons.binary), done)
        lock_run_folder(path)
    note_resume(path, done, argv)
    print(f"resuming {path} after epoch {done}\nrun folder: {path}", file=sys.stderr)
    return path, done, df
