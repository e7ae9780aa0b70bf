"""Runs that survive (issue 5): resume, interruption, divergence, concurrency, hostile input.

Every run here uses scikit-learn's digits (or small fake MNIST files) and a few seconds of CPU.
Runs that must look like a user's are real subprocesses ``python main.py ...``; runs whose
internals are patched (planted NaN) or that only need the same code path run in-process through
``main.main``.
"""

import concurrent.futures
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import main
import Tools_fc
from binary_ep import datasets, files, signals
from binary_ep.checkpoint import load_checkpoint, save_checkpoint
from binary_ep.estimators import EP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")

# learnt alpha, random sign of beta and an lrAlpha decay at epoch 3: every piece of state that a
# resume must carry over (weights, alpha, filter buffers, biases, both generators, the schedule)
FC = ("--device -1 --archi fc --dataset digits --layersList 64 32 10 --T 8 --Kmax 4 --beta 0.5 "
      "--random_beta 1 --gamma 0.01 0.01 --gradThreshold 1e-6 1e-6 --lrBias 0.05 0.1 --learnAlpha 1 "
      "--lrAlpha 1e-2 1e-2 --decayLrAlpha 2 --epochDecayLrAlpha 3 --batchSize 16 --test_batchSize 200 "
      "--trainSubset 256 --testSubset 200 --seed 7").split()
CONV = ("--device -1 --archi conv --dataset digits --layersList 10 --convList 8 4 1 --kernelSize 3 "
        "--padding 1 --Fpool 2 --T 8 --Kmax 4 --beta 1.0 --random_beta 1 --gamma 0.1 0.1 0.1 "
        "--gradThreshold 1e-6 1e-6 1e-6 --lrBias 0.05 0.1 0.1 --learnAlpha 1 --lrAlpha 1e-2 1e-2 1e-2 "
        "--decayLrAlpha 2 --epochDecayLrAlpha 3 --batchSize 16 --test_batchSize 200 --trainSubset 256 "
        "--testSubset 200 --seed 7").split()
# epochs of about a second on one core, so that a signal sent after epoch 1 lands mid-epoch
# (T 200: an epoch lasts about a second on one thread, long enough for a signal to land inside it)
SLOW = ("--device -1 --archi fc --dataset digits --layersList 64 256 10 --T 200 --Kmax 8 --beta 0.5 "
        "--random_beta 1 --gamma 0.05 0.05 --gradThreshold 1e-4 1e-4 --lrBias 0.05 0.1 --batchSize 16 "
        "--test_batchSize 360 --seed 3 --epochs 3").split()
# quick and valid: the base of the bad invocations
QUICK = ("--device -1 --archi fc --dataset digits --layersList 64 16 10 --T 4 --Kmax 2 --beta 0.5 "
         "--gamma 0.01 0.01 --gradThreshold 1e-6 1e-6 --lrBias 0.05 0.1 --batchSize 32 "
         "--test_batchSize 200 --trainSubset 64 --testSubset 64 --seed 1").split()


def child_env():
    return dict(os.environ, EP_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def cli(args, timeout=300):
    return subprocess.run([sys.executable, MAIN] + [str(a) for a in args], capture_output=True,
                          text=True, env=child_env(), timeout=timeout, cwd=ROOT)


def start(args, err_path):
    """A background ``python main.py`` whose stderr goes to ``err_path``."""
    err = open(err_path, "w")
    p = subprocess.Popen([sys.executable, MAIN] + [str(a) for a in args], stdout=subprocess.DEVNULL,
                         stderr=err, env=child_env(), cwd=ROOT)
    err.close()
    return p


def run_folders(out):
    return sorted(out.glob("DATA-0-*/*/S-*"), key=lambda p: int(p.name[2:]))


def only_run(out):
    runs = run_folders(out)
    assert len(runs) == 1, runs
    return runs[0]


def temp_files(folder):
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".tmp")]


def csv_rows(run):
    """results.csv as text cells, without the timing column."""
    lines = (run / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, c in enumerate(header) if c != "epoch_seconds"]
    assert len(keep) == len(header) - 1
    return [[cells[i] for i in keep] for cells in (line.split(",") for line in lines)]


def checkpoint(run):
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)


def assert_same_tree(a, b, where="checkpoint"):
    """Equal nested dicts/lists/tensors/arrays, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(resumed, whole):
    """Everything a resumed run leaves equals the uninterrupted run's, except timing and the
    flags that name the folders."""
    assert csv_rows(resumed) == csv_rows(whole)
    a, b = checkpoint(resumed), checkpoint(whole)
    for key in ("resume", "outDir"):
        a["args"].pop(key), b["args"].pop(key)
    assert set(a) == set(b) >= {"epoch", "model", "optW", "optB", "rng", "generators", "args"}
    for key in a:
        assert_same_tree(a[key], b[key], key)


# ``python main.py`` costs seconds of imports (torch, pandas, torchvision) on a small machine; this
# launcher pays them once, then forks one child per invocation that runs main.py as ``__main__``
# with its own argv, stderr and exit status, exactly as the interpreter would (an uncaught
# exception prints its traceback and exits 1).  A sample also runs as real ``python main.py``.
LAUNCHER = r"""
import json, os, runpy, sys, traceback
root, parallel = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, root)
import pandas, sklearn.datasets, torch, torchvision.datasets  # noqa: F401 - warm up
import plotFunctions, Network_fc, Network_conv, Tools_fc, Tools_conv  # noqa: F401,E401
cases = json.load(sys.stdin)
running, codes = {}, {}

def reap():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)

for case in cases:
    while len(running) >= parallel:
        reap()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.argv = [os.path.join(root, "main.py")] + case["argv"]
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    running[pid] = case["name"]
while running:
    reap()
json.dump(codes, sys.stdout)
"""


def run_warm(cases, folder, parallel=None):
    """{name: (exit code, stderr)} of ``python main.py <argv>`` for each (name, argv), ``parallel``
    at a time (default: one per CPU core)."""
    jobs = [{"name": name, "argv": argv, "stderr": str(folder / f"{name}.err")} for name, argv in cases]
    parallel = parallel or max(2, os.cpu_count() or 1)
    r = subprocess.run([sys.executable, "-c", LAUNCHER, ROOT, str(parallel)],
                       input=json.dumps(jobs), capture_output=True, text=True, env=child_env(), cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    codes = json.loads(r.stdout.strip().splitlines()[-1])
    return {j["name"]: (codes[j["name"]], open(j["stderr"]).read()) for j in jobs}


# ----------------------------------------------------------------------------------------------
# 1. --resume: bit for bit
# ----------------------------------------------------------------------------------------------
def resumed_equals_whole(tmp_path, config, split, total):
    """``total`` epochs at once against ``split`` epochs resumed to ``total``: results.csv (but
    epoch_seconds) and every tensor of checkpoint.pt equal.  Returns the resumed run's
    (checkpoint, results dataframe)."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main.main(config + ["--epochs", str(total), "--outDir", str(whole)]) == 0
    assert main.main(config + ["--epochs", str(split), "--outDir", str(part)]) == 0
    run = only_run(part)
    assert checkpoint(run)["epoch"] == split and len(csv_rows(run)) == split + 1
    assert main.main(["--resume", str(run), "--epochs", str(total)]) == 0
    assert_same_run(run, only_run(whole))
    ckpt = checkpoint(run)
    assert ckpt["epoch"] == total and ckpt["args"]["epochs"] == total
    df = pd.read_csv(run / "results.csv", index_col="epoch")
    assert list(df.index) == list(range(1, total + 1))
    return ckpt, df


def check_resume_bit_for_bit(tmp_path, config):
    ckpt, df = resumed_equals_whole(tmp_path, config, 2, 4)
    # the run really moved: flips in the resumed epochs, alpha learnt, filter buffers non-zero
    assert df.filter(like="flips_").loc[3:].to_numpy().sum() > 0
    assert df.filter(like="alpha_").nunique().min() > 1
    assert all(float(s["filtered_grad"].abs().sum()) > 0 for s in ckpt["optW"]["state"].values())
    assert not temp_files(tmp_path)


def test_resume_is_bit_for_bit_fc(tmp_path):
    check_resume_bit_for_bit(tmp_path, FC)


def test_resume_is_bit_for_bit_conv(tmp_path):
    check_resume_bit_for_bit(tmp_path, CONV)


def test_checkpoint_restores_generators_global_rng_and_filter_buffers(tmp_path):
    _, args, _ = main.parse(FC + ["--epochs", "1", "--outDir", str(tmp_path)])
    torch.manual_seed(0)
    net = main.build_network(args)
    gens = {"data": torch.Generator().manual_seed(11), "beta": torch.Generator().manual_seed(12)}
    train, _ = datasets.load_data(args, gens["data"])
    Tools_fc.train_bin(net, train, 1, EP(args.beta, sign_generator=gens["beta"]))  # advances both generators, fills the buffers
    torch.rand(3), np.random.rand(3)
    save_checkpoint(str(tmp_path), net, 1, args, gens)
    expect = (torch.rand(5, generator=gens["data"]), torch.rand(5, generator=gens["beta"]),
              torch.rand(5), np.random.rand(5))
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    buffers = [s["filtered_grad"].clone() for s in net.optW.state.values()]

    torch.manual_seed(99), np.random.seed(99)
    other = main.build_network(args)
    assert not all(torch.equal(saved[k], v) for k, v in other.state_dict().items())
    fresh = {"data": torch.Generator().manual_seed(0), "beta": torch.Generator().manual_seed(0)}
    assert load_checkpoint(str(tmp_path), other, fresh) == 1
    got = (torch.rand(5, generator=fresh["data"]), torch.rand(5, generator=fresh["beta"]),
           torch.rand(5), np.random.rand(5))
    for e, g in zip(expect, got):
        assert (torch.equal(e, g) if isinstance(e, torch.Tensor) else np.array_equal(e, g))
    for k, v in other.state_dict().items():
        assert torch.equal(saved[k], v), k
    restored = [other.optW.state[w]["filtered_grad"] for w in other.binary_weights()]
    assert all(torch.equal(a, b) for a, b in zip(buffers, restored))
    assert [float(b.abs().sum()) > 0 for b in restored] == [True, True]


def test_resume_flags_that_conflict_are_named(tmp_path, capsys):
    assert main.main(QUICK + ["--epochs", "2", "--outDir", str(tmp_path)]) == 0
    run = only_run(tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    for extra, fragments in ((["--beta", "0.7", "--T", "4"], ["--beta (saved 0.5, given 0.7)"]),
                             (["--gamma", "0.5", "0.5", "--lrBias", "1", "1"], ["--gamma", "--lrBias"]),
                             (["--epochs", "1"], ["--epochs can only be raised", "saved 2"]),
                             (["--epochs=1"], ["--epochs can only be raised"]),
                             (["--lrBi", "1", "1"], ["--lrBias (saved"]),  # an abbreviation
                             (["--dataset", "mnist"], ["--dataset"])):
        with pytest.raises(SystemExit) as e:
            main.main(["--resume", str(run)] + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(f in err for f in fragments), err
    # flags equal to the saved ones are accepted, --epochs may be raised (--flag=value too)
    assert main.main(["--resume", str(run), "--beta", "0.5", "--seed", "1", "--epochs=3"]) == 0
    assert checkpoint(run)["epoch"] == 3
    # the file is as first written, with one line under the command naming the resume
    lines = (run / "Hyperparameters.txt").read_bytes().splitlines(keepends=True)
    assert b"".join(line for line in lines if not line.startswith(b"resumed after epoch 2: ")) == \
        before["Hyperparameters.txt"]
    assert lines[2].startswith(b"resumed after epoch 2: python main.py --resume ")
    # nothing left to do: a clear line, exit 0, nothing touched
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main.main(["--resume", str(run)]) == 0
    assert "already" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


# ----------------------------------------------------------------------------------------------
# 2. Interruption
# ----------------------------------------------------------------------------------------------
def test_sigint_and_sigterm_keep_the_last_epoch_and_resume_bit_for_bit(tmp_path):
    """Real ``python main.py`` processes: SIGINT well inside epoch 2, SIGTERM as epoch 1 is being
    saved, SIGINT while the libraries load.  The two runs with a saved epoch resume (one in a new
    process, one here) to exactly an uninterrupted run."""
    names = ("int", "term", "startup")
    outs = {n: tmp_path / n for n in names + ("ref",)}
    errs = {n: tmp_path / f"{n}.err" for n in names}
    t0 = time.time()
    procs = {n: start(SLOW + ["--outDir", outs[n]], errs[n]) for n in names}

    def saved(n, what):
        runs = run_folders(outs[n])
        return bool(runs) and (runs[0] / what).exists()

    triggers = {  # name -> (condition, signal, delay after the condition)
        "startup": (lambda: time.time() - t0 > 1.0, signal.SIGINT, 0),
        "term": (lambda: saved("term", "results.csv"), signal.SIGTERM, 0),  # likely mid-save
        "int": (lambda: saved("int", "checkpoint.pt"), signal.SIGINT, 0.3),  # inside epoch 2
    }
    due = {}
    while triggers and time.time() - t0 < 240:
        for n in list(triggers):
            cond, sig, delay = triggers[n]
            assert procs[n].poll() is None, f"{n} ended before its signal: {errs[n].read_text()}"
            if n not in due and cond():
                due[n] = time.time() + delay
            if n in due and time.time() >= due[n]:
                procs[n].send_signal(sig)
                del triggers[n]
        time.sleep(0.01)
    assert not triggers, f"never reached: {sorted(triggers)}"
    codes = {n: p.wait(timeout=300) for n, p in procs.items()}
    stderr = {n: errs[n].read_text() for n in names}
    for n in names:
        assert "Traceback" not in stderr[n], stderr[n]
    assert codes == {"int": 130, "term": 143, "startup": 130}, stderr

    for n, sig in (("int", "SIGINT"), ("term", "SIGTERM")):
        run = only_run(outs[n])
        last = stderr[n].strip().splitlines()[-1]
        assert last.startswith(f"interrupted ({sig})") and f"python main.py --resume {run}" in last, last
        assert sum("interrupted" in line for line in stderr[n].splitlines()) == 1
        df = pd.read_csv(run / "results.csv", index_col="epoch")  # readable, complete rows
        epochs = checkpoint(run)["epoch"]
        assert epochs >= 1 and list(df.index) == list(range(1, epochs + 1)) and not df.isna().any().any()
        assert epochs < 3 and not temp_files(outs[n])
        # the message names exactly what is on disk (on a loaded machine the signal may land an
        # epoch later than aimed at, or between two epochs)
        kept = "epoch 1 is saved" if epochs == 1 else f"epochs 1-{epochs} are saved"
        assert (f"during epoch {epochs + 1}; {kept}" in last or f"after epoch {epochs}; {kept}" in last), last
    assert len(stderr["startup"].strip().splitlines()) == 1 and "interrupted" in stderr["startup"]
    assert not outs["startup"].exists()

    resumed = start(["--resume", only_run(outs["int"])], tmp_path / "int.resume.err")
    threads = torch.get_num_threads()  # here, on one thread like the children
    torch.set_num_threads(1)
    try:
        assert main.main(SLOW + ["--outDir", str(outs["ref"])]) == 0
        assert main.main(["--resume", str(only_run(outs["term"]))]) == 0
    finally:
        torch.set_num_threads(threads)
    assert resumed.wait(timeout=300) == 0, (tmp_path / "int.resume.err").read_text()
    for n in ("int", "term"):
        assert_same_run(only_run(outs[n]), only_run(outs["ref"]))
        assert not temp_files(outs[n])


def test_interrupt_before_the_first_epoch_removes_the_run_folder(tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 1, and a second one while the half-made folder is being removed."""
    from binary_ep import run_folder
    train_bin, rmtree = Tools_fc.train_bin, run_folder.shutil.rmtree

    def interrupted(net, loader, epoch, *args):
        os.kill(os.getpid(), signal.SIGINT)
        return train_bin(net, loader, epoch, *args)

    def impatient_rmtree(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        return rmtree(path, *args, **kwargs)
    monkeypatch.setattr(Tools_fc, "train_bin", interrupted)
    monkeypatch.setattr(run_folder.shutil, "rmtree", impatient_rmtree)
    capsys.readouterr()
    assert main.main(QUICK + ["--epochs", "2", "--outDir", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("interrupted (SIGINT) before the first epoch finished; nothing to resume"), err
    assert sum("interrupted" in line for line in err) == 1
    assert run_folders(tmp_path) == [] and not temp_files(tmp_path)


def test_atomic_write_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old,complete\n")

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("new,half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(files.WriteFailed) as e:  # one sentence, the cause in words
        files.atomic_write(str(target), crash)
    assert str(e.value) == f"cannot write results.csv in {tmp_path}: no space left on the device"
    assert target.read_text() == "old,complete\n" and os.listdir(tmp_path) == ["results.csv"]

    # a signal that arrives while a file is written is held back until the file is complete
    previous = signals.install_signal_handlers()
    try:
        def interrupted_write(tmp):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            with open(tmp, "w") as f:
                f.write("new,complete\n")
        with pytest.raises(signals.Interrupted) as e:
            files.atomic_write(str(target), interrupted_write)
        assert e.value.signum == signal.SIGTERM
    finally:
        signals.restore_signal_handlers(previous)
    assert target.read_text() == "new,complete\n" and os.listdir(tmp_path) == ["results.csv"]
    assert signal.getsignal(signal.SIGINT) is previous[signal.SIGINT]


def test_a_signal_whose_exception_a_callback_dropped_is_raised_at_the_next_check(capsys):
    """Python runs the handler inside a weak-reference callback (importlib has one for every
    module lock) and drops what it raises there; the signal must still stop the run, at the next
    ``check``, and Python's "Exception ignored" report must not reach stderr."""
    import weakref

    class Thing:
        pass
    hook = sys.unraisablehook
    previous = signals.install_signal_handlers()
    try:
        signals.check()  # nothing pending: no exception
        def callback(ref):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at a jump inside the callback
                pass
            raise AssertionError("the signal handler did not run inside the callback")
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing  # the callback runs, the handler raises inside it, Python drops the exception
        assert ref() is None
        signals.hold(True)
        signals.check()  # held (data-parallel): the ranks' stop flags take it, check does not
        assert signals.pending() == signal.SIGTERM
        signals.hold(False)
        with pytest.raises(signals.Interrupted) as e:
            signals.check()
        assert e.value.signum == signal.SIGTERM and signals.pending() is None
        signals.check()  # raised once only
    finally:
        signals.restore_signal_handlers(previous)
    assert capsys.readouterr().err == ""  # no "Exception ignored" report, no failed assertion
    assert sys.unraisablehook is hook


def test_main_restores_the_signal_handlers(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook
    assert main.main(QUICK + ["--epochs", "1", "--outDir", str(tmp_path)]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook) == before
    with pytest.raises(SystemExit):  # an argument error (argparse exits) restores them too
        main.main(QUICK + ["--epochs", "0", "--outDir", str(tmp_path)])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook) == before


# ----------------------------------------------------------------------------------------------
# 3. Divergence
# ----------------------------------------------------------------------------------------------
def plant_bias_nan(net):
    net.biases()[1][3] = float("nan")


def plant_alpha_inf(net):
    net.binary_weights()[0].fill_(float("inf"))


def plant_alpha_zero(net):
    net.binary_weights()[0].zero_()


PLANTS = {  # name -> (when, plant, message fragments)
    "bias_nan": ("after", plant_bias_nan, ["NaN or infinity", "biases of layer fc1"]),
    "alpha_inf": ("after", plant_alpha_inf, ["NaN or infinity", "alpha of layer fc0"]),
    "alpha_zero": ("after", plant_alpha_zero, ["alpha of layer fc0 reached zero or below"]),
    "alpha_negative": ("before", None, ["alpha of layer fc1 reached zero or below"]),
    "state_nan": ("input", None, ["NaN or infinity", "states of layer"]),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_divergence_stops_and_keeps_the_last_good_epoch(plant, tmp_path, monkeypatch, capsys):
    from Network_fc import Network_fc
    when, planter, fragments = PLANTS[plant]
    seen = {"epoch": 0, "batch": 0, "snapshot": None}
    original_set_epoch, original_update, original_prepare = (
        Network_fc.set_epoch, Network_fc.updateWeights, Tools_fc.prepare_images)

    def set_epoch(self, epoch):
        seen["epoch"], seen["batch"] = epoch, 0
        if epoch == 2:  # epoch 1 is on disk now: keep its exact bytes
            run = only_run(tmp_path)
            seen["snapshot"] = {n: (run / n).read_bytes() for n in ("results.csv", "checkpoint.pt")}
        return original_set_epoch(self, epoch)

    def updateWeights(self):
        seen["batch"] += 1
        armed = seen["epoch"] == 2 and seen["batch"] == 2
        if armed and when == "before":  # learning rate that sends alpha of fc1 to exactly -alpha
            group = self.optW.param_groups[1]
            w = group["params"][0]
            alpha = float(w.detach().abs().reshape(-1)[0])
            group["lr_alpha"] = 4 * alpha / float((self.optW.pending_grad(w) * w).sum())
        flips = original_update(self)
        if armed and when == "after":
            with torch.no_grad():
                planter(self)
        return flips

    def prepare(net, x):
        x = original_prepare(net, x)
        if seen["epoch"] == 2 and seen["batch"] == 1 and when == "input":  # the 2nd training batch
            x = x.clone()
            x[0, 5] = float("nan")
        return x

    monkeypatch.setattr(Network_fc, "set_epoch", set_epoch, raising=False)
    monkeypatch.setattr(Network_fc, "updateWeights", updateWeights, raising=False)
    monkeypatch.setattr(Tools_fc, "prepare_images", prepare)
    capsys.readouterr()
    code = main.main(FC + ["--epochs", "3", "--outDir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 3, err
    lines = [line for line in err.splitlines() if "diverged" in line]
    assert len(lines) == 1, err
    msg = lines[0]
    assert msg.startswith("main.py: error: training diverged:"), msg
    assert all(f in msg for f in fragments + ["at epoch 2, batch 2", "epoch 1 is saved"]), msg
    run = only_run(tmp_path)
    assert str(run) in msg
    for name, data in seen["snapshot"].items():
        assert (run / name).read_bytes() == data, name
    assert checkpoint(run)["epoch"] == 1 and not temp_files(tmp_path)


# ----------------------------------------------------------------------------------------------
# 4. Concurrency
# ----------------------------------------------------------------------------------------------
def test_six_parallel_runs_get_six_complete_folders(tmp_path):
    """Six ``main.py`` processes started together (forked from one warm interpreter, so that they
    really overlap) in one --outDir."""
    out = tmp_path / "out"
    seeds = list(range(101, 107))
    cases = [(f"seed{s}", QUICK[:-2] + ["--seed", str(s), "--epochs", "2", "--outDir", str(out)]) for s in seeds]
    results = run_warm(cases, tmp_path, parallel=len(cases))
    for name, (code, err) in results.items():
        assert code == 0 and "Traceback" not in err, err
    runs = run_folders(out)
    assert [r.name for r in runs] == [f"S-{i}" for i in range(1, 7)]
    named = {}
    for name, (_, err) in results.items():
        (line,) = [x for x in err.splitlines() if x.startswith("run folder: ")]
        named[line.split(": ", 1)[1]] = int(name[4:])
    assert sorted(named) == sorted(str(r) for r in runs)
    for run in runs:
        text = (run / "Hyperparameters.txt").read_text().splitlines()
        hp = dict(line.split(": ", 1) for line in text[text.index("[effective values]") + 1:])
        ckpt = checkpoint(run)
        assert int(hp["seed"]) == ckpt["args"]["seed"] == named[str(run)]  # its own files only
        assert ckpt["epoch"] == 2
        df = pd.read_csv(run / "results.csv", index_col="epoch")
        assert list(df.index) == [1, 2] and not df.isna().any().any()
        assert {p.name for p in run.iterdir()} >= {"Hyperparameters.txt", "results.csv", "checkpoint.pt"}
    (date,) = {r.parent for r in runs}
    assert sorted(p.name for p in date.iterdir() if p.is_file()) == ["plotFunctions.py"]
    assert (date / "plotFunctions.py").read_bytes() == open(os.path.join(ROOT, "plotFunctions.py"), "rb").read()
    assert not temp_files(out)


# ----------------------------------------------------------------------------------------------
# 5. Hostile input
# ----------------------------------------------------------------------------------------------
MNIST_NAMES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
               "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def idx(array):
    """IDX (the MNIST file format): magic 0x0800 + number of dims, the dims big-endian, the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def fake_mnist(root, n_train=96, n_test=48, size=28, seed=0):
    """Small MNIST look-alike in torchvision's layout: <root>/MNIST/raw/<the four files>.
    Each class is a bright square at its own place, so a network can learn it."""
    rng = np.random.RandomState(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.randint(0, 10, n).astype(np.uint8)
        images = rng.randint(0, 60, (n, size, size)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c:6 + 2 * c, 4:12] = 255
        with open(os.path.join(raw, MNIST_NAMES[f"{split}_images"]), "wb") as f:
            f.write(idx(images))
        with open(os.path.join(raw, MNIST_NAMES[f"{split}_labels"]), "wb") as f:
            f.write(idx(labels))
    return raw


def corrupt(root, how):
    raw = fake_mnist(root)
    path = lambda key: os.path.join(raw, MNIST_NAMES[key])  # noqa: E731
    if how == "truncated":
        data = open(path("train_images"), "rb").read()
        open(path("train_images"), "wb").write(data[:len(data) // 2])
    elif how == "magic":
        data = open(path("test_images"), "rb").read()
        open(path("test_images"), "wb").write(b"\xff\xfe\x00\x00" + data[4:])
    elif how == "empty":
        open(path("train_labels"), "wb").close()
    elif how == "labels":
        open(path("test_labels"), "wb").write(idx(np.full(48, 42)))
    elif how == "count":
        open(path("train_labels"), "wb").write(idx(np.zeros(95)))
    elif how == "missing":
        os.remove(path("test_labels"))
    elif how == "size":
        open(path("train_images"), "wb").write(idx(np.zeros((96, 8, 8))))
    return raw


MNIST_FC = ["--dataset", "mnist", "--layersList", "784", "16", "10"]


def bad_invocations(tmp_path):
    """(name, argv, expected message fragments, folders that must stay byte for byte the same)."""
    base = QUICK
    bin_w_n = ["--binary_settings", "bin_W_N", "--activationFun", "heaviside"]
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder\n")
    cases = [
        ("layer_size_zero", ["--layersList", "64", "0", "10"], ["--layersList", "positive"]),
        ("layer_size_negative", ["--layersList", "64", "-3", "10"], ["--layersList", "positive"]),
        ("batch_zero", ["--batchSize", "0"], ["--batchSize", "positive"]),
        ("test_batch_negative", ["--test_batchSize", "-8"], ["--test_batchSize", "positive"]),
        ("T_zero", ["--T", "0"], ["--T", "positive"]),
        ("Kmax_negative", ["--Kmax", "-1"], ["--Kmax", "positive"]),
        ("epochs_zero", ["--epochs", "0"], ["--epochs", "positive"]),
        ("T_not_a_number", ["--T", "ten"], ["--T", "invalid int value"]),
        ("subset_zero", ["--trainSubset", "0"], ["--trainSubset", "positive"]),
        ("threshold_negative", ["--gradThreshold", "-1e-6", "1e-6"], ["--gradThreshold", "0 or more"]),
        ("lr_bias_negative", ["--lrBias", "0.1", "-0.1"], ["--lrBias", "0 or more"]),
        ("gamma_zero", ["--gamma", "0", "0.01"], ["--gamma", "(0, 1]"]),
        ("gamma_above_one", ["--gamma", "0.01", "1.5"], ["--gamma", "(0, 1]"]),
        ("beta_zero", ["--beta", "0"], ["--beta", "non-zero"]),
        ("beta_nan", ["--beta", "nan"], ["--beta", "finite"]),
        ("gamma_length", ["--gamma", "0.01"], ["--gamma needs 2 values", "output layer first"]),
        ("lr_bias_length", ["--lrBias", "0.1", "0.1", "0.1"], ["--lrBias needs 2 values"]),
        ("lr_alpha_missing", ["--learnAlpha", "1"], ["--learnAlpha 1 needs --lrAlpha"]),
        ("lr_alpha_length", ["--learnAlpha", "1", "--lrAlpha", "1", "2", "3"], ["--lrAlpha needs 2 values"]),
        ("decay_zero", ["--decayLrAlpha", "0"], ["--decayLrAlpha", "positive"]),
        ("unknown_dataset", ["--dataset", "svhn"], ["--dataset", "invalid choice", "svhn"]),
        ("unknown_activation", ["--activationFun", "relu"], ["--activationFun", "invalid choice", "relu"]),
        ("unknown_flag", ["--learningRate", "0.1"], ["unrecognized arguments", "--learningRate"]),
        ("input_size", ["--layersList", "784", "16", "10"], ["--layersList must start with 64"]),
        ("output_size", ["--layersList", "64", "16", "5"], ["--layersList must end with 10"]),
        ("data_dir_is_a_file", ["--dataDir", a_file], ["--dataDir", "is a file"]),
        ("data_dir_under_a_file", ["--dataDir", a_file / "data"], ["--dataDir", "a_file.txt is a file"]),
        ("out_dir_is_a_file", ["--outDir", a_file], ["--outDir", "not a folder"]),
        ("out_dir_under_a_file", ["--outDir", a_file / "runs"], ["--outDir", "not a folder"]),
        ("conv_too_small", ["--archi", "conv", "--layersList", "10", "--convList", "8", "4", "1",
                            "--kernelSize", "5", "--padding", "0", "--Fpool", "2", "--gamma",
                            "0.1", "0.1", "0.1", "--gradThreshold", "0", "0", "0", "--lrBias",
                            "0.1", "0.1", "0.1"], ["--padding"]),
        # issue 17: values that would reach the tensors as infinities, zeros or overflows
        ("beta_subnormal", ["--beta", "1e-40"], ["--beta", "normal float32", "got 1e-40"]),
        ("beta_overflow", ["--beta", "1e39"], ["--beta", "got 1e+39"]),
        ("beta_over_batch", ["--beta", "1e37"], ["--beta", "1/(beta B)", "--batchSize 32"]),
        ("seed_too_big", ["--seed", "18446744073709551615"], ["--seed", "0..4294967295"]),
        ("seed_too_negative", ["--seed", "-9223372036854775809"], ["--seed", "0..4294967295"]),
        ("seed_minus_one", ["--seed", "-1"], ["--seed", "0..4294967295", "got -1"]),
        ("seed_2_32", ["--seed", "4294967296"], ["--seed", "0..4294967295"]),
        ("memory", ["--layersList", "64", "4000000000", "10"],
         ["needs at least", "GiB of CPU memory", "GiB is available", "--layersList", "--batchSize"]),
        ("layer_size_overflow", ["--layersList", "64", "99999999999999999999", "10"],
         ["--layersList", "1..4294967295"]),
        ("threshold_inf", ["--gradThreshold", "1e300", "1e-6"], ["--gradThreshold", "got 1e+300"]),
        ("lr_bias_overflow", ["--lrBias", "1e39", "0.1"], ["--lrBias", "got 1e+39"]),
        ("gamma_subnormal", ["--gamma", "1e-45", "0.01"], ["--gamma", "got 1e-45"]),
        ("lr_alpha_overflow", ["--learnAlpha", "1", "--lrAlpha", "1e39", "1e-2"], ["--lrAlpha", "got 1e+39"]),
        ("lr_alpha_decayed_overflow", ["--learnAlpha", "1", "--lrAlpha", "1e30", "1e-2", "--decayLrAlpha",
                                       "1e-10"], ["--lrAlpha", "--decayLrAlpha"]),
        ("decay_overflow", ["--decayLrAlpha", "1e39"], ["--decayLrAlpha", "got 1e+39"]),
        ("T_too_many", ["--T", "1000001"], ["--T", "1..1000000"]),
        ("Kmax_too_many", ["--Kmax", "10000000"], ["--Kmax", "1..1000000"]),
        ("batch_too_big", ["--batchSize", "2147483648"], ["--batchSize", "1..2147483647"]),
        ("epochs_too_many", ["--epochs", "2147483648"], ["--epochs", "1..2147483647"]),
        ("epoch_decay_zero", ["--epochDecayLrAlpha", "0"], ["--epochDecayLrAlpha", "1..2147483647"]),
        ("kernel_too_big", ["--kernelSize", "9"], ["--kernelSize", "1..8"]),
        ("fpool_zero", ["--Fpool", "0"], ["--Fpool", "1..8"]),
        ("padding_too_big", ["--padding", "9"], ["--padding", "0..8"]),
        ("conv_channels_overflow", ["--archi", "conv", "--layersList", "10", "--convList", "8",
                                    "99999999999", "1", "--kernelSize", "3", "--padding", "1", "--gamma",
                                    "0.1", "0.1", "0.1", "--gradThreshold", "0", "0", "0", "--lrBias",
                                    "0.1", "0.1", "0.1"], ["--convList", "1..4294967295"]),
        ("subset_too_big", ["--trainSubset", "2147483648"], ["--trainSubset", "1..2147483647"]),
        ("workers_negative", ["--workers", "-1"], ["--workers", "0..256"]),
        ("workers_too_many", ["--workers", "100000"], ["--workers", "0..256"]),
        ("device_below_cpu", ["--device", "-2"], ["--device", "-1..127"]),
        ("device_too_big", ["--device", "1000"], ["--device", "-1..127"]),
        # issue 18: binary neurons (--binary_settings bin_W_N) and output populations
        ("bin_W_N_bptt", bin_w_n + ["--optim", "bptt"], ["--optim bptt", "bin_W_N", "no gradient", "--optim ep"]),
        ("bin_W_N_gdu", bin_w_n + ["--check", "gdu"], ["--check gdu", "bin_W_N", "no gradient"]),
        ("bin_W_N_default_activation", ["--binary_settings", "bin_W_N"],
         ["--binary_settings bin_W_N", "--activationFun heaviside", "got hardsigm (the default)"]),
        ("bin_W_N_tanh", bin_w_n + ["--activationFun", "tanh"], ["--binary_settings bin_W_N", "got tanh"]),
        ("heaviside_bin_W", ["--activationFun", "heaviside"],
         ["--activationFun heaviside", "--binary_settings bin_W_N", "bin_W (the default)"]),
        ("gamma_neur_bin_W", ["--gamma_neur", "0.5"], ["--gamma_neur", "ignored", "--binary_settings bin_W"]),
        ("rho_threshold_bin_W", ["--binary_settings", "bin_W", "--rho_threshold", "0.3"],
         ["--rho_threshold", "ignored", "--binary_settings bin_W"]),
        ("expand_output_layers", bin_w_n + ["--expand_output", "2"],
         ["--layersList must end with 20 output units", "--expand_output 2", "got 10"]),
        ("expand_output_not_a_multiple", ["--layersList", "64", "16", "25", "--expand_output", "2"],
         ["--layersList must end with 20 output units", "got 25", "end it with 20"]),
        ("expand_output_zero", ["--expand_output", "0"], ["--expand_output", "1..214748364", "got 0"]),
        ("expand_output_too_big", ["--expand_output", "214748365"], ["--expand_output", "1..214748364"]),
        ("gamma_neur_zero", bin_w_n + ["--gamma_neur", "0"], ["--gamma_neur", "(0, 1]", "got 0"]),
        ("gamma_neur_above_one", bin_w_n + ["--gamma_neur", "1.5"], ["--gamma_neur", "(0, 1]"]),
        ("rho_threshold_nan", bin_w_n + ["--rho_threshold", "nan"], ["--rho_threshold", "[0, 1]", "got nan"]),
        ("rho_threshold_negative", bin_w_n + ["--rho_threshold", "-0.1"], ["--rho_threshold", "[0, 1]"]),
    ]
    if os.geteuid() != 0:  # root may write and read anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        cases.append(("out_dir_not_writable", ["--outDir", locked / "runs"], ["--outDir", "not writable"]))
        hidden = tmp_path / "hidden"
        hidden.mkdir()
        hidden.chmod(0o000)
        cases.append(("data_dir_unreadable", ["--dataDir", hidden], ["--dataDir", "cannot be read"]))
    full = [(name, base + extra, fragments, []) for name, extra, fragments in cases]

    # data files: missing (offline), truncated, corrupted
    for how, fragments in (("none", ["could not be downloaded", "MNIST/raw", "train-images-idx3-ubyte",
                                     "t10k-labels-idx1-ubyte"]),
                           ("missing", ["could not be downloaded", "t10k-labels-idx1-ubyte"]),
                           ("truncated", ["MNIST/raw", "truncated or corrupted"]),
                           ("magic", ["MNIST/raw", "truncated or corrupted"]),
                           ("empty", ["MNIST/raw", "truncated or corrupted"]),
                           ("labels", ["MNIST/raw", "truncated or corrupted"]),
                           ("count", ["MNIST/raw", "truncated or corrupted"]),
                           ("size", ["MNIST/raw", "truncated or corrupted"])):
        data = tmp_path / f"data-{how}"
        if how == "none":
            data.mkdir()
        else:
            corrupt(str(data), how)
        full.append((f"mnist_{how}", base + MNIST_FC + ["--dataDir", data], fragments, [data]))

    cifar_fc = ["--dataset", "cifar10", "--layersList", "3072", "16", "10"]
    cifar_empty, cifar_bad = tmp_path / "cifar-empty", tmp_path / "cifar-bad" / "cifar-10-batches-py"
    cifar_empty.mkdir()
    cifar_bad.mkdir(parents=True)
    for name in datasets.CIFAR10_FILES:
        (cifar_bad / name).write_bytes(b"\x80\x04 not a pickle")
    full += [("cifar_none", base + cifar_fc + ["--dataDir", cifar_empty],
              ["cifar-10-batches-py", "could not be downloaded", "data_batch_1"], [cifar_empty]),
             ("cifar_corrupted", base + cifar_fc + ["--dataDir", cifar_bad.parent],
              ["cifar-10-batches-py", "truncated or corrupted"], [cifar_bad.parent])]

    # --resume of folders that are not resumable, and of one that is, with bad flags
    empty_run = tmp_path / "S-empty"
    empty_run.mkdir()
    broken = tmp_path / "S-broken"
    broken.mkdir()
    (broken / "Hyperparameters.txt").write_text("command: python main.py\n")
    (broken / "checkpoint.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    good_out = tmp_path / "good"
    assert main.main(QUICK + ["--epochs", "2", "--outDir", str(good_out)]) == 0
    good = only_run(good_out)
    bad_csv = tmp_path / "S-bad-csv"
    os.makedirs(bad_csv)
    for name in ("Hyperparameters.txt", "checkpoint.pt"):
        (bad_csv / name).write_bytes((good / name).read_bytes())
    (bad_csv / "results.csv").write_bytes(b"\x00\x01garbage\n\"unterminated")
    full += [
        ("resume_without_checkpoint", ["--resume", empty_run], ["--resume", "checkpoint.pt"], [empty_run]),
        ("resume_missing_folder", ["--resume", tmp_path / "nowhere"], ["--resume", "checkpoint.pt"], []),
        ("resume_damaged_checkpoint", ["--resume", broken], ["checkpoint.pt cannot be read"], [broken]),
        ("resume_damaged_csv", ["--resume", bad_csv, "--epochs", "3"], ["results.csv"], [bad_csv]),
        ("resume_conflicting_flags", ["--resume", good, "--T", "9", "--beta", "2"],
         ["--T (saved 4, given 9)", "--beta (saved 0.5, given 2.0)"], [good]),
        ("resume_fewer_epochs", ["--resume", good, "--epochs", "1"], ["--epochs can only be raised"], [good]),
        ("resume_epochs_too_many", ["--resume", good, "--epochs", "2147483648"], ["--epochs", "1..2147483647"],
         [good]),
        ("resume_workers_negative", ["--resume", good, "--workers", "-1"], ["--workers", "0..256"], [good]),
        ("resume_device_below_cpu", ["--resume", good, "--device", "-5"], ["--device", "-1..127"], [good]),
        ("resume_gamma_neur_bin_W", ["--resume", good, "--gamma_neur", "0.3"], ["--gamma_neur", "ignored"], [good]),
    ]
    return full


def snapshot(folder):
    if not os.path.exists(folder):
        return None
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, dirs, files in os.walk(folder) for f in files} | \
           {os.path.relpath(os.path.join(d, x), folder) + "/": b"" for d, dirs, _ in os.walk(folder) for x in dirs}


def test_bad_invocations_fail_cleanly_and_create_nothing(tmp_path):
    cases = bad_invocations(tmp_path)
    assert len(cases) >= 25
    assert len({name for name, *_ in cases}) == len(cases)
    argvs, keeps, outs = {}, {}, {}
    for name, argv, fragments, keep in cases:
        out = tmp_path / "out" / name
        out.mkdir(parents=True)
        argv = [str(a) for a in argv]
        if "--outDir" not in argv and "--resume" not in argv:  # a resumed run keeps its folder
            argv += ["--outDir", str(out)]
        argvs[name], outs[name] = argv, out
        keeps[name] = {str(k): snapshot(k) for k in keep}
    (tmp_path / "stderr").mkdir()
    results = run_warm(list(argvs.items()), tmp_path / "stderr")
    # the same answers from real interpreters, for a sample (parse, data and resume errors)
    sample = ["threshold_negative", "mnist_truncated", "resume_damaged_checkpoint"]
    with concurrent.futures.ThreadPoolExecutor(len(sample)) as pool:
        real = dict(zip(sample, pool.map(lambda n: cli(argvs[n], timeout=300), sample)))
    failures = []
    for name, _, fragments, keep in cases:
        code, err = results[name]
        lines = err.strip().splitlines()
        problems = []
        if code == 0:
            problems.append("exit code 0")
        if "Traceback" in err:
            problems.append("traceback")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines")
        elif not lines[0].startswith("main.py: error: "):
            problems.append("not a main.py error line")
        missing = [f for f in fragments if f not in err]
        if missing:
            problems.append(f"missing {missing}")
        if os.listdir(outs[name]):
            problems.append(f"--outDir changed: {os.listdir(outs[name])}")
        if keeps[name] != {str(k): snapshot(k) for k in keep}:
            problems.append("input folder changed")
        if name in real and (real[name].returncode, real[name].stderr) != (code, err):
            problems.append(f"python main.py answers differently: {real[name].returncode} {real[name].stderr!r}")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}\n    stderr: {err.strip()[-600:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a missing GPU index needs CUDA to be told apart")
def test_missing_gpu_is_one_line(tmp_path):
    r = cli(QUICK + ["--device", str(torch.cuda.device_count() + 3), "--outDir", tmp_path])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr
    assert os.listdir(tmp_path) == []


def test_valid_fake_mnist_trains_one_epoch_offline(tmp_path):
    data = tmp_path / "data"
    fake_mnist(str(data))
    before = snapshot(data)
    args = MNIST_FC + ["--device", "-1", "--T", "4", "--Kmax", "2", "--beta", "0.5", "--gamma", "0.01", "0.01",
                       "--gradThreshold", "1e-6", "1e-6", "--lrBias", "0.05", "0.1", "--batchSize", "16",
                       "--test_batchSize", "48", "--epochs", "1", "--seed", "0"]
    assert main.main(args + ["--dataDir", str(data), "--outDir", str(tmp_path / "out")]) == 0
    run = only_run(tmp_path / "out")
    assert run.parent.parent.name == "DATA-0-fc-mnist"
    df = pd.read_csv(run / "results.csv", index_col="epoch")
    assert list(df.index) == [1] and 0 <= df["test_error"].iloc[0] <= 100
    assert checkpoint(run)["epoch"] == 1
    assert snapshot(data) == before  # read in place, nothing downloaded or rewritten
