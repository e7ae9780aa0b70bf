"""A resume checks what it resumes (issue 17, section 2): a ``checkpoint.pt`` of another network,
a damaged ``results.csv`` or ``Hyperparameters.txt`` is one line and exit code 2, and every file
of the run folder stays byte for byte as it was; a folder an older version wrote still resumes.

One real digits run (one epoch) is made per module; each test damages a copy of it and resumes
the copy in-process with ``main.main(["--resume", copy, "--epochs", "2"])``.
"""

import argparse
import hashlib
import os
import shutil

import pytest
import torch

import main

# a valid run of well under a second: the folder every test copies
QUICK = ("--device -1 --archi fc --dataset digits --layersList 64 16 10 --T 4 --Kmax 2 --beta 0.5 "
         "--gamma 0.01 0.01 --gradThreshold 1e-6 1e-6 --lrBias 0.05 0.1 --batchSize 32 "
         "--test_batchSize 200 --trainSubset 64 --testSubset 64 --seed 1").split()
# the oldest Hyperparameters.txt (first commit to 4e77073): a comment, the command, then every
# argument as the run used it (vars(args)), one "name: value" a line, no sections
OLD_HEADER = "# Hyperparameters of this run, as given (per-layer lists: output layer first)."
NEWER_KEYS = ("export", "workers")  # the arguments that commit 4e77073 added


def no_plots(mp):
    """The runs here draw no figures (a second or more each; the figures are tested elsewhere)."""
    mp.setattr(main, "plot_run", lambda path: None)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The S-1 folder of a finished one-epoch QUICK run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EP_NO_PROGRESS", "1")
        no_plots(mp)
        out = tmp_path_factory.mktemp("first_run")
        assert main.main(QUICK + ["--epochs", "1", "--outDir", str(out)]) == 0
        (run,) = out.glob("DATA-0-fc-digits/*/S-1")
        yield run


@pytest.fixture
def run(finished_run, tmp_path, capsys, monkeypatch):
    """A copy of the finished run, to damage, without its run.lock: a lock taken before a check
    would create it (the lock writes nothing into an existing one), and the hashes would show it."""
    no_plots(monkeypatch)
    copy = tmp_path / "S-1"
    shutil.copytree(finished_run, copy)
    (copy / "run.lock").unlink()
    capsys.readouterr()
    return copy


def hashes(folder):
    """{relative path: sha256 of its bytes} of every file under ``folder`` (run.lock included)."""
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(folder) for f in files}


def resume(folder, epochs="2"):
    """Exit code of ``main.py --resume folder --epochs epochs``, run in this process."""
    try:
        return main.main(["--resume", str(folder), "--epochs", epochs])
    except SystemExit as e:  # argparse's one-line errors exit through SystemExit
        return e.code


def assert_refused(folder, capsys, *fragments):
    """Resuming ``folder`` exits with 2 and one ``main.py: error:`` line holding every fragment,
    and changes no file in it; returns the line."""
    before = hashes(folder)
    code = resume(folder)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("main.py: error: "), err
    missing = [f for f in fragments if f not in lines[0]]
    assert not missing, f"{missing} not in: {lines[0]}"
    after = hashes(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"resume changed {changed} in {folder}"
    return lines[0]


def load(folder):
    return torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=False)


def save(folder, payload):
    torch.save(payload, folder / "checkpoint.pt")


def set_effective(folder, name, value):
    """Change the line ``name: ...`` of Hyperparameters.txt's [effective values] to ``value``."""
    hp = folder / "Hyperparameters.txt"
    lines = hp.read_text().split("\n")
    start = lines.index("[effective values]")
    k = next(i for i in range(start, len(lines)) if lines[i].startswith(f"{name}: "))
    lines[k] = f"{name}: {value}"
    hp.write_text("\n".join(lines))


def write_old_hyperparameters(folder, args):
    """Hyperparameters.txt as the oldest version wrote it, for the arguments ``args``."""
    def text(v):
        return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    lines = [OLD_HEADER, "command: python main.py " + " ".join(QUICK + ["--epochs", "1"])]
    lines += [f"{k}: {text(v)}" for k, v in sorted(args.items())]
    (folder / "Hyperparameters.txt").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# 1. checkpoint.pt must be this folder's network
# ----------------------------------------------------------------------------------------------
def test_a_checkpoint_of_another_layers_list_is_refused(run, capsys):
    """A checkpoint.pt of a 64-32-10 run copied into this 64-16-10 folder (its arguments and
    tensors agree with each other, not with the folder)."""
    payload = load(run)
    other = argparse.Namespace(**dict(payload["args"], layersList=[64, 32, 10]))
    net = main.build_network(other)
    payload.update(args=vars(other), model=net.state_dict(), optW=net.optW.state_dict(),
                   optB=net.optB.state_dict())
    save(run, payload)
    assert_refused(run, capsys, "--layersList", "64 32 10", "64 16 10", "checkpoint.pt",
                   "Hyperparameters.txt")


@pytest.mark.parametrize("flag, value, shown, recorded", [
    ("archi", "conv", "conv", "fc"), ("convList", [8, 4, 1], "8 4 1", "64 32 1"),
    ("kernelSize", 3, "3", "5"), ("padding", 1, "1", "0"), ("Fpool", 3, "3", "2"),
    ("dataset", "mnist", "mnist", "digits")])
def test_each_network_flag_of_the_checkpoint_is_compared_with_the_folder(run, capsys, flag, value, shown, recorded):
    payload = load(run)
    payload["args"][flag] = value
    save(run, payload)
    assert_refused(run, capsys, f"--{flag} {shown} in checkpoint.pt", f"{recorded} in Hyperparameters.txt")


@pytest.mark.parametrize("hyperparameters", ["edited too", "without values"])
def test_checkpoint_tensors_that_do_not_fit_its_arguments_are_refused(run, capsys, hyperparameters):
    """The saved arguments say 64-32-10 (and so does Hyperparameters.txt, or it records no
    values), the tensors are still those of 64-16-10."""
    payload = load(run)
    payload["args"]["layersList"] = [64, 32, 10]
    save(run, payload)
    if hyperparameters == "edited too":
        set_effective(run, "layersList", "64 32 10")
    else:  # only the comment and the command: nothing to compare but the tensors
        (run / "Hyperparameters.txt").write_text(OLD_HEADER + "\ncommand: python main.py\n")
    assert_refused(run, capsys, "checkpoint.pt", "W.0.weight", "10x16", "10x32")


# ----------------------------------------------------------------------------------------------
# 2. results.csv: numbers, epochs 1..done, once each, in order
# ----------------------------------------------------------------------------------------------
COLUMN = {"test_error": 2, "train_loss": 3, "flips_fc1": 6, "alpha_fc0": 9}


def cell(column, text):
    def edit(lines):
        cells = lines[1].split(",")
        cells[COLUMN[column]] = text
        return [lines[0], ",".join(cells)] + lines[2:]
    return edit


def epoch(text):
    def edit(lines):
        return [lines[0], ",".join([text] + lines[1].split(",")[1:])] + lines[2:]
    return edit


def extra_row(epoch_text, column=None, text=None):
    """Add a row after epoch 1: a copy of it with epoch ``epoch_text`` (and one cell changed)."""
    def edit(lines):
        cells = [epoch_text] + lines[1].split(",")[1:]
        if column:
            cells[COLUMN[column]] = text
        return lines[:2] + [",".join(cells)] + lines[2:]
    return edit


CSV_DAMAGE = {
    "nan": (cell("test_error", "nan"), ["results.csv line 2 (epoch 1)", "test_error", "not a finite number"]),
    "NaN": (cell("test_error", "NaN"), ["line 2 (epoch 1)", "test_error"]),
    "empty cell": (cell("train_loss", ""), ["line 2 (epoch 1)", "train_loss", "empty"]),
    "text": (cell("flips_fc1", "many"), ["line 2 (epoch 1)", "flips_fc1", "'many'"]),
    "infinity": (cell("alpha_fc0", "inf"), ["line 2 (epoch 1)", "alpha_fc0", "'inf'"]),
    "duplicated epoch": (extra_row("1"), ["results.csv line 3", "epoch 1", "line 2"]),
    "missing epoch": (epoch("2"), ["results.csv", "no row for epoch 1", "after epoch 1"]),
    "epoch 0": (epoch("0"), ["results.csv line 2", "'0'", "positive integer"]),
    "negative epoch": (epoch("-1"), ["line 2", "'-1'", "positive integer"]),
    "fractional epoch": (epoch("1.5"), ["line 2", "'1.5'", "positive integer"]),
    "epoch a word": (epoch("first"), ["line 2", "'first'", "positive integer"]),
    "empty epoch": (epoch(""), ["line 2", "''", "positive integer"]),
    "out of order": (lambda lines: [lines[0], "2" + lines[1][1:], lines[1]],
                     ["results.csv line 3", "epoch 1", "after epoch 2"]),
    "renamed column": (lambda lines: [lines[0].replace("test_error", "test_err")] + lines[1:],
                       ["results.csv line 1", "'test_err'", "'test_error'"]),
    "short row": (lambda lines: [lines[0], lines[1].rsplit(",", 1)[0]] + lines[2:],
                  ["results.csv line 2", "11 cells", "12"]),
    "damage after the checkpoint's epoch": (extra_row("2", "test_error", "nan"),
                                            ["results.csv line 3 (epoch 2)", "test_error"]),
}


@pytest.mark.parametrize("damage", list(CSV_DAMAGE))
def test_a_damaged_results_csv_is_refused(run, capsys, damage):
    edit, fragments = CSV_DAMAGE[damage]
    csv = run / "results.csv"
    csv.write_text("\n".join(edit(csv.read_text().splitlines())) + "\n")
    assert_refused(run, capsys, *fragments)


def test_a_results_csv_that_is_not_utf8_is_refused(run, capsys):
    csv = run / "results.csv"
    data = csv.read_bytes()
    csv.write_bytes(data.replace(b"\n1,", b"\n1\xff,", 1))
    assert_refused(run, capsys, "results.csv", "line 2", "UTF-8")


def test_rows_after_the_checkpoints_epoch_are_dropped(run):
    """An epoch whose results.csv row was written but whose checkpoint was not (older versions
    wrote the two one after the other): its rows go, the resumed epochs replace them."""
    csv = run / "results.csv"
    lines = csv.read_text().splitlines()
    fake = [",".join([str(e)] + lines[1].split(",")[1:]) for e in (2, 3)]
    csv.write_text("\n".join(lines + fake) + "\n")
    assert resume(run) == 0
    rows = csv.read_text().splitlines()
    assert rows[:2] == lines and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert rows[2] != fake[0] and load(run)["epoch"] == 2


# ----------------------------------------------------------------------------------------------
# 3. Hyperparameters.txt that is not UTF-8
# ----------------------------------------------------------------------------------------------
def test_a_hyperparameters_txt_that_is_not_utf8_is_one_line(run, capsys):
    hp = run / "Hyperparameters.txt"
    data = hp.read_bytes()
    at = data.index(b"\nbatchSize: ")
    hp.write_bytes(data[:at + 1] + b"\xff" + data[at + 1:])
    line_no = data[:at].count(b"\n") + 2
    assert_refused(run, capsys, "Hyperparameters.txt", f"line {line_no}", "UTF-8", "0xff")


# ----------------------------------------------------------------------------------------------
# 4. Folders written by older versions
# ----------------------------------------------------------------------------------------------
def as_an_old_version_wrote_it(folder):
    """Rewrite ``folder``'s checkpoint arguments without the keys added later and its
    Hyperparameters.txt in the oldest format; returns the old arguments."""
    payload = load(folder)
    old = {k: v for k, v in payload["args"].items() if k not in NEWER_KEYS}
    payload["args"] = old
    save(folder, payload)
    write_old_hyperparameters(folder, old)
    return old


def test_a_folder_an_old_version_wrote_resumes_and_trains_one_more_epoch(run, capsys):
    as_an_old_version_wrote_it(run)
    before = (run / "Hyperparameters.txt").read_text()
    assert resume(run) == 0, capsys.readouterr().err
    ckpt = load(run)
    assert ckpt["epoch"] == 2 and ckpt["args"]["workers"] == 2 and ckpt["args"]["export"] is False
    assert [r.split(",")[0] for r in (run / "results.csv").read_text().splitlines()] == ["epoch", "1", "2"]
    after = (run / "Hyperparameters.txt").read_text()
    assert after.startswith(before) and after[len(before):].startswith("resumed after epoch 1: python main.py --resume ")


def test_an_old_folder_with_a_checkpoint_of_another_network_is_refused(run, capsys):
    """The oldest Hyperparameters.txt records every argument as the run used it: the network
    flags are compared with those lines."""
    old = as_an_old_version_wrote_it(run)
    payload = load(run)
    payload["args"] = dict(old, kernelSize=3)
    save(run, payload)
    assert_refused(run, capsys, "--kernelSize 3 in checkpoint.pt", "5 in Hyperparameters.txt")
