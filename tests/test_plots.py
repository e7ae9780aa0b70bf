"""plotFunctions.py on run folders it cannot use and on an output folder it cannot write (issue 17):
a run whose results.csv cannot be used is skipped with one line and the others are still plotted
and summarised; an output folder that cannot be written stops with one line and exit code 2.
In-process through ``plotFunctions.main`` (test_summary.py runs the script as a user does)."""

import os
import subprocess

import pandas as pd
import pytest

import plotFunctions
from test_summary import assert_png, date_folder, summary, write_run

FIX = "; repair it to include this run"


def plot(folder, cwd, capsys):
    """``python plotFunctions.py <folder>`` run in ``cwd``: (exit code, stderr lines)."""
    capsys.readouterr()
    back = os.getcwd()
    os.chdir(cwd)
    try:
        code = plotFunctions.main(["plotFunctions.py", str(folder)])
    finally:
        os.chdir(back)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.splitlines()


def edit_cell(run, line, column, text):
    """Put ``text`` in ``column`` of the data row on ``line`` of ``run``'s results.csv (line 1:
    the header), keeping every other cell as written."""
    csv = run / "results.csv"
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.loc[line - 2, column] = text
    df.to_csv(csv, index=False)
    return csv


def assert_plotted(date, names, runs_line):
    """The runs ``names`` (and only they) are drawn and summarised; ``runs_line``: the last line."""
    assert runs_line.startswith(f"plotted {len(names)} run(s) in 1 group(s)")
    assert summary(date).loc[1, "members"] == " ".join(f"{date.name}/{n}" for n in names)
    for name in names:
        assert_png(date / name / "errors.png")
    assert_png(date / "summary_errors.png")
    assert_png(date / "group_1_errors.png")


def good_runs(date, *numbers):
    for n in numbers:
        write_run(date / f"S-{n}", test=[10 + n, 9 + n, 8 + n], seed=n)


def test_a_non_numeric_cell_skips_that_run_with_one_line(tmp_path, capsys):
    date = date_folder(tmp_path)
    good_runs(date, 1, 3)
    write_run(date / "S-2", test=[30, 25, 20], seed=2)
    csv = edit_cell(date / "S-2", 3, "test_error", "abc")
    code, err = plot(date, date, capsys)
    assert code == 0
    assert err[0] == f"note: {date.name}/S-2 skipped: {csv}: test_error on line 3 is 'abc', not a number{FIX}"
    assert len(err) == 2
    assert_plotted(date, ["S-1", "S-3"], err[1])
    assert not (date / "S-2" / "errors.png").exists()
    with pytest.raises(ValueError, match="test_error on line 3 is 'abc', not a number"):
        plotFunctions.read_run(date / "S-2")  # what main.py's plot_run warns with


def test_a_results_csv_that_is_a_folder_skips_that_run_with_one_line(tmp_path, capsys):
    date = date_folder(tmp_path)
    good_runs(date, 1, 2)
    write_run(date / "S-3", test=[30, 25, 20], seed=3)
    csv = date / "S-3" / "results.csv"
    os.remove(csv)
    csv.mkdir()
    code, err = plot(date, date, capsys)
    assert code == 0
    assert err[0] == f"note: {date.name}/S-3 skipped: cannot read {csv}: Is a directory{FIX}"
    assert len(err) == 2
    assert_plotted(date, ["S-1", "S-2"], err[1])


def test_every_kind_of_unusable_results_is_one_line_each(tmp_path, capsys):
    date = date_folder(tmp_path)
    good_runs(date, 1, 8)
    for n in range(2, 8):
        write_run(date / f"S-{n}", test=[30, 25, 20], seed=n)
    runs = {n: date / f"S-{n}" for n in range(2, 8)}
    edit_cell(runs[2], 4, "alpha_fc1", "")                  # NaN where a number must be
    edit_cell(runs[3], 3, "epoch", "1")                     # epoch 1 twice
    (runs[4] / "results.csv").write_bytes(b"")              # empty
    (runs[5] / "results.csv").write_text("train_error,test_error\n5,6\n")  # no epoch column
    edit_cell(runs[6], 2, "epoch", "1.5")                   # an epoch that is not whole
    with open(runs[7] / "results.csv", "a") as f:           # a row with one cell too many
        f.write("4" + ",1" * 12 + "\n")
    code, err = plot(date, date, capsys)
    assert code == 0
    why = {2: "{}: alpha_fc1 on line 4 is empty or NaN", 3: "{}: epoch 1 appears more than once",
           4: "cannot read {}: No columns to parse from file", 5: "{} has no epoch column",
           6: "{}: epoch 1.5 is not a whole number",
           7: "cannot read {}: Error tokenizing data. C error: Expected 12 fields in line 5, saw 13"}
    assert err[:-1] == [f"note: {date.name}/S-{n} skipped: {why[n].format(runs[n] / 'results.csv')}{FIX}"
                        for n in range(2, 8)]
    assert_plotted(date, ["S-1", "S-8"], err[-1])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permission bits")
def test_an_unreadable_results_csv_skips_that_run_with_one_line(tmp_path, capsys):
    date = date_folder(tmp_path)
    good_runs(date, 1, 3)
    write_run(date / "S-2", test=[30, 25, 20], seed=2)
    csv = date / "S-2" / "results.csv"
    csv.chmod(0)
    code, err = plot(date, date, capsys)
    assert code == 0
    assert err[0] == f"note: {date.name}/S-2 skipped: cannot read {csv}: Permission denied{FIX}"
    assert_plotted(date, ["S-1", "S-3"], err[1])


def test_an_output_folder_that_cannot_be_written_stops_with_one_line(tmp_path, capsys):
    date = date_folder(tmp_path)
    good_runs(date, 1, 2)
    ro = tmp_path / "read-only"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
    elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)],
                        capture_output=True).returncode != 0:
        pytest.skip("root without the right to mount a read-only tmpfs cannot make a folder read-only")
    try:
        code, err = plot(date, ro, capsys)
        left = os.listdir(ro)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=True)
        ro.chmod(0o755)
    assert code == 2
    reason = "Permission denied" if os.geteuid() != 0 else "Read-only file system"
    assert err == [f"plotFunctions.py: error: cannot write {ro / 'summary_errors.png'} ({reason}); run it "
                   f"in a folder you can write to: cd <that folder> && python "
                   f"{os.path.abspath(plotFunctions.__file__)} {date}"]
    assert left == []
    for name in ("S-1", "S-2"):  # the run folders could be written: their figures are drawn
        assert_png(date / name / "errors.png")
