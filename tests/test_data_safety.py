"""Nothing a run saved is ever deleted or overwritten: a process removes only a run folder it
created itself and that holds no finished epoch.  Every way a resume or a ``--check`` of an
existing run can end leaves that run's files byte for byte as they were; a new run folder is
made (and cleaned up) one way for training and ``--check``; ``run.lock`` is never followed or
written; an epoch counts as done the moment its files are in place, whatever signal comes.

The runs are in-process (``main.main``) on scikit-learn's digits, about a second each; the
file-size limit and the real full disk need a process of their own (and root, for the tmpfs).
"""

import errno
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import main
import Tools_fc
from Network_fc import Network_fc
from binary_ep import distributed, files, gdu_check, loops
from binary_ep.vocabulary import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ("--device -1 --archi fc --dataset digits --layersList 64 16 10 --T 4 --Kmax 2 --beta 0.5 "
         "--gamma 0.01 0.01 --gradThreshold 1e-6 1e-6 --lrBias 0.05 0.1 --batchSize 32 "
         "--test_batchSize 200 --trainSubset 64 --testSubset 64 --seed 1").split()


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("EP_NO_PROGRESS", "1")


def hashes(folder):
    """{path relative to ``folder``: sha256 of its bytes (or the target of a link)} of every
    file below ``folder``, the lock file and hidden files included."""
    out = {}
    for top, dirs, names in os.walk(folder):
        for name in dirs + names:
            p = os.path.join(top, name)
            rel = os.path.relpath(p, folder)
            if os.path.islink(p):
                out[rel] = "link -> " + os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            elif not os.path.isdir(p):
                out[rel] = "special"
    return out


def only_line(err):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) >= 1 and "Traceback" not in err, err
    return lines[-1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run folder with epoch 1 finished (to be copied, never changed)."""
    out = tmp_path_factory.mktemp("finished")
    os.environ["EP_NO_PROGRESS"] = "1"
    assert main.main(QUICK + ["--epochs", "1", "--outDir", str(out)]) == 0
    (run,) = out.glob("DATA-0-fc-digits/*/S-1")
    return run


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run, in a date folder of its own: ``(S-1, its hashes)``."""
    copy = tmp_path / "DATA-0-fc-digits" / "2026-01-01" / "S-1"
    shutil.copytree(finished, copy)
    return copy, hashes(copy)


# ----------------------------------------------------------------------------------------------
# every exit path of a resume and of a --check leaves the run's files as they were
# ----------------------------------------------------------------------------------------------
def _raise(error):
    def fail(*args, **kwargs):
        raise error
    return fail


def _signal(signum, then):
    def send(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return then(*args, **kwargs)
    return send


def _full_disk(path, write):
    raise files.WriteFailed(os.path.dirname(path), os.path.basename(path), "no space left on the device")


def _diverging(real_update):
    def update(net):  # the step, then a NaN in a bias: the batch's health check stops the run
        flips = real_update(net)
        with torch.no_grad():
            net.biases()[1][3] = float("nan")
        return flips
    return update


# (exit code, where to break in, how) for each expected exception main.py maps to an exit code
PATHS = {
    "data error (2)": (2, (loops, "train_epoch"), lambda real: _raise(UserError("bad data"))),
    "diverged (3)": (3, (Network_fc, "updateWeights"), _diverging),
    "full disk (4)": (4, (files, "atomic_write"), lambda real: _full_disk),
    "other rank lost (6)": (6, (distributed.Replicas, "check_replicas"),
                            lambda real: _raise(distributed.StopAll("rank 1 was lost; rank 0 stops too"))),
    "SIGINT (130)": (130, (Tools_fc, "train_bin"), lambda real: _signal(signal.SIGINT, real)),
    "SIGTERM (143)": (143, (Tools_fc, "train_bin"), lambda real: _signal(signal.SIGTERM, real)),
}


@pytest.mark.parametrize("how", sorted(PATHS))
def test_every_way_a_resume_ends_changes_nothing_in_the_run(how, run, monkeypatch, capsys):
    folder, before = run
    code, (owner, name), patch = PATHS[how]
    monkeypatch.setattr(owner, name, patch(getattr(owner, name)))
    capsys.readouterr()
    assert main.main(["--resume", str(folder), "--epochs", "3"]) == code
    line = only_line(capsys.readouterr().err)
    assert f"nothing in {folder} was changed" in line, line
    assert hashes(folder) == before
    monkeypatch.undo()  # the cause removed: the run goes on from where it was
    assert main.main(["--resume", str(folder), "--epochs", "2"]) == 0
    assert torch.load(folder / "checkpoint.pt", weights_only=False)["epoch"] == 2


def test_a_resume_that_is_refused_or_has_nothing_to_do_changes_nothing(run, capsys):
    folder, before = run
    assert main.main(["--resume", str(folder), "--epochs", "1"]) == 0  # already done
    holder = open(folder / "run.lock", "rb")  # another writer
    try:
        import fcntl
        fcntl.flock(holder, fcntl.LOCK_EX)
        capsys.readouterr()
        assert main.main(["--resume", str(folder), "--epochs", "2"]) == 5
        assert f"is in use by process {os.getpid()}" in only_line(capsys.readouterr().err)
        assert main.main(["--resume", str(folder), "--export"]) == 5
    finally:
        holder.close()
    with pytest.raises(SystemExit) as e:  # a conflicting flag: argparse's exit
        main.main(["--resume", str(folder), "--epochs", "2", "--T", "5"])
    assert e.value.code == 2
    assert hashes(folder) == before


@pytest.mark.parametrize("how", ["full disk (4)", "SIGINT (130)", "data error (2)", "done (0)"])
def test_every_way_a_check_of_a_run_ends_changes_nothing_in_it(how, run, monkeypatch, capsys):
    folder, before = run
    date = folder.parent
    code = int(how.split("(")[1][:-1])
    if how.startswith("full disk"):
        monkeypatch.setattr(gdu_check, "plot_gdu", lambda df, png, title="": _full_disk(png, None))
    elif how.startswith("SIGINT"):
        monkeypatch.setattr(gdu_check, "gdu_rows", _signal(signal.SIGINT, gdu_check.gdu_rows))
    elif how.startswith("data error"):
        monkeypatch.setattr(gdu_check, "free_trajectory_tail", _raise(UserError("bad data")))
    capsys.readouterr()
    assert main.main(["--resume", str(folder), "--check", "gdu"]) == code
    assert hashes(folder) == before
    made = sorted(p.name for p in date.iterdir() if p.is_dir())
    # the check's folder is made beside the run; a failed check leaves none behind
    assert made == (["S-1", "S-2"] if code == 0 else ["S-1"]), made
    if code == 0:
        assert {"gdu.csv", "gdu.png", "Hyperparameters.txt"} <= set(os.listdir(date / "S-2"))
    else:
        assert f"nothing in {folder} was changed" in only_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------
# the disk and the file-size limit during a resume
# ----------------------------------------------------------------------------------------------
def test_a_resume_under_a_file_size_limit_changes_nothing(run, tmp_path):
    """``ulimit -f`` below the checkpoint's size: the first save fails with EFBIG (not SIGXFSZ)."""
    folder, before = run
    size = os.path.getsize(folder / "checkpoint.pt")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
    env = dict(os.environ, EP_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "main.py", "--resume", str(folder), "--epochs", "2"], cwd=ROOT,
                       env=env, capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert r.returncode == 4, r.stderr
    line = only_line(r.stderr)
    assert "file-size limit" in line and f"nothing in {folder} was changed" in line, line
    assert hashes(folder) == before


def test_a_resume_onto_a_full_disk_changes_nothing(finished, tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"this machine cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        folder = disk / "S-1"
        shutil.copytree(finished, folder)
        before = hashes(folder)
        with open(disk / "filler", "wb", buffering=0) as f:  # fill the disk to the last block
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        capsys.readouterr()
        assert main.main(["--resume", str(folder), "--epochs", "2"]) == 4
        line = only_line(capsys.readouterr().err)
        assert "no space left on the device" in line and f"nothing in {folder} was changed" in line, line
        assert hashes(folder) == before
        os.remove(disk / "filler")
        assert main.main(["--resume", str(folder), "--epochs", "2"]) == 0
        assert torch.load(folder / "checkpoint.pt", weights_only=False)["epoch"] == 2
        with open(folder / "Hyperparameters.txt") as f:  # the resume's note landed with epoch 2
            assert sum(l.startswith("resumed after epoch 1: ") for l in f) == 1
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_the_resume_note_lands_with_the_first_epoch_it_saves(run, monkeypatch, capsys):
    """A note that cannot be written stops the resume at once (before an epoch of work)."""
    folder, before = run
    real = files._temporary

    def refused(path, write):
        if path.endswith("Hyperparameters.txt"):
            raise files.WriteFailed(os.path.dirname(path), "Hyperparameters.txt", "permission denied")
        return real(path, write)
    monkeypatch.setattr(files, "_temporary", refused)
    trained = []
    monkeypatch.setattr(Tools_fc, "train_bin", lambda *a: trained.append(1))
    capsys.readouterr()
    assert main.main(["--resume", str(folder), "--epochs", "2"]) == 4
    line = only_line(capsys.readouterr().err)
    assert "cannot write Hyperparameters.txt" in line and f"nothing in {folder} was changed" in line
    assert trained == [] and hashes(folder) == before


# ----------------------------------------------------------------------------------------------
# run.lock: never followed, never written, refused when it is not a regular file
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["symlink", "folder", "fifo"])
def test_a_run_lock_that_is_not_a_regular_file_is_refused_and_never_followed(kind, run, tmp_path, capsys):
    folder, _ = run
    lock = folder / "run.lock"
    os.remove(lock)
    victim = tmp_path / "someone_elses_file"
    victim.write_text("precious\n")
    {"symlink": lambda: os.symlink(victim, lock), "folder": lambda: os.mkdir(lock),
     "fifo": lambda: os.mkfifo(lock)}[kind]()
    before = hashes(folder)
    capsys.readouterr()
    assert main.main(["--resume", str(folder), "--epochs", "2"]) == 5
    line = only_line(capsys.readouterr().err)
    what = {"symlink": "a symbolic link", "folder": "a folder", "fifo": "a named pipe"}[kind]
    assert line == (f"main.py: error: {lock} is {what}, not the run's lock file; nothing in {folder} "
                    f"was changed; if no run uses this folder, remove it and try again"), line
    assert hashes(folder) == before and victim.read_text() == "precious\n"


def test_a_read_only_run_lock_still_locks_and_stays_as_it_is(run, capsys):
    folder, _ = run
    os.chmod(folder / "run.lock", 0o444)
    before = (folder / "run.lock").read_bytes(), os.stat(folder / "run.lock").st_mode
    assert main.main(["--resume", str(folder), "--epochs", "2"]) == 0
    assert ((folder / "run.lock").read_bytes(), os.stat(folder / "run.lock").st_mode) == before


# ----------------------------------------------------------------------------------------------
# one way to make a run folder; only what this process made, with no finished epoch, is removed
# ----------------------------------------------------------------------------------------------
def test_a_check_that_cannot_write_its_results_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gdu_check, "plot_gdu", lambda df, png, title="": _full_disk(png, None))
    capsys.readouterr()
    assert main.main(QUICK + ["--check", "gdu", "--outDir", str(tmp_path)]) == 4
    line = only_line(capsys.readouterr().err)
    assert "cannot write gdu.png" in line and "nothing was saved" in line, line
    assert list(tmp_path.glob("DATA-0-fc-digits/*/S-*")) == []


def test_a_check_of_a_moved_run_goes_beside_it(finished, tmp_path, capsys):
    """The run's recorded --outDir no longer exists: the check's folder goes beside the run."""
    moved = tmp_path / "elsewhere" / "S-1"
    shutil.copytree(finished, moved)
    recorded = torch.load(moved / "checkpoint.pt", weights_only=False)["args"]["outDir"]
    shutil.rmtree(recorded)  # (a module fixture: the last test to use it)
    assert main.main(["--resume", str(moved), "--check", "gdu"]) == 0
    assert sorted(os.listdir(moved.parent)) == ["S-1", "S-2", "plotFunctions.py"]
    assert (moved.parent / "S-2" / "gdu.csv").exists() and not os.path.exists(recorded)


def test_a_lost_rank_in_the_first_epoch_removes_the_new_folder_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(distributed.Replicas, "check_replicas",
                        _raise(distributed.StopAll("rank 1 was lost (its process ended); rank 0 stops too")))
    capsys.readouterr()
    assert main.main(QUICK + ["--epochs", "2", "--outDir", str(tmp_path)]) == 6
    line = only_line(capsys.readouterr().err)
    assert line.startswith("main.py: error: rank 1 was lost") and "nothing to resume" in line, line
    assert "removed" in line and "--resume" not in line, line
    assert list(tmp_path.glob("DATA-0-fc-digits/*/S-*")) == []


# ----------------------------------------------------------------------------------------------
# an epoch is done the moment its files are in place
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch", [1, 2])
def test_a_signal_while_an_epoch_is_renamed_into_place_keeps_that_epoch(epoch, tmp_path, monkeypatch, capsys):
    real = os.replace
    seen = []

    def replace(src, dst):  # the signal arrives between the epoch's renames
        real(src, dst)
        if os.path.basename(dst) == "results.csv":
            seen.append(dst)
            if len(seen) == epoch:
                os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(files.os, "replace", replace)
    capsys.readouterr()
    assert main.main(QUICK + ["--epochs", "3", "--outDir", str(tmp_path)]) == 130
    line = only_line(capsys.readouterr().err)
    (folder,) = tmp_path.glob("DATA-0-fc-digits/*/S-1")
    kept = "epoch 1 is saved" if epoch == 1 else "epochs 1-2 are saved"
    assert line == (f"interrupted (SIGINT) after epoch {epoch}; {kept}; continue with: python main.py "
                    f"--resume {folder}"), line
    assert torch.load(folder / "checkpoint.pt", weights_only=False)["epoch"] == epoch


def test_a_failure_before_the_new_folder_reaches_the_run_still_removes_it(tmp_path, monkeypatch, capsys):
    """A peer lost while rank 0's open_run is still returning (its broadcast fails): the folder
    it had just made is known, removed and named."""
    monkeypatch.setattr(Tools_fc, "initDataframe",
                        _raise(distributed.StopAll("rank 1 was lost (its process ended); rank 0 stops too")))
    capsys.readouterr()
    assert main.main(QUICK + ["--epochs", "2", "--outDir", str(tmp_path)]) == 6
    line = only_line(capsys.readouterr().err)
    assert "nothing to resume" in line and "removed" in line, line
    assert list(tmp_path.glob("DATA-0-fc-digits/*/S-*")) == []
