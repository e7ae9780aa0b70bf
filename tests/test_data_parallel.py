"""Data-parallel training (DESIGN.md section 9), started the way users start it: PyTorch's own
launcher, ``python -m torch.distributed.run --standalone --nproc_per_node 2 main.py ...``, on
the CPU with gloo.  The same gradients as one process, the same learning curve, one run folder
written by rank 0, resume with 2 and with 1 process, SIGINT to the launcher, a killed rank, a
hung rank, rank 0's failures reaching the others, and the launcher errors; plus the pieces
in-process: shares of batches, the global normaliser of the estimators, quiet progress bars,
the heartbeat's watchdog."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch
import torch.distributed as dist

import main
from binary_ep import distributed, files, heartbeat, loops, run_folder
from binary_ep.datasets import TensorBatches, load_digits_split, share_bounds
from binary_ep.estimators import BPTT, EP
from binary_ep.outcome import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = 2.0 ** -24  # float32 unit roundoff
# a rank killed mid-epoch: the others exit within this many seconds (their next collective fails
# at once; naming the lost rank from the heartbeats takes heartbeat.LOST_AFTER_S)
LOST_RANK_TIMEOUT_S = 15

# fc: 2 weight layers; the input layer's gradient (256 x 64) goes as its two factors (B x (256 + 64)
# numbers), the other (10 x 256) all-reduced; 1409 = 44 x 32 + 1 training samples: the last
# global batch has one sample, so rank 1's share of it is empty
FC = ("--device -1 --archi fc --dataset digits --layersList 64 256 10 --T 20 --Kmax 6 --beta 0.5 "
      "--gamma 1e-3 1e-3 --gradThreshold 3e-5 3e-5 --lrBias 0.05 0.1 --batchSize 32 --test_batchSize 100 "
      "--trainSubset 1409 --seed 5")
CONV = ("--device -1 --archi conv --dataset digits --layersList 10 --convList 8 4 1 --kernelSize 3 "
        "--padding 1 --Fpool 2 --T 12 --Kmax 4 --beta 0.5 --gamma 0.5 0.5 0.5 --gradThreshold 1e-4 1e-4 1e-4 "
        "--lrBias 0.05 0.05 0.05 --batchSize 32 --seed 5")


# binary neurons (issue 18): the fc line's network with 10 output neurons a class
BIN_W_N = (" --binary_settings bin_W_N --activationFun heaviside --layersList 64 256 100 --expand_output 10 "
           "--beta 2")


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_VARIABLES + ("OMP_NUM_THREADS",)}
    e.update(EP_NO_PROGRESS="1", PYTHONPATH=ROOT, **extra)
    return e


def torchrun(args, nproc=2, script="main.py", log_dir=None):
    """``python -m torch.distributed.run --standalone --nproc_per_node nproc script args``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    if log_dir is not None:  # each worker's stderr into <log_dir>/<run id>/attempt_0/<rank>/stderr.log
        launcher += ["--log-dir", str(log_dir), "--redirects", "2"]
    return launcher + [script] + [str(a) for a in args]


def run(command, timeout=240):
    return subprocess.run(command, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout)


def worker_logs(log_dir):
    """{rank: stderr text} of a launch with ``log_dir``."""
    logs = sorted(log_dir.glob("*/attempt_0/*/stderr.log"))
    return {int(p.parent.name): p.read_text() for p in logs}


def our_traceback(err):
    """Traceback lines from the project's code (torchrun prints its own for a failed worker)."""
    return [line for line in err.splitlines() if "binary_ep/" in line or 'main.py", line' in line]


def only_run(out):
    runs = list(out.glob("DATA-0-*/*/S-*"))
    assert len(runs) == 1, runs
    return runs[0]


# ----------------------------------------------------------------------------------------------
# in-process pieces
# ----------------------------------------------------------------------------------------------
def test_shares_split_every_batch_evenly_in_rank_order_and_may_be_empty():
    assert [share_bounds(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [share_bounds(1, r, 3) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
    for n, world in ((64, 2), (65, 3), (7, 8)):
        parts = [share_bounds(n, r, world) for r in range(world)]
        assert [list(t.shape)[0] for t in torch.arange(n).tensor_split(world)] == [hi - lo for lo, hi in parts]
        assert parts[0][0] == 0 and parts[-1][1] == n and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    (x, y), _ = load_digits_split()
    x, y = x[:67], y[:67]
    one = list(TensorBatches(x, y, 32, True, torch.Generator().manual_seed(3)))
    shares = [list(TensorBatches(x, y, 32, True, torch.Generator().manual_seed(3), share=(r, 3))) for r in range(3)]
    assert TensorBatches(x, y, 32, True).global_sizes == [32, 32, 3]
    for k, (xb, yb) in enumerate(one):  # the same samples as one process, in rank order
        assert torch.equal(torch.cat([s[k][0] for s in shares]), xb)
        assert torch.equal(torch.cat([s[k][1] for s in shares]), yb)
    assert [len(s[2][1]) for s in shares] == [1, 1, 1] and [len(s[0][1]) for s in shares] == [11, 11, 10]
    tiny = [list(TensorBatches(x[:1], y[:1], 32, False, share=(r, 2))) for r in range(2)]
    assert tiny[0][0][0].shape == (1, 1, 8, 8) and tiny[1][0][0].shape == (0, 1, 8, 8)  # an empty share


@pytest.mark.parametrize("line, estimator", [(FC, "ep"), (FC, "bptt"), (CONV, "ep")])
def test_the_estimators_divide_by_the_global_batch_so_shares_add_up(line, estimator):
    """Two halves of a batch, each normalised by the whole batch, add up to the whole batch's
    gradient (the contract ``Replicas.combine`` relies on; BPTT's loss too)."""
    _, args, _ = main.parse(line.split() + ["--outDir", "/tmp"])
    torch.manual_seed(0)
    net = main.build_network(args).double()
    tools = main.architecture(args.archi)[1]
    (x, y), _ = load_digits_split()
    x, y = tools.prepare_images(net, x[:20].double()), y[:20]
    est = EP(args.beta) if estimator == "ep" else BPTT(args.T, args.Kmax)

    def grads(lo, hi, batch=None):
        est.compute_gradient(net, x[lo:hi], net.target(y[lo:hi]), batch=batch)
        return [g.clone() for g in net.weight_grads()] + [b.grad.clone() for b in net.biases()]
    with torch.no_grad():
        whole, first, second = grads(0, 20), grads(0, 13, 20), grads(13, 20, 20)
        unscaled = grads(0, 13)
    for w, a, b, u in zip(whole, first, second, unscaled):
        torch.testing.assert_close(a + b, w, rtol=1e-9, atol=1e-12)
        assert float(w.abs().max()) > 0
    assert any(not torch.allclose(u, a) for u, a in zip(unscaled, first))  # the normaliser matters


def test_progress_bars_only_on_rank_0_and_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("EP_NO_PROGRESS", raising=False)
    assert loops.quiet() is None  # tqdm's own test: no bar when stderr is not a terminal
    monkeypatch.setattr(distributed, "_CURRENT", distributed.Replicas(torch.device("cpu"), rank=1, world=2))
    assert loops.quiet() is True
    monkeypatch.setattr(distributed, "_CURRENT", None)
    monkeypatch.setenv("EP_NO_PROGRESS", "1")
    assert loops.quiet() is True


def test_a_half_configured_launcher_environment_is_one_sentence():
    for extra, missing in (({"RANK": "0"}, "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"),
                           ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost"},
                            "MASTER_PORT missing")):
        r = subprocess.run([sys.executable, "main.py"] + FC.split() + ["--outDir", "/tmp/unused"],
                           capture_output=True, text=True, env=env(**extra), cwd=ROOT, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert missing in r.stderr and "torchrun --nproc_per_node" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------
# 2 processes against 1
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line", [FC + " --gamma 1 1 --gradThreshold 1e-3 1e-3",
                                  CONV + " --gamma 1 1 1 --gradThreshold 1e-3 1e-3 1e-3",
                                  FC + BIN_W_N + " --gamma 1 1 --gradThreshold 1e-3 1e-3"],
                         ids=["fc", "conv", "fc-bin_W_N"])
def test_one_step_on_two_processes_gives_the_one_process_gradient_and_flips(line, tmp_path):
    """The same weights, the first global batch of 32 digits: the one-process run relaxes it in two
    CPU streams of 16, each rank its 16 alone, so the states agree bit for bit, and the gathered
    factors of the fc input layer are the one-process factors (its gradient is bit for bit the
    same).  Every other gradient is a sum of the same products in another order (two partial
    sums over 16 samples added up, instead of one sum over 32; for a convolution, over every
    position too): the bound is 64 float32 units in the last place of the tensor's largest
    entry, |g2 - g1| <= 64 u max|g1| (u = 2^-24; measured: at most 0.3 of it; a lost or
    mis-normalised share would be off by about max|g1| itself).  A flip (w m > threshold alpha,
    with m = gamma g after one step from m = 0) may then differ only where w m lies within alpha
    gamma times that bound of the threshold; those weights are counted (expected: none or a
    handful).  Then (fc) rank 1's first weight is made to differ: the comparison of the replicas
    that ends every epoch stops both ranks with the same sentence (conv: it finds nothing).
    Binary neurons (fc-bin_W_N) send bits: every share's sum is then an integer count, and
    1/(beta B) = 1/64 scales it exactly, so their gradients must agree bit for bit."""
    ref, two = tmp_path / "one", tmp_path / "two"
    ref.mkdir(), two.mkdir()
    argv = line.split() + ["--outDir", str(tmp_path)]
    one = subprocess.run([sys.executable, "tests/dp_one_step.py", str(ref)] + argv, capture_output=True,
                         text=True, env=env(OMP_NUM_THREADS="2"), cwd=ROOT, timeout=120)
    assert one.returncode == 0, one.stderr
    drift = "1" if "fc" in line else ""  # fc: then rank 1's first weight is made to differ
    r = subprocess.run(torchrun([str(two)] + argv, script="tests/dp_one_step.py"), capture_output=True,
                       text=True, env=env(EP_TEST_DRIFT=drift), cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    a = torch.load(ref / "rank0.pt")
    ranks = [torch.load(two / f"rank{k}.pt") for k in range(2)]
    assert a["threads"] == 2 and a["world"] == 1 and [b["threads"] for b in ranks] == [1, 1]
    for k in ("grads", "bias_grads", "after"):  # every rank holds the same gradient and takes the same steps
        assert all(torch.equal(g0, g1) for g0, g1 in zip(ranks[0][k], ranks[1][k]))
    b = ranks[0]
    # distributed.stop ended the process group with its gloo threads: one left running would
    # release its last work while Python shuts down and abort the process (SIGABRT; it did,
    # while the optimizers' first import of torch._dynamo kept the group alive)
    assert [r["gloo_threads_after_stop"] for r in ranks] == [[], []], ranks[0]["gloo_threads_after_stop"]
    assert a["drift"] is None
    if drift:  # the end-of-epoch comparison stops both ranks with one sentence naming the tensor
        assert ranks[0]["drift"] == ranks[1]["drift"] == (
            "the replicas drifted apart: after epoch 1, rank 1 holds other values than rank 0 in "
            "W.0.weight; please report this with the command line"), ranks[0]["drift"]
    else:
        assert ranks[0]["drift"] is None and ranks[1]["drift"] is None
    assert all(torch.equal(w1, w2) for w1, w2 in zip(a["weights"], b["weights"]))  # the same start
    if "fc" in line:
        assert a["factored"] == [False, True] and b["factored"] == [False, True]  # the factors were gathered
        assert torch.equal(a["grads"][1], b["grads"][1])  # the same factors, the same product
    ratios, near, differ = [], 0, 0
    for g1, g2 in zip(a["grads"] + a["bias_grads"], b["grads"] + b["bias_grads"]):
        ratios.append(float((g2 - g1).abs().max() / (64 * U * g1.abs().max())))
    assert max(ratios) <= 1.0, ratios
    if "bin_W_N" in line:  # bits: every share's sum is an integer count, times 1/(beta B) = 2^-6: exact
        assert max(ratios) == 0.0, ratios
    for w, g1, after1, after2, thr, gamma in zip(a["weights"], a["grads"], a["after"], b["after"],
                                                 a["thresholds"], a["gammas"]):
        alpha = w.abs()  # weights are +-alpha (per layer, or per output channel)
        margin = w * gamma * g1 - thr * alpha  # the weight flips where > 0
        slack = alpha * gamma * 64 * U * g1.abs().max() + 4 * U * thr * alpha  # + the rule's own rounding
        changed = after1 != after2
        near += int((margin.abs() <= slack).sum())
        differ += int(changed.sum())
        assert not bool((changed & (margin.abs() > slack)).any())  # a different flip only near the threshold
        assert int((after1 != w).sum()) > 0  # the step did flip weights
    print(f"largest gradient difference / bound per tensor: {[round(r, 3) for r in ratios]}; weights "
          f"within rounding of the threshold: {near}; flipped differently: {differ}")
    assert differ <= near <= 5


def test_two_processes_learn_like_one_and_rank_0_alone_writes(tmp_path):
    """2 epochs on digits, 1 process against 2 (the second with --device 0 on a machine without
    CUDA: one warning, from rank 0): the test error within 1 point in every epoch; one run folder;
    rank 1 prints nothing at all, rank 0 one line per epoch."""
    argv = FC.split() + ["--epochs", "2"]
    one = run([sys.executable, "main.py"] + argv + ["--outDir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    logs = tmp_path / "logs"
    two = run(torchrun(argv + ["--outDir", str(tmp_path / "two"), "--device", "0"], log_dir=logs))
    assert two.returncode == 0, two.stderr
    df1 = pd.read_csv(only_run(tmp_path / "one") / "results.csv", index_col="epoch")
    run2 = only_run(tmp_path / "two")
    df2 = pd.read_csv(run2 / "results.csv", index_col="epoch")
    print(pd.DataFrame({"one process": df1["test_error"], "two processes": df2["test_error"]}).to_string())
    assert list(df2.index) == [1, 2] and (df2["test_error"] - df1["test_error"]).abs().max() <= 1.0
    assert df2["train_error"].iloc[-1] < 50 and df2["test_error"].iloc[-1] < 50  # it learns (chance: 90)
    assert sorted(p.name for p in run2.iterdir()) == sorted(["Hyperparameters.txt", "results.csv", "checkpoint.pt",
                                                             "run.lock", "errors.png", "losses.png",
                                                             "fliprates.png", "alpha.png"])
    assert torch.load(run2 / "checkpoint.pt", weights_only=False)["epoch"] == 2
    log = worker_logs(logs)
    assert sorted(log) == [0, 1] and log[1] == "", log[1]
    lines = log[0].strip().splitlines()
    assert [l for l in lines if l.startswith("epoch ")] == [l for l in lines[-2:]] and len(lines) == 4, lines
    assert lines[0].startswith("warning: --device 0 asked for a GPU") or torch.cuda.is_available()
    assert lines[1] == f"run folder: {run2}"
    hyper = (run2 / "Hyperparameters.txt").read_text()
    assert "--seed 5" in hyper and hyper.count("command:") == 1


def test_resume_with_two_processes_and_with_one(tmp_path):
    """A 2-process run of 3 epochs, against one stopped after epoch 1, resumed with 2 processes to
    epoch 2 (bit for bit the same rows) and with 1 process to epoch 3 (within 1 point).  A drawn
    seed is rank 0's (the run repeats from its Hyperparameters.txt)."""
    argv = FC.replace("--seed 5", "").split()
    whole = run(torchrun(argv + ["--epochs", "3", "--outDir", str(tmp_path / "whole")]))
    assert whole.returncode == 0, whole.stderr
    ref = only_run(tmp_path / "whole")
    seed = torch.load(ref / "checkpoint.pt", weights_only=False)["args"]["seed"]
    assert f"--seed {seed}" in (ref / "Hyperparameters.txt").read_text()
    first = run(torchrun(argv + ["--seed", str(seed), "--epochs", "1", "--outDir", str(tmp_path / "parts")]))
    assert first.returncode == 0, first.stderr
    part = only_run(tmp_path / "parts")
    second = run(torchrun(["--resume", str(part), "--epochs", "2"]))
    assert second.returncode == 0 and f"resuming {part} after epoch 1" in second.stderr, second.stderr
    third = run([sys.executable, "main.py", "--resume", str(part), "--epochs", "3"])
    assert third.returncode == 0, third.stderr
    rows = {name: pd.read_csv(p / "results.csv", index_col="epoch").drop(columns="epoch_seconds")
            for name, p in (("whole", ref), ("parts", part))}
    pd.testing.assert_frame_equal(rows["parts"].loc[[1, 2]], rows["whole"].loc[[1, 2]], check_exact=True)
    assert abs(rows["parts"].loc[3, "test_error"] - rows["whole"].loc[3, "test_error"]) <= 1.0
    assert len(list((tmp_path / "parts").glob("DATA-0-*/*/S-*"))) == 1


def test_a_rank_0_failure_reaches_the_other_rank_and_rank_0_alone_exports_and_checks(tmp_path):
    """--resume of a folder another process holds: rank 0 stops with its message, rank 1 at once
    with one line naming rank 0's reason, no traceback from the project.  (Which of the two
    torchrun's summary names as the first failure, rank 0's code 5 or rank 1's 6, is a race.)
    Then --export and --check gdu of that run under the launcher."""
    made = run([sys.executable, "main.py"] + FC.split() + ["--epochs", "1", "--trainSubset", "64",
                                                          "--outDir", str(tmp_path)])
    assert made.returncode == 0, made.stderr
    folder = only_run(tmp_path)
    files.lock_run_folder(folder)
    try:
        logs = tmp_path / "logs"
        r = run(torchrun(["--resume", str(folder), "--epochs", "2"], log_dir=logs), timeout=120)
    finally:
        files.release_run_folders()
    assert r.returncode != 0 and not our_traceback(r.stderr), r.stderr
    log = worker_logs(logs)
    assert log[0].strip().splitlines()[-1].startswith(f"main.py: error: {folder} is in use by process {os.getpid()}")
    assert log[1].strip() == f"main.py: error: rank 0 stopped: {folder} is in use by process {os.getpid()} " \
                             f"(a run, --resume, --check or --export); wait for it to end or stop it, then try again"
    # --export writes one binary_model.npz and --check gdu one new run folder, from rank 0 alone;
    # rank 1 has nothing to do, says nothing and exits 0
    for extra, name in ((["--export"], "export"), (["--check", "gdu"], "gdu")):
        logs = tmp_path / f"logs-{name}"
        r = run(torchrun(["--resume", str(folder)] + extra, log_dir=logs))
        assert r.returncode == 0 and worker_logs(logs)[1] == "", r.stderr
    assert (folder / "binary_model.npz").exists()
    runs = sorted(tmp_path.glob("DATA-0-fc-digits/*/S-*"))
    assert [p.name for p in runs] == ["S-1", "S-2"] and (runs[1] / "gdu.csv").exists()


def test_a_divergence_one_rank_sees_stops_every_rank_at_the_same_batch(tmp_path):
    """A NaN in rank 1's share of batch 3: the failed check is summed over the ranks, so both stop
    after that batch with the same sentence and exit code 3."""
    r = subprocess.run(torchrun(FC.split() + ["--outDir", str(tmp_path)], script="tests/dp_exit_code.py"),
                       capture_output=True, text=True, env=env(EP_TEST_NAN_AT="1:3"), cwd=ROOT, timeout=120)
    lines = [l for l in r.stderr.splitlines() if "diverged" in l]
    assert len(lines) == 2 and lines[0] == lines[1] and not our_traceback(r.stderr), r.stderr
    assert lines[0].startswith("main.py: error: training diverged: a NaN or infinity appeared in the states of "
                               "layer") and "at epoch 1, batch 3" in lines[0], lines[0]
    assert [l for l in r.stderr.splitlines() if l.startswith("worker exit code")] == ["worker exit code 3"] * 2


# ----------------------------------------------------------------------------------------------
# signals, a lost rank, bad launches
# ----------------------------------------------------------------------------------------------
SLOW = ("--device -1 --archi fc --dataset digits --layersList 64 256 10 --T 150 --Kmax 8 --beta 0.5 "
        "--gamma 0.05 0.05 --gradThreshold 1e-4 1e-4 --lrBias 0.05 0.1 --batchSize 16 "
        "--test_batchSize 100 --seed 3 --epochs 4").split()


def launch(args, tmp_path, name, script="main.py"):
    err = open(tmp_path / f"{name}.err", "w")
    p = subprocess.Popen(torchrun(args, script=script), stdout=subprocess.DEVNULL, stderr=err, env=env(), cwd=ROOT)
    err.close()
    return p


def wait_for(condition, timeout=180):
    t0 = time.time()
    while not condition():
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def workers(launcher):
    """{rank: pid} of the launcher's worker processes (its children whose environment has RANK)."""
    found = {}
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == launcher.pid:
                environ = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
                if "RANK" in environ:
                    found[int(environ["RANK"])] = int(pid)
        except (OSError, ValueError, IndexError):
            pass
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_launcher_stops_every_worker_after_the_same_batch(sig, tmp_path):
    """The launcher passes the signal on to its workers; they stop after the same training batch,
    the last finished epoch stays on disk, each worker says one line and exits 128 + signal (the
    workers run main.py's main() through tests/dp_exit_code.py, which also prints that code).
    What torchrun itself prints and returns (a SignalException traceback, exit code 1) is
    PyTorch's."""
    out = tmp_path / "out"
    p = launch(SLOW + ["--outDir", out], tmp_path, "sig", script="tests/dp_exit_code.py")
    wait_for(lambda: bool(list(out.glob("DATA-0-*/*/S-*/checkpoint.pt"))) or p.poll() is not None)
    time.sleep(0.3)  # inside epoch 2
    assert p.poll() is None, (tmp_path / "sig.err").read_text()
    p.send_signal(sig)
    code = p.wait(timeout=120)
    err = (tmp_path / "sig.err").read_text()
    print(f"torchrun exit code {code}; its stderr:\n{err}")
    assert not our_traceback(err), err
    lines = [l for l in err.splitlines() if l.startswith(f"interrupted ({sig.name}")]
    assert len(lines) == 2 and lines[0] == lines[1], err  # one line per worker, the same batch
    codes = [l for l in err.splitlines() if l.startswith("worker exit code")]
    assert codes == [f"worker exit code {128 + sig}"] * 2, err
    run_ = only_run(out)
    done = torch.load(run_ / "checkpoint.pt", weights_only=False)["epoch"]
    df = pd.read_csv(run_ / "results.csv", index_col="epoch")
    assert 1 <= done < 4 and list(df.index) == list(range(1, done + 1)) and not df.isna().any().any()
    assert "every rank stopped after" in lines[0] and (f"epochs 1-{done} are saved" in lines[0] or
                                                       (done == 1 and "epoch 1 is saved" in lines[0]))
    assert not [f for f in os.listdir(run_) if f.endswith(".tmp")]


def test_a_killed_rank_ends_the_job_within_the_timeout(tmp_path):
    out = tmp_path / "out"
    p = launch(SLOW + ["--outDir", out], tmp_path, "kill")
    wait_for(lambda: bool(list(out.glob("DATA-0-*/*/S-*/checkpoint.pt"))) or p.poll() is not None)
    time.sleep(0.3)
    ranks = workers(p)
    assert sorted(ranks) == [0, 1] and p.poll() is None, (tmp_path / "kill.err").read_text()
    os.kill(ranks[1], signal.SIGKILL)
    t0 = time.time()
    code = p.wait(timeout=120)
    seconds = time.time() - t0
    err = (tmp_path / "kill.err").read_text()
    print(f"the job ended {seconds:.1f} s after rank 1 was killed; torchrun exit code {code}; its stderr:\n{err}")
    assert code != 0 and seconds < LOST_RANK_TIMEOUT_S
    assert not our_traceback(err), err
    ours = [l for l in err.splitlines() if l.startswith("main.py: error:")]
    assert ours == [l for l in ours if "rank 1 was lost" in l] and len(ours) == 1, err
    run_ = only_run(out)
    done = torch.load(run_ / "checkpoint.pt", weights_only=False)["epoch"]
    assert list(pd.read_csv(run_ / "results.csv", index_col="epoch").index) == list(range(1, done + 1))


def test_a_rank_lost_in_the_first_epoch_leaves_no_folder_and_says_so(tmp_path):
    """Rank 1 killed before epoch 1 is saved: rank 0 removes the folder it made (only
    Hyperparameters.txt and run.lock were in it) and says there is nothing to resume."""
    out = tmp_path / "out"
    p = launch(SLOW[:SLOW.index("--T") + 1] + ["2000"] + SLOW[SLOW.index("--T") + 2:] + ["--outDir", out],
               tmp_path, "kill")
    wait_for(lambda: bool(list(out.glob("DATA-0-*/*/S-*/Hyperparameters.txt"))) or p.poll() is not None)
    ranks = workers(p)
    assert sorted(ranks) == [0, 1] and p.poll() is None, (tmp_path / "kill.err").read_text()
    os.kill(ranks[1], signal.SIGKILL)
    assert p.wait(timeout=120) != 0
    err = (tmp_path / "kill.err").read_text()
    assert not our_traceback(err), err
    (line,) = [l for l in err.splitlines() if l.startswith("main.py: error:")]
    assert "rank 1 was lost" in line and "nothing to resume" in line and "removed" in line, line
    assert "--resume" not in line and list(out.glob("DATA-0-*/*/S-*")) == [], line


def test_more_ranks_than_the_batch_is_one_sentence_per_rank(tmp_path):
    r = run(torchrun(FC.split() + ["--batchSize", "1", "--outDir", tmp_path]))
    lines = [l for l in r.stderr.splitlines() if l.startswith("main.py: error:")]
    assert r.returncode != 0 and len(lines) == 2 and not our_traceback(r.stderr), r.stderr
    assert "2 ranks cannot share mini-batches of --batchSize 1" in lines[0]
    assert not tmp_path.joinpath("DATA-0-fc-digits").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_beyond_the_node_is_one_sentence(tmp_path):
    r = run(torchrun(FC.split() + ["--device", str(torch.cuda.device_count()), "--outDir", tmp_path]))
    lines = [l for l in r.stderr.splitlines() if l.startswith("main.py: error:")]
    assert r.returncode != 0 and len(lines) == 2 and "does not exist" in lines[0], r.stderr


def test_the_device_of_each_rank_on_a_node_with_two_gpus(monkeypatch):
    """``select_device`` on a (mocked) node with two GPUs: one process takes ``--device N``, a
    rank takes its local GPU for any N >= 0, and a GPU or local rank beyond the node is one
    sentence naming the GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU-{i}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))  # a GPU its build runs on
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_90"])

    def error(message):
        raise ValueError(message)
    assert distributed.select_device(error, -1, local_rank=1) == torch.device("cpu")
    assert distributed.select_device(error, 1) == torch.device("cuda", 1)
    assert distributed.select_device(error, 0, local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^--device 2 does not exist; available GPUs: 0 \(GPU-0\), "
                                         r"1 \(GPU-1\); use -1 for the CPU$"):
        distributed.select_device(error, 2)
    with pytest.raises(ValueError, match=r"^local rank 2 has no GPU of its own: this node has 2 "):
        distributed.select_device(error, 0, local_rank=2)


HEARTBEAT_EXIT = """
import os, sys, time
import torch.distributed as dist
from binary_ep import heartbeat
server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(server.port))
heartbeat.HEARTBEAT_S = 0  # beat without pause: the thread is nearly always inside a store call
beat = heartbeat.Heartbeat(0, 2)
time.sleep(0.3)
assert server.add(beat.keys[0], 0) > 10, "the heartbeat did not beat"
beat.stop()
sys.exit(0)
"""


def test_a_stopped_heartbeat_lets_the_process_exit_without_an_abort():
    """A daemon thread still inside a store call when Python shuts down aborts the process
    ("terminate called without an active exception", SIGABRT): ``stop`` waits for the thread."""
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", HEARTBEAT_EXIT], capture_output=True, text=True,
                           env=env(), cwd=ROOT, timeout=60)
        assert r.returncode == 0 and r.stderr == "", (r.returncode, r.stderr)


# ----------------------------------------------------------------------------------------------
# a rank blocked on a peer that hangs: the heartbeat's watchdog ends it (DESIGN.md section 9)
# ----------------------------------------------------------------------------------------------
LOST = "main.py: error: rank 1 was lost (its process ended or stopped responding); rank 0 stops too"
HUNG_RANK_BOUND_S = 8  # stated: 3.5 s after this rank starts waiting on a hung peer; slack for load
# short epochs (8 batches of T=10), many of them: rank 1 is stopped while training goes on
HANG = ("--device -1 --archi fc --dataset digits --layersList 64 256 10 --T 10 --Kmax 6 --beta 0.5 "
        "--gamma 1e-3 1e-3 --gradThreshold 3e-5 3e-5 --lrBias 0.05 0.1 --batchSize 32 --test_batchSize 360 "
        "--trainSubset 256 --epochs 60 --seed 5").split()


class Exits:
    """A stand-in for ``os._exit`` that records the code (and the time) instead of exiting."""

    def __init__(self):
        self.codes, self.at = [], None

    def __call__(self, code):
        self.codes.append(code)
        self.at = time.monotonic()


def peer_beats(server, key, seconds):
    """Count up ``key`` as a live peer would, for ``seconds``, in a thread of its own."""
    def beat():
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            server.add(key, 1)
            time.sleep(0.02)
    thread = threading.Thread(target=beat)
    thread.start()
    return thread


def test_a_rank_waiting_on_a_peer_whose_heartbeat_stood_still_says_one_line_and_exits_6(
        monkeypatch, tmp_path, capsys):
    """In-process, with the launcher's store: while rank 0 waits in a collective (``waiting``)
    and rank 1 beats, nothing happens; once rank 1's count stands still for LOST_AFTER_S, rank 0's
    watchdog prints the line main prints for a lost rank, with the state of the run folder, and
    exits 6.  A rank not waiting on the others is left alone, however still its peer."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setattr(heartbeat, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(heartbeat, "LOST_AFTER_S", 0.8)
    state = Progress()
    state.path, state.done, state.epoch = str(tmp_path / "S-1"), 2, 3
    exits = Exits()
    beat = heartbeat.Heartbeat(0, 2, describe=distributed.lost_line(state, 0), exit_process=exits)
    try:
        time.sleep(1.0)  # rank 1 silent, but rank 0 is not waiting on it
        assert exits.codes == [] and beat.thread.is_alive()
        with beat.waiting():
            peer_beats(server, beat.keys[1], 1.0).join()  # a live peer, beating
            assert exits.codes == []
            stood_still = time.monotonic()
            wait_for(lambda: exits.codes, timeout=5)
    finally:
        beat.stop()
    assert exits.codes == [distributed.STOPPED]
    assert 0.75 <= exits.at - stood_still <= 0.8 + 1.5, exits.at - stood_still  # LOST_AFTER_S, plus beats
    assert capsys.readouterr().err.splitlines() == [
        f"{LOST}; epochs 1-2 are saved; continue with: python main.py --resume {tmp_path}/S-1"]


def test_the_watchdog_removes_nothing_and_says_an_unfinished_folder_holds_nothing_to_resume(
        monkeypatch, tmp_path, capsys):
    """Rank 0's folder with no finished epoch is what main removes after a lost rank; the
    watchdog thread deletes nothing (it ends the process at once) and says so."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setattr(heartbeat, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(heartbeat, "LOST_AFTER_S", 0.3)
    folder = tmp_path / "S-1"
    folder.mkdir()
    (folder / "Hyperparameters.txt").write_text("x\n")
    monkeypatch.setattr(run_folder, "_CREATED", {str(folder)})  # made by this process
    state = Progress()
    state.path, state.epoch = str(folder), 1
    exits = Exits()
    beat = heartbeat.Heartbeat(0, 2, describe=distributed.lost_line(state, 0), exit_process=exits)
    try:
        with beat.waiting():
            wait_for(lambda: exits.codes, timeout=5)
    finally:
        beat.stop()
    assert exits.codes == [distributed.STOPPED] and os.listdir(folder) == ["Hyperparameters.txt"]
    assert capsys.readouterr().err.splitlines() == [
        f"{LOST}; no epoch finished, so there is nothing to resume in {folder}"]


class FakeEvent:
    """``torch.cuda.Event`` on a machine without a GPU: the device passes it when ``done`` is set."""
    done = False

    def record(self):
        pass

    def query(self):
        return FakeEvent.done


def test_on_cuda_a_rank_waits_until_its_gpu_has_passed_the_collective(monkeypatch, tmp_path, capsys):
    """Under NCCL a collective returns at once and the host waits later, in the batch's read:
    after the collective's block the rank still counts as waiting while the GPU has not passed
    the event recorded at its end (a peer silent meanwhile ends it), and not once it has."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setattr(heartbeat, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(heartbeat, "LOST_AFTER_S", 0.3)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(FakeEvent, "done", True)
    exits = Exits()
    beat = heartbeat.Heartbeat(0, 2, torch.device("cuda", 0), exit_process=exits)
    try:
        with beat.waiting():
            pass
        time.sleep(0.8)  # the GPU passed the collective: not waiting, however silent rank 1
        assert exits.codes == []
        FakeEvent.done = False
        with beat.waiting():
            pass
        wait_for(lambda: exits.codes, timeout=5)  # the host is in the batch's read, rank 1 silent
    finally:
        beat.stop()
    assert exits.codes == [distributed.STOPPED] and capsys.readouterr().err.splitlines() == [LOST]


def process_ended(pid):
    """Whether process ``pid`` ended (gone, or a zombie its parent has not reaped yet)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_hung_rank_ends_the_job_rank_0_says_one_line_and_exits_6(tmp_path):
    """Rank 1 stopped (SIGSTOP: its sockets stay open, so no collective fails) after epoch 1 is
    saved: rank 0, blocked in its next collective, exits 6 within the stated bound with the one
    line; then the stopped rank is killed and torchrun ends (it reports rank 0's exit code 6)."""
    out = tmp_path / "out"
    p = launch(HANG + ["--outDir", out], tmp_path, "hang")
    try:
        wait_for(lambda: bool(list(out.glob("DATA-0-*/*/S-*/checkpoint.pt"))) or p.poll() is not None)
        ranks = workers(p)
        assert sorted(ranks) == [0, 1] and p.poll() is None, (tmp_path / "hang.err").read_text()
        os.kill(ranks[1], signal.SIGSTOP)
        t0 = time.monotonic()
        wait_for(lambda: process_ended(ranks[0]), timeout=60)
        seconds = time.monotonic() - t0
    finally:
        for pid in workers(p).values():
            os.kill(pid, signal.SIGKILL)  # works on a stopped process too
        code = p.wait(timeout=60)
    err = (tmp_path / "hang.err").read_text()
    print(f"rank 0 exited {seconds:.1f} s after SIGSTOP of rank 1; torchrun exit code {code}; its stderr:\n{err}")
    assert seconds < HUNG_RANK_BOUND_S and code != 0
    assert not our_traceback(err), err
    (line,) = [l for l in err.splitlines() if l.startswith("main.py: error:")]
    assert line.startswith(LOST), line
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s+exitcode\s*: 6 ", err), err
    run_ = only_run(out)
    done = torch.load(run_ / "checkpoint.pt", weights_only=False)["epoch"]
    assert done >= 1 and list(pd.read_csv(run_ / "results.csv", index_col="epoch").index) == list(range(1, done + 1))
