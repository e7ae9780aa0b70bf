"""plotFunctions.py as a user runs it in a date folder: runs grouped by their effective
hyperparameters, summary.csv / summary.md / the printed Markdown table with hand-computed means
and sample stds, one figure per group, running and interrupted runs, several folders at once;
bin_W_N runs' first-neuron errors (``train_error_single``, ``test_error_single``) in the figures
and the table, beside bin_W runs without them (in-process through ``plotFunctions.main``)."""

import csv
import fcntl
import math
import os
import shutil
import subprocess
import sys

import matplotlib.colors
import matplotlib.image
import matplotlib.pyplot as plt
import pandas as pd
import pytest

import plotFunctions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"
BASE = {"Fpool": "2", "Kmax": "8", "T": "30", "activationFun": "hardsigm", "archi": "fc",
        "batchSize": "32", "beta": "0.5", "check": "0", "dataDir": "None", "dataset": "digits",
        "device": "-1", "epochs": "3", "export": "None", "gamma": "0.001 0.001",
        "layersList": "64 512 10", "outDir": "runs", "resume": "None", "seed": "0", "workers": "0"}


def write_run(folder, test, train=None, seconds=None, given=None, resumed=(), old=False, single=None,
              **effective):
    """An S-<n> folder: results.csv with these per-epoch errors and seconds, and a
    Hyperparameters.txt whose effective values are BASE updated with ``effective``.  ``single``:
    the per-epoch test error of the first output neuron of each class (a bin_W_N run), written
    with ``train_error_single`` (half of it) right after ``test_error``; None: a bin_W run."""
    epochs = len(test)
    train = train if train is not None else [e / 2 for e in test]
    seconds = seconds if seconds is not None else [1.0] * epochs
    first = {} if single is None else {"train_error_single": [e / 2 for e in single], "test_error_single": single}
    df = pd.DataFrame({"train_error": train, "test_error": test, **first, "train_loss": [0.1] * epochs,
                       "test_loss": [0.2] * epochs, "flips_fc0": [5.0] * epochs,
                       "flips_fc1": [7.0] * epochs, "fliprate_fc0": [1.0] * epochs,
                       "fliprate_fc1": [0.5] * epochs, "alpha_fc0": [0.03] * epochs,
                       "alpha_fc1": [0.02] * epochs, "epoch_seconds": seconds},
                      index=pd.Index(range(1, epochs + 1), name="epoch"))
    os.makedirs(folder)
    df.to_csv(os.path.join(folder, "results.csv"))
    values = dict(BASE, **{k: str(v) for k, v in effective.items()})
    given = values if given is None else given
    lines = ["# Hyperparameters of this run (per-layer lists: output layer first).",
             "command: python main.py " + " ".join(f"--{k} {v}" for k, v in given.items())]
    lines += [f"resumed after epoch {n}: python main.py --resume {folder} {extra}".rstrip()
              for n, extra in resumed]
    if old:
        lines += [f"{k}: {v}" for k, v in sorted(values.items())]
    else:
        lines += ["", "[arguments as given]"] + [f"{k}: {v}" for k, v in given.items()]
        lines += ["", "[effective values]"] + [f"{k}: {v}" for k, v in sorted(values.items())]
    with open(os.path.join(folder, "Hyperparameters.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, "run.lock"), "w") as f:  # left behind by a finished run
        f.write("12345\n")


def date_folder(tmp_path, date="2026-12-01"):
    date = tmp_path / "runs" / "DATA-0-fc-digits" / date
    date.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "plotFunctions.py"), date / "plotFunctions.py")
    return date


def run_script(script, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(script)] + [str(a) for a in args], cwd=cwd,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    return r


def summary(folder):
    return pd.read_csv(folder / "summary.csv").set_index("group")


def assert_png(path):
    assert path.read_bytes()[:8] == PNG
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_two_groups_of_three_runs_give_hand_computed_means_and_stds(tmp_path):
    date = date_folder(tmp_path)
    # group A (T=30, beta=0.5) is S-1, S-3, S-5; group B (T=20, beta=0.2) is S-2, S-4, S-6
    write_run(date / "S-1", test=[20, 9, 10], train=[9, 6, 5], seconds=[1, 2, 3], seed=1)
    write_run(date / "S-3", test=[11, 15, 12], train=[9, 7, 6], seconds=[2, 2, 2], seed=2)
    write_run(date / "S-5", test=[30, 20, 14], train=[12, 11, 10], seconds=[4, 4, 4], seed=3)
    b = {"T": 20, "beta": 0.2}
    write_run(date / "S-2", test=[30, 20], seconds=[10, 10], epochs=2, **b)
    write_run(date / "S-4", test=[40, 30, 25, 20], seconds=[1] * 4, epochs=4, seed=5, **b)
    write_run(date / "S-6", test=[40, 24, 26, 26], seconds=[1] * 4, epochs=4, seed=6, **b)
    r = run_script("plotFunctions.py", cwd=date)

    s = summary(date)
    assert list(s.index) == [1, 2]
    assert s.loc[1, "arguments"] == "T=30 beta=0.5" and s.loc[2, "arguments"] == "T=20 beta=0.2"
    assert s.loc[1, "members"] == "S-1 S-3 S-5" and s.loc[2, "members"] == "S-2 S-4 S-6"
    assert s["runs"].tolist() == [3, 3]
    assert s["epochs_min"].tolist() == [3, 2] and s["epochs_max"].tolist() == [3, 4]
    # group A: final test 10, 12, 14; best 9 (epoch 2), 11 (1), 14 (3); final train 5, 6, 10
    assert s.loc[1, "final_test_error_mean"] == pytest.approx(12.0)
    assert s.loc[1, "final_test_error_std"] == pytest.approx(2.0)
    m = (9 + 11 + 14) / 3
    assert s.loc[1, "best_test_error_mean"] == pytest.approx(m)
    best_std = math.sqrt(((9 - m) ** 2 + (11 - m) ** 2 + (14 - m) ** 2) / 2)
    assert s.loc[1, "best_test_error_std"] == pytest.approx(best_std)
    assert s.loc[1, "best_epochs"] == "2 1 3"
    assert s.loc[1, "final_train_error_mean"] == pytest.approx(7.0)
    assert s.loc[1, "final_train_error_std"] == pytest.approx(math.sqrt((4 + 1 + 9) / 2))
    assert s.loc[1, "seconds_per_epoch_mean"] == pytest.approx(24 / 9)
    # group B: final test 20, 20, 26 -> 22 +/- sqrt(12); best 20 (2), 20 (4), 24 (2)
    assert s.loc[2, "final_test_error_mean"] == pytest.approx(22.0)
    assert s.loc[2, "final_test_error_std"] == pytest.approx(math.sqrt(12))
    assert s.loc[2, "best_test_error_mean"] == pytest.approx(64 / 3)
    assert s.loc[2, "best_epochs"] == "2 4 2"
    assert s.loc[2, "seconds_per_epoch_mean"] == pytest.approx(28 / 10)  # every epoch, not per run
    assert s["running"].tolist() == [0, 0] and s["interrupted"].tolist() == [0, 0]
    assert list(s.reset_index().columns) == plotFunctions.COLUMNS

    md = (date / "summary.md").read_text()
    assert r.stdout == md
    rows = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert rows[0] == ("| 1 | T=30 beta=0.5 | 3 | 3 | 12.00 +/- 2.00 |  | 11.33 +/- 2.52 | 2 1 3 "
                       "| 7.00 +/- 2.65 | 2.67 | done |")  # no first-neuron error: an empty cell
    assert rows[1].startswith("| 2 | T=20 beta=0.2 | 3 | 2-4 | 22.00 +/- 3.46 |  | 21.33 +/- 2.31 | 2 4 2 |")
    assert "`*`" not in md
    for n in (1, 2):
        assert_png(date / f"group_{n}_errors.png")
    for name in ("errors", "losses", "fliprates", "alpha"):
        assert_png(date / f"summary_{name}.png")
        assert_png(date / "S-6" / f"{name}.png")
    assert not list(date.glob(".*.tmp"))


def test_a_default_typed_or_left_out_is_one_group(tmp_path):
    date = date_folder(tmp_path)
    write_run(date / "S-1", test=[10, 10, 10], given={"archi": "fc", "T": "30", "beta": "0.5"})
    write_run(date / "S-2", test=[20, 20, 20], given={"archi": "fc"})
    write_run(date / "S-3", test=[40, 40, 40], given={"archi": "fc", "Kmax": "4"}, Kmax=4)
    run_script("plotFunctions.py", cwd=date)
    s = summary(date)
    assert s["members"].tolist() == ["S-1 S-2", "S-3"]
    assert s["arguments"].tolist() == ["Kmax=8", "Kmax=4"]
    assert s["final_test_error_mean"].tolist() == pytest.approx([15.0, 40.0])


def test_runs_differing_only_in_seed_outDir_epochs_and_the_like_are_one_group(tmp_path):
    date = date_folder(tmp_path)
    write_run(date / "S-1", test=[10, 8], epochs=2)
    write_run(date / "S-2", test=[12, 10, 9], seed=7, outDir="elsewhere", dataDir="/data", device=0,
              workers=4, check=1, export="net.pt", resume="runs/x/S-1")
    write_run(date / "S-3", test=[14, 11, 10], batchSize=64)  # a different group
    run_script("plotFunctions.py", cwd=date)
    s = summary(date)
    assert s["members"].tolist() == ["S-1 S-2", "S-3"]
    assert s["arguments"].tolist() == ["batchSize=32", "batchSize=64"]
    assert s.loc[1, "final_test_error_mean"] == pytest.approx(8.5)
    assert s.loc[1, "final_test_error_std"] == pytest.approx(math.sqrt(0.5))
    assert (s.loc[1, "epochs_min"], s.loc[1, "epochs_max"]) == (2, 3)

    assert (date / "group_2_errors.png").exists()
    shutil.rmtree(date / "S-3")
    out = run_script("plotFunctions.py", cwd=date).stdout
    assert summary(date)["arguments"].tolist() == ["all runs"]
    assert (date / "group_1_errors.png").exists() and not (date / "group_2_errors.png").exists()
    assert "| 1 | all runs | 2 | 2-3 | 8.50 +/- 0.71 |" in out


def test_hyperparameters_parser_new_and_old_format(tmp_path):
    write_run(tmp_path / "new", test=[5], given={"archi": "fc", "seed": "0"}, resumed=[(3, "--epochs 9")])
    hp = plotFunctions.read_hyperparameters(tmp_path / "new")
    assert hp["command"] == "python main.py --archi fc --seed 0"
    assert hp["resumed"] == [(3, f"python main.py --resume {tmp_path / 'new'} --epochs 9")]
    assert hp["given"] == {"archi": "fc", "seed": "0"}
    assert hp["effective"] == BASE
    assert plotFunctions.epochs_asked(hp) == 9

    write_run(tmp_path / "old", test=[5], old=True, resumed=[(1, "")], T=10)
    hp = plotFunctions.read_hyperparameters(tmp_path / "old")
    assert hp["effective"] == dict(BASE, T="10") and hp["given"] == {}
    assert hp["resumed"][0][0] == 1 and hp["command"].startswith("python main.py --Fpool 2")
    assert plotFunctions.epochs_asked(hp) == 3
    assert plotFunctions.read_hyperparameters(tmp_path) is None


def test_old_format_runs_are_grouped_with_new_ones_of_equal_values(tmp_path):
    date = date_folder(tmp_path)
    write_run(date / "S-1", test=[10, 9, 8], old=True)
    write_run(date / "S-2", test=[10, 9, 6])
    write_run(date / "S-3", test=[10, 9, 30], old=True, T=10)
    run_script("plotFunctions.py", cwd=date)
    s = summary(date)
    assert s["members"].tolist() == ["S-1 S-2", "S-3"] and s["arguments"].tolist() == ["T=30", "T=10"]
    assert s["final_test_error_mean"].tolist() == pytest.approx([7.0, 30.0])


def test_running_and_interrupted_runs_are_marked_and_counted_with_their_epochs(tmp_path):
    date = date_folder(tmp_path)
    write_run(date / "S-1", test=[10, 9, 8])                   # done: 3 of 3 epochs
    write_run(date / "S-2", test=[20, 16])                     # running: 2 of 3, lock held below
    write_run(date / "S-3", test=[30])                         # interrupted: 1 of 3, lock free
    write_run(date / "S-4", test=[12, 11, 10], epochs=2, resumed=[(2, "--epochs 5")])  # 3 of 5
    write_run(date / "S-5", test=[11, 10])                     # interrupted: no run.lock at all
    os.remove(date / "S-5" / "run.lock")
    holder = open(date / "S-2" / "run.lock", "rb")
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # flock locks belong to the open file description: a second open in this process conflicts
        with open(date / "S-2" / "run.lock", "rb") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert plotFunctions.is_running(date / "S-2") and not plotFunctions.is_running(date / "S-3")
        out = run_script("plotFunctions.py", cwd=date).stdout
        s = summary(date)
    finally:
        holder.close()
    assert not plotFunctions.is_running(date / "S-2")  # and is_running released its own try
    assert s.loc[1, "running"] == 1 and s.loc[1, "interrupted"] == 3 and s.loc[1, "runs"] == 5
    assert (s.loc[1, "epochs_min"], s.loc[1, "epochs_max"]) == (1, 3)
    assert s.loc[1, "final_test_error_mean"] == pytest.approx((8 + 16 + 30 + 10 + 10) / 5)
    assert "| 1 | all runs | 5 | 1-3* |" in out and "1 running, 3 interrupted |" in out
    assert "`*` the group holds runs still running or interrupted" in out
    status = {line.split(" | ")[0][2:]: line.split(" | ")[3] for line in out.splitlines()
              if line.startswith("| S-")}
    assert status == {"S-1": "done", "S-2": "running", "S-3": "interrupted", "S-4": "interrupted",
                      "S-5": "interrupted"}

    out = run_script("plotFunctions.py", cwd=date).stdout  # lock released: S-2 is interrupted now
    assert summary(date).loc[1, "running"] == 0 and summary(date).loc[1, "interrupted"] == 4
    assert "4 interrupted |" in out


def test_several_folders_go_into_one_table_in_the_current_folder(tmp_path):
    day1, day2, day3 = (date_folder(tmp_path, d) for d in ("2026-12-01", "2026-12-02", "2026-12-03"))
    write_run(day1 / "S-1", test=[10, 10, 10])
    write_run(day1 / "S-2", test=[12, 12, 12], seed=1)
    write_run(day2 / "S-1", test=[14, 14, 14], seed=2)
    write_run(day3 / "S-5", test=[16, 16, 16], seed=3)
    write_run(day3 / "S-6", test=[99, 99, 99], seed=4)  # not asked for: only S-5 of that day is
    work = tmp_path / "work"
    work.mkdir()
    out = run_script(day1 / "plotFunctions.py", day1, day2, day3 / "S-5", cwd=work).stdout
    s = summary(work)
    assert s.loc[1, "members"] == "2026-12-01/S-1 2026-12-01/S-2 2026-12-02/S-1 2026-12-03/S-5"
    assert s.loc[1, "runs"] == 4 and s.loc[1, "arguments"] == "all runs"
    assert s.loc[1, "final_test_error_mean"] == pytest.approx(13.0)
    assert s.loc[1, "final_test_error_std"] == pytest.approx(math.sqrt((9 + 1 + 1 + 9) / 3))
    assert "| 2026-12-02/S-1 | 1 | 3 | done |" in out
    assert (work / "summary.md").read_text() == out
    assert_png(work / "group_1_errors.png")
    assert_png(work / "summary_errors.png")
    for day in (day1, day2, day3):
        assert not (day / "summary.csv").exists() and not list(day.glob("*.png"))

    out = run_script(day1 / "plotFunctions.py", day2, cwd=work).stdout  # a single folder
    assert summary(work).loc[1, "members"] == "2026-12-02/S-1" and "| 2026-12-02/S-1 |" in out


def test_a_group_of_one_run_has_empty_std_cells(tmp_path):
    date = date_folder(tmp_path)
    write_run(date / "S-1", test=[10, 9], epochs=2)
    write_run(date / "S-2", test=[20, 14], epochs=2)
    write_run(date / "S-3", test=[30, 25], train=[20, 15], epochs=2, beta=0.9)
    out = run_script("plotFunctions.py", cwd=date).stdout
    with open(date / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["final_test_error_std"]) == pytest.approx(math.sqrt(12.5))  # 9 and 14
    assert rows[1]["runs"] == "1" and float(rows[1]["final_test_error_mean"]) == 25.0
    for col in ("final_test_error_std", "best_test_error_std", "final_train_error_std"):
        assert rows[1][col] == ""
    assert "| 2 | beta=0.9 | 1 | 2 | 25.00 |  | 25.00 | 2 | 15.00 | 1.00 | done |" in out


def test_runs_without_results_are_skipped_with_a_note(tmp_path):
    date = date_folder(tmp_path)
    write_run(date / "S-1", test=[10, 9, 8])
    os.makedirs(date / "S-2")  # started, no results.csv yet
    write_run(date / "S-3", test=[50])
    pd.read_csv(date / "S-3" / "results.csv", index_col="epoch").iloc[:0].to_csv(date / "S-3" / "results.csv")
    r = run_script("plotFunctions.py", cwd=date)
    assert "S-2: no results.csv" in r.stderr and "S-3: no results.csv" in r.stderr
    s = summary(date)
    assert s.loc[1, "runs"] == 1 and s.loc[1, "members"] == "S-1"
    assert s.loc[1, "final_test_error_mean"] == 8.0


BIN_W_N = {"binary_settings": "bin_W_N", "activationFun": "heaviside", "rho_threshold": "0.5",
           "gamma_neur": "0.5"}


def plot_in_process(date, monkeypatch, capsys, save=()):
    """``python plotFunctions.py`` in ``date``, in this process: (exit code, stdout, stderr lines,
    the labelled lines of every figure: ``{file name: [(label, colour, linestyle)]}``, colours as
    ``C<i>`` where they are colour <i> of matplotlib's cycle).  Only the figures named in ``save``
    are written (saving is what costs time)."""
    drawn, finish = {}, plotFunctions._finish
    cycle = {matplotlib.colors.to_hex(f"C{i}"): f"C{i}" for i in range(10)}

    def to_hex(colour):
        return cycle.get(matplotlib.colors.to_hex(colour), colour)

    def recording(ax, ylabel, name, path, log=False):
        where = os.path.relpath(path, date)
        drawn[where] = [(line.get_label(), to_hex(line.get_color()), line.get_linestyle())
                        for line in ax.get_lines() if not line.get_label().startswith("_")]
        return finish(ax, ylabel, name, path, log) if where in save else plt.close(ax.figure)

    monkeypatch.setattr(plotFunctions, "_finish", recording)
    monkeypatch.setattr(plotFunctions, "__file__", str(date / "plotFunctions.py"))
    capsys.readouterr()
    code = plotFunctions.main(["plotFunctions.py"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err.splitlines(), drawn


def test_first_neuron_errors_are_drawn_dashed_and_bin_W_runs_unchanged(tmp_path, monkeypatch, capsys):
    date = date_folder(tmp_path)
    write_run(date / "S-1", test=[30, 20, 10], single=[40, 30, 20], **BIN_W_N)
    write_run(date / "S-2", test=[32, 22, 12], single=[44, 34, 24], seed=1, **BIN_W_N)
    write_run(date / "S-3", test=[31, 21, 11], binary_settings="bin_W")
    saved = ("S-1/errors.png", "summary_errors.png", "group_1_errors.png")
    code, _, _, drawn = plot_in_process(date, monkeypatch, capsys, save=saved)
    assert code == 0
    assert drawn["S-1/errors.png"] == [("train error", "C0", "-"), ("test error", "C1", "-"),
                                       ("train (first neuron)", "C0", "--"), ("test (first neuron)", "C1", "--")]
    assert drawn["S-3/errors.png"] == [("train error", "C0", "-"), ("test error", "C1", "-")]
    assert drawn["S-3/losses.png"] == [("train loss", "C0", "-"), ("test loss", "C1", "-")]
    assert drawn["summary_errors.png"] == [("test error (mean of 3)", "C0", "-"),
                                           ("test (first neuron) (mean of 2)", "C0", "--"),
                                           ("train error (mean of 3)", "C1", "-"),
                                           ("train (first neuron) (mean of 2)", "C1", "--")]
    assert drawn["group_1_errors.png"] == [("test error (mean of 2)", "C0", "-"),
                                           ("test (first neuron) (mean of 2)", "C0", "--"),
                                           ("train error (mean of 2)", "C1", "-"),
                                           ("train (first neuron) (mean of 2)", "C1", "--")]
    assert drawn["group_2_errors.png"] == [("test error (mean of 1)", "C0", "-"),
                                           ("train error (mean of 1)", "C1", "-")]
    for png in saved:
        assert_png(date / png)


def test_the_table_carries_the_final_first_neuron_test_error(tmp_path, monkeypatch, capsys):
    date = date_folder(tmp_path)
    # group 1 (bin_W_N): final first-neuron test errors 20, 24, 25 -> 23 +/- sqrt(7)
    write_run(date / "S-1", test=[30, 12], single=[40, 20], epochs=2, **BIN_W_N)
    write_run(date / "S-2", test=[30, 14], single=[41, 24], epochs=2, seed=1, **BIN_W_N)
    write_run(date / "S-3", test=[30, 16], single=[42, 25], epochs=2, seed=2, **BIN_W_N)
    # group 2 (bin_W): no first-neuron columns, every number as before
    write_run(date / "S-4", test=[30, 10], epochs=2, binary_settings="bin_W")
    write_run(date / "S-5", test=[30, 14], epochs=2, seed=3, binary_settings="bin_W")
    code, out, _, _ = plot_in_process(date, monkeypatch, capsys)
    assert code == 0
    s = summary(date)
    assert list(s.reset_index().columns) == plotFunctions.COLUMNS
    assert plotFunctions.COLUMNS[5:9] == ["final_test_error_mean", "final_test_error_std",
                                          "final_test_error_single_mean", "final_test_error_single_std"]
    assert s.loc[1, "final_test_error_single_mean"] == pytest.approx(23.0)
    assert s.loc[1, "final_test_error_single_std"] == pytest.approx(math.sqrt(7))
    assert s.loc[1, "final_test_error_mean"] == pytest.approx(14.0)
    with open(date / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["final_test_error_single_mean"] == "" and rows[1]["final_test_error_single_std"] == ""
    assert float(rows[1]["final_test_error_mean"]) == 12.0
    assert float(rows[1]["final_test_error_std"]) == pytest.approx(math.sqrt(8))
    lines = out.splitlines()
    assert lines[0] == ("| group | arguments | runs | epochs | final test error (%) | final test error, first "
                        "neuron (%) | best test error (%) | best at epoch | final train error (%) | s / epoch "
                        "| status |")
    assert lines[2] == ("| 1 | activationFun=heaviside binary_settings=bin_W_N gamma_neur=0.5 rho_threshold=0.5 "
                        "| 3 | 2 | 14.00 +/- 2.00 | 23.00 +/- 2.65 | 14.00 +/- 2.00 | 2 2 2 | 7.00 +/- 1.00 "
                        "| 1.00 | done |")
    assert lines[3] == ("| 2 | activationFun=hardsigm binary_settings=bin_W gamma_neur=? rho_threshold=? | 2 | 2 "
                        "| 12.00 +/- 2.83 |  | 12.00 +/- 2.83 | 2 2 | 6.00 +/- 1.41 | 1.00 | done |")
    assert (date / "summary.md").read_text() == out


def test_a_group_mixing_runs_with_and_without_first_neuron_errors(tmp_path, monkeypatch, capsys):
    date = date_folder(tmp_path)
    write_run(date / "S-1", test=[30, 20, 10], single=[40, 30, 10])
    write_run(date / "S-2", test=[30, 20, 12], seed=1)  # written without the columns
    write_run(date / "S-3", test=[30, 20, 14], single=[40, 30, 14], seed=2)
    write_run(date / "S-4", test=[30, 20, 14], single=[40, 30, 14], seed=3)
    df = pd.read_csv(date / "S-4" / "results.csv", dtype=str)
    df.loc[1, "test_error_single"] = "abc"  # a cell of a first-neuron column that is text
    df.to_csv(date / "S-4" / "results.csv", index=False)
    code, out, err, drawn = plot_in_process(date, monkeypatch, capsys, save=("group_1_errors.png",))
    assert code == 0
    assert err[0] == (f"note: S-4 skipped: {date / 'S-4' / 'results.csv'}: test_error_single on line 3 is "
                      f"'abc', not a number; repair it to include this run")
    assert len(err) == 2 and err[1].startswith("plotted 3 run(s) in 1 group(s)")
    s = summary(date)
    assert s.loc[1, "members"] == "S-1 S-2 S-3"
    assert s.loc[1, "final_test_error_single_mean"] == pytest.approx(12.0)  # S-1 and S-3 only
    assert s.loc[1, "final_test_error_single_std"] == pytest.approx(math.sqrt(8))
    assert s.loc[1, "final_test_error_mean"] == pytest.approx(12.0)
    assert s.loc[1, "final_test_error_std"] == pytest.approx(2.0)
    assert "| 1 | all runs | 3 | 3 | 12.00 +/- 2.00 | 12.00 +/- 2.83 (2 of 3 runs) | 12.00 +/- 2.00 |" in out
    assert drawn["group_1_errors.png"] == [("test error (mean of 3)", "C0", "-"),
                                           ("test (first neuron) (mean of 2)", "C0", "--"),
                                           ("train error (mean of 3)", "C1", "-"),
                                           ("train (first neuron) (mean of 2)", "C1", "--")]
    assert drawn["S-2/errors.png"] == [("train error", "C0", "-"), ("test error", "C1", "-")]
    assert_png(date / "group_1_errors.png")
    assert "S-4/errors.png" not in drawn
