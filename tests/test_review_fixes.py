"""The defects a review found (issue "Correct where a review found it wrong ..."), each with a
test that fails on the code before the fix: learnt alpha per architecture, the conv gradient's
pool indices, Hyperparameters.txt, resume comparisons, CUDA generator states, full disks, one
writer per run folder, and one host read-back per batch."""

import errno
import os
import shlex
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import main
import Tools_conv
import Tools_fc
from binary_ep import checkpoint, files
from binary_ep.estimators import EP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(line):
    return main.parse(line.split())[1]


def build(line):
    args = parse(line)
    torch.manual_seed(0)
    return main.build_network(args), args


CONV = ("--device -1 --archi conv --dataset digits --layersList 10 --convList 4 2 1 --kernelSize 3 "
        "--padding 1 --Fpool 2 --gamma 1e-9 1e-9 1e-9 --gradThreshold 1e9 1e9 1e9 --lrBias 0.05 0.05 0.05 "
        "--seed 0 --outDir /tmp")
FC = ("--device -1 --archi fc --dataset digits --layersList 64 16 10 --gamma 1e-9 1e-9 "
      "--gradThreshold 1e9 1e9 --lrBias 0.05 0.1 --seed 0 --outDir /tmp")


# ----------------------------------------------------------------------------------------------
# 1. learnt alpha: factor 1 in the conv class, 0.5 in the fc class (the original code's)
# ----------------------------------------------------------------------------------------------
def set_grads(net, weight_grads):
    for w, g in zip(net.binary_weights(), weight_grads):
        w.grad = g
    for b in net.biases():
        b.grad = torch.zeros_like(b)


def test_learnt_alpha_steps_of_a_conv_layer_per_channel_and_of_its_classifier_by_hand():
    """--lrAlpha 0.1 0.2 0.3 (fc0, conv0, conv1); no flips (threshold 1e9)."""
    net, _ = build(CONV + " --learnAlpha 1 --lrAlpha 0.1 0.2 0.3")
    fc0, conv0 = net.fc[0].weight, net.conv[0].weight  # (10, 16) and (4, 2, 3, 3)
    with torch.no_grad():
        conv0.copy_(torch.tensor([0.2, 0.3, 0.4, 0.5]).view(4, 1, 1, 1) * torch.ones_like(conv0))
        conv0[0, 0, 0, 0] = -0.2  # one negative weight in channel 0
        fc0.copy_(torch.full_like(fc0, 0.1))
    g_conv = torch.zeros_like(conv0)  # dL/dW, what .grad holds
    g_conv[0, 0, 0, 0] = 1.0  # channel 0: on its negative weight
    g_conv[3] = 0.05  # channel 3: everywhere
    set_grads(net, [torch.full_like(fc0, 0.01), g_conv, torch.zeros_like(net.conv[1].weight)])
    net.updateWeights()
    # alpha <- alpha - lrAlpha * 1 * sum(grad * w), per output channel:
    # channel 0: sum = 1 * (-0.2) -> 0.2 + 0.2 * 0.2 = 0.24; channels 1, 2: no gradient;
    # channel 3: sum = 0.05 * 0.5 * 18 = 0.45 -> 0.5 - 0.2 * 0.45 = 0.41
    alpha_conv = conv0.detach().abs().flatten(1)
    expected = torch.tensor([0.24, 0.3, 0.4, 0.41]).view(4, 1).expand_as(alpha_conv)
    torch.testing.assert_close(alpha_conv, expected, rtol=0, atol=1e-6)
    assert float(conv0.detach()[0, 0, 0, 0]) == pytest.approx(-0.24, abs=1e-6)  # the sign is kept
    # the classifier (10 x 16), one alpha: sum(grad * w) = 0.01 * 0.1 * 160 = 0.16 -> 0.1 - 0.1 * 0.16 = 0.084
    torch.testing.assert_close(fc0.detach(), torch.full_like(fc0, 0.084), rtol=0, atol=1e-7)
    assert [g["alpha_scale"] for g in net.optW.param_groups] == [1.0, 1.0, 1.0]


def test_learnt_alpha_factor_is_one_half_in_the_fc_class():
    net, _ = build(FC + " --learnAlpha 1 --lrAlpha 0.1 0.1")
    w = net.W[0].weight  # (10, 16)
    with torch.no_grad():
        w.copy_(torch.full_like(w, 0.1))
    set_grads(net, [torch.full_like(w, 0.01), torch.zeros_like(net.W[1].weight)])
    net.updateWeights()
    # 0.1 - 0.1 * 0.5 * (0.01 * 0.1 * 160) = 0.1 - 0.008
    assert float(w.detach().abs().max()) == pytest.approx(0.092, abs=1e-7)
    assert [g["alpha_scale"] for g in net.optW.param_groups] == [0.5, 0.5]


# ----------------------------------------------------------------------------------------------
# 2. the conv weight gradient unpools with the indices the last step used
# ----------------------------------------------------------------------------------------------
def test_conv_gradient_unpools_with_the_pool_indices_of_each_phases_last_step():
    """T = 3, Kmax = 2: neither phase has converged, so the pool indices of the final states
    differ from those the last step used; the gradient must use the latter (a reference built
    from the states one step before the end of each phase)."""
    net, args = build(CONV.replace("--seed 0", "--seed 0 --T 3 --Kmax 2 --beta 0.5"))
    net = net.double()
    from binary_ep.datasets import load_digits_split
    (xtr, ytr), _ = load_digits_split()
    x = Tools_conv.prepare_images(net, xtr[:32].double())
    y = net.target(ytr[:32])
    w, b, nf = net.conv[0].weight, net.conv[0].bias, net.n_fc  # the top convolution (reads conv1)
    with torch.no_grad():
        EP(0.5).compute_gradient(net, x, y)
        got = w.grad.clone()
        drive = net.input_drive(x)
        s = net.initHidden(32)
        for _ in range(2):
            s = net.stepper(s, drive)
        free_prev, free = s, net.stepper(s, drive)
        s = free
        s = net.stepper(s, drive, y, 0.5)
        plus_prev, plus = s, net.stepper(s, drive, y, 0.5)

        def correlation(final, indices_from):
            _, ind = F.max_pool2d(F.conv2d(indices_from[nf + 1], w, b, padding=1), 2, 2, return_indices=True)
            unpooled = F.max_unpool2d(final[nf], ind, 2, 2, output_size=net.geometry[0].conv[1:])
            return torch.nn.grad.conv2d_weight(final[nf + 1], w.shape, unpooled, padding=1)
        c = 1.0 / (0.5 * 32)
        reference = -c * (correlation(plus, plus_prev) - correlation(free, free_prev))
        own_indices = -c * (correlation(plus, plus) - correlation(free, free))
    torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-12)
    assert float((own_indices - reference).abs().max()) > 1e-3  # the two choices do differ here


# ----------------------------------------------------------------------------------------------
# 4-6. Hyperparameters.txt; re-pasting a command with --resume; --outDir with --resume
# ----------------------------------------------------------------------------------------------
# the seed's fc-2h learnt-alpha line, shrunk to digits: 2 values of --lrAlpha for 3 layers
FC2H = ("--device -1 --archi fc -- layersList 64 32 32 10 --activationFun hardsigm --T 6 --Kmax 3 "
        "--beta 0.3 --gamma 5e-3 2e-2 2e-2 --gradThreshold 5e-7 5e-7 5e-7 --dataset digits --lrBias 0.025 "
        "0.05 0.1 --batchSize 64 --test_batchSize 360 --epochs 1 --learnAlpha 1 --lrAlpha 1e-2 1e-2 "
        "--trainSubset 128")


def sections(path):
    """Hyperparameters.txt as (command line, {given}, {effective}, resume lines)."""
    command, given, effective, resumed, current = None, {}, {}, [], None
    for line in open(path).read().splitlines():
        if line.startswith("command: "):
            command = line[len("command: "):]
        elif line.startswith("resumed after epoch"):
            resumed.append(line)
        elif line == "[arguments as given]":
            current = given
        elif line == "[effective values]":
            current = effective
        elif line and current is not None:
            key, _, value = line.partition(": ")
            current[key] = value
    return command, given, effective, resumed


def test_hyperparameters_hold_the_arguments_as_given_the_effective_values_and_a_quoted_command(tmp_path):
    data = tmp_path / "my data"  # a path that needs quoting
    assert main.main(FC2H.split() + ["--outDir", str(tmp_path), "--dataDir", str(data)]) == 0
    (run,) = tmp_path.glob("DATA-0-fc-digits/*/S-1")
    command, given, effective, _ = sections(run / "Hyperparameters.txt")
    # as typed: the two --lrAlpha values, no convList in an fc run, no seed (it was drawn)
    assert given["lrAlpha"] == "0.01 0.01" and given["layersList"] == "64 32 32 10"
    assert "convList" not in given and "seed" not in given and "padding" not in given
    assert given["dataDir"] == str(data)
    # effective: every argument, lists completed, the drawn seed
    assert effective["lrAlpha"] == "0.01 0.01 0.01" and effective["Fpool"] == "2"
    assert effective["seed"].isdigit() and effective["nudging"] == "one-sided"
    # the command is shell-quoted and re-parses to the same arguments, the seed included
    argv = shlex.split(command)
    assert argv[:2] == ["python", "main.py"] and "--seed" in argv and shlex.quote(str(data)) in command
    again = main.parse(argv[2:])[1]
    saved = torch.load(run / "checkpoint.pt", weights_only=False)["args"]
    assert {k: v for k, v in vars(again).items() if k != "given"} == \
        {k: v for k, v in saved.items() if k != "given"}


def test_repasting_an_accepted_command_with_resume_is_no_conflict(tmp_path, capsys):
    argv = FC2H.split() + ["--outDir", str(tmp_path), "--seed", "4"]
    assert main.main(argv) == 0
    (run,) = tmp_path.glob("DATA-0-fc-digits/*/S-1")
    repasted = [a for a in argv if a not in ("--outDir", str(tmp_path))]
    assert main.main(repasted + ["--resume", str(run), "--epochs", "2"]) == 0
    assert list(pd.read_csv(run / "results.csv")["epoch"]) == [1, 2]
    _, _, _, resumed = sections(run / "Hyperparameters.txt")
    assert len(resumed) == 1 and resumed[0].startswith("resumed after epoch 1: python main.py")
    # a real difference is still named
    capsys.readouterr()
    changed = [("1e-3" if a == "1e-2" else a) for a in repasted]
    with pytest.raises(SystemExit) as e:
        main.parse(changed + ["--resume", str(run), "--epochs", "3"])
    assert e.value.code == 2 and "--lrAlpha (saved [0.01, 0.01, 0.01], given [0.001, 0.001, 0.001])" in capsys.readouterr().err


def test_outdir_with_resume_must_be_the_runs_own(tmp_path, capsys):
    assert main.main(FC2H.split() + ["--outDir", str(tmp_path / "out")]) == 0
    (run,) = (tmp_path / "out").glob("DATA-0-fc-digits/*/S-1")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main.parse(["--resume", str(run), "--epochs", "2", "--outDir", str(tmp_path / "elsewhere")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert str(run) in err and "--outDir" in err
    args = main.parse(["--resume", str(run), "--epochs", "2", "--outDir", str(tmp_path / "out")])[1]
    assert args.outDir == str(tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# 7. a checkpoint with more CUDA generator states than the machine has GPUs
# ----------------------------------------------------------------------------------------------
def test_a_checkpoint_with_cuda_generator_states_resumes_on_a_machine_with_fewer_gpus(tmp_path, monkeypatch):
    net, args = build(FC)
    gens = {"data": torch.Generator().manual_seed(1)}
    for w in net.binary_weights():
        w.grad = torch.zeros_like(w)
    for b in net.biases():
        b.grad = torch.zeros_like(b)
    net.updateWeights()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def no_such_devices(*a):
        raise RuntimeError("Invalid device: the checkpoint's states name 4 GPUs, this machine has 1")
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_such_devices)  # saving needs none
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", no_such_devices)
    checkpoint.save_checkpoint(str(tmp_path), net, 1, args, gens)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert "cuda" not in payload["rng"]
    payload["rng"]["cuda"] = [torch.ByteTensor(16)] * 4  # as a 4-GPU machine saved it before
    torch.save(payload, tmp_path / "checkpoint.pt")
    other, _ = build(FC)
    assert checkpoint.load_checkpoint(str(tmp_path), other, {"data": torch.Generator()}) == 1
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))


# ----------------------------------------------------------------------------------------------
# 8. a full disk: one line, no traceback, no temporary file, the last complete epoch intact
# ----------------------------------------------------------------------------------------------
DISK_FC = ("--device -1 --archi fc --dataset digits --layersList 64 512 10 --T 6 --Kmax 3 --beta 0.5 "
           "--gamma 1e-3 1e-3 --gradThreshold 3e-5 3e-5 --lrBias 0.05 0.1 --batchSize 64 "
           "--test_batchSize 360 --seed 0 --trainSubset 256")


def epochs_on_disk(run):
    return (list(pd.read_csv(run / "results.csv")["epoch"]),
            torch.load(run / "checkpoint.pt", weights_only=False)["epoch"])


def temporaries(folder):
    return [p for p in folder.rglob(".*.tmp")]


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("main.py: error") or "Traceback" in line]


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EDQUOT, "the disk quota is exceeded"),
                                         (errno.EIO, "an input/output error")])
def test_a_failed_checkpoint_write_in_epoch_2_keeps_epoch_1_and_resumes(code, words, tmp_path, monkeypatch, capsys):
    real, calls = checkpoint.write_bytes, []

    def failing(path, data):  # the second checkpoint dies half-written, as on a full disk
        calls.append(path)
        if len(calls) != 2:
            return real(path, data)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data[:len(data) // 2])
            raise OSError(code, os.strerror(code))
        files.atomic_write(path, write)
    monkeypatch.setattr(checkpoint, "write_bytes", failing)
    capsys.readouterr()
    assert main.main(DISK_FC.split() + ["--epochs", "3", "--outDir", str(tmp_path)]) == 4
    (run,) = tmp_path.glob("DATA-0-fc-digits/*/S-1")
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("main.py: error: cannot write checkpoint.pt in ") and str(run) in line
    assert words in line and "epoch 1 is saved" in line and f"--resume {run}" in line
    assert epochs_on_disk(run) == ([1], 1)  # results.csv did not get epoch 2 either
    assert not temporaries(tmp_path)
    monkeypatch.undo()  # space freed
    assert main.main(["--resume", str(run)]) == 0
    assert epochs_on_disk(run) == ([1, 2, 3], 3)


def test_a_failed_write_before_the_first_epoch_leaves_nothing(tmp_path, monkeypatch, capsys):
    real = files.atomic_write

    def full(path, write):  # Hyperparameters.txt cannot be written
        if not path.endswith("Hyperparameters.txt"):
            return real(path, write)
        raise files.WriteFailed(os.path.dirname(path), os.path.basename(path), "no space left on the device")
    monkeypatch.setattr(files, "atomic_write", full)
    capsys.readouterr()
    assert main.main(DISK_FC.split() + ["--epochs", "1", "--outDir", str(tmp_path)]) == 4
    (line,) = error_lines(capsys.readouterr().err)
    assert "cannot write Hyperparameters.txt" in line and "nothing was saved" in line
    assert list(tmp_path.glob("DATA-0-fc-digits/*/S-*")) == []


def mount_tmpfs(folder, size):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"this machine cannot mount a tmpfs: {r.stderr.strip()}")


def cli(argv):
    env = dict(os.environ, EP_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "main.py"] + argv, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_real_full_disk_mid_run_and_before_the_first_epoch(tmp_path):
    """A 480 KiB tmpfs holds epoch 1 (a 330 KB checkpoint) but not epoch 2's new checkpoint
    beside the old one; a 100 KiB one not even epoch 1's."""
    small, tiny = tmp_path / "small", tmp_path / "tiny"
    mount_tmpfs(small, "480k")
    try:
        mount_tmpfs(tiny, "100k")
        r = cli(DISK_FC.split() + ["--epochs", "3", "--outDir", str(small)])
        (run,) = small.glob("DATA-0-fc-digits/*/S-1")
        assert r.returncode == 4, r.stderr
        (line,) = error_lines(r.stderr)
        assert "no space left on the device" in line and "epoch 1 is saved" in line and str(run) in line
        assert epochs_on_disk(run) == ([1], 1) and not temporaries(small)
        subprocess.run(["mount", "-o", "remount,size=4m", str(small)], check=True)
        r = cli(["--resume", str(run)])
        assert r.returncode == 0, r.stderr
        assert epochs_on_disk(run) == ([1, 2, 3], 3)
        r = cli(DISK_FC.split() + ["--epochs", "1", "--outDir", str(tiny)])
        assert r.returncode == 4, r.stderr
        (line,) = error_lines(r.stderr)
        assert "no space left on the device" in line and "nothing to resume" in line and "removed" in line
        assert list(tiny.glob("DATA-0-fc-digits/*/S-*")) == [] and not temporaries(tiny)
    finally:
        subprocess.run(["umount", str(tiny)], check=False)
        subprocess.run(["umount", str(small)], check=False)


# ----------------------------------------------------------------------------------------------
# 9. one writer per run folder
# ----------------------------------------------------------------------------------------------
LOCK_FC = DISK_FC.replace("--trainSubset 256", "--trainSubset 1024").replace("--T 6", "--T 40")


def test_two_simultaneous_resumes_give_one_run_one_refusal_and_every_epoch_once(tmp_path):
    assert main.main(LOCK_FC.split() + ["--epochs", "1", "--outDir", str(tmp_path)]) == 0
    (run,) = tmp_path.glob("DATA-0-fc-digits/*/S-1")
    env = dict(os.environ, EP_NO_PROGRESS="1")
    # 29 epochs (about 3 s): the two start together, but one may finish its imports a second
    # later; with 5 epochs (0.5 s) the other had sometimes finished by then (1 run in 6)
    procs = [subprocess.Popen([sys.executable, "main.py", "--resume", str(run), "--epochs", "30"], cwd=ROOT,
                              env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.pid, p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for _, code, _ in results)
    assert codes == [0, 5], results
    (winner,) = [pid for pid, code, _ in results if code == 0]
    (refusal,) = [err for _, code, err in results if code == 5]
    lines = refusal.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refusal, refusal
    assert lines[0] == (f"main.py: error: {run} is in use by process {winner} (a run, --resume, --check "
                        f"or --export); wait for it to end or stop it, then try again")
    assert epochs_on_disk(run) == (list(range(1, 31)), 30)
    assert not temporaries(run)


def test_the_lock_vanishes_with_a_killed_holder_and_names_a_live_one(tmp_path):
    folder = tmp_path / "S-1"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
                               "from binary_ep import files; files.lock_run_folder(sys.argv[2]);"
                               "print('locked', flush=True); sys.stdin.read()", ROOT, str(folder)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(files.FolderInUse) as e:
            files.lock_run_folder(folder)
        assert e.value.pid == str(holder.pid) and str(holder.pid) in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    files.lock_run_folder(folder)  # SIGKILL released it
    assert (folder / "run.lock").read_bytes() == b""  # the lock never writes into the folder
    fd = os.open(folder / "run.lock", os.O_RDONLY)
    try:
        assert files.lock_holder(fd) == str(os.getpid())  # this process holds it now
    finally:
        os.close(fd)
    files.release_run_folders()


def test_a_holder_that_never_writes_its_pid_is_still_named(tmp_path):
    """The holder takes the lock and writes nothing (nor does this suite's lock): the refused
    process names it from the kernel's table of locks, at once."""
    folder = tmp_path / "S-1"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time;"
                               "f = open(os.path.join(sys.argv[1], 'run.lock'), 'a+');"
                               "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB);"
                               "print('locked', flush=True); sys.stdin.read()", str(folder)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (folder / "run.lock").read_text() == ""  # locked, no PID in the file
        with pytest.raises(files.FolderInUse) as e:
            files.lock_run_folder(folder)
        assert e.value.pid == str(holder.pid) and f"process {holder.pid}" in str(e.value)
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------------------------
# 11. one read-back from the device per training batch
# ----------------------------------------------------------------------------------------------
def test_a_training_batch_reads_the_device_once(monkeypatch):
    """Every way a tensor's value reaches Python (bool, int, float, item, tolist, numpy) is
    counted over an epoch of 6 batches: one read per batch, plus the epoch's flip counts."""
    net, args = build(FC.replace("--seed 0", "--seed 0 --T 5 --Kmax 3 --learnAlpha 1 --lrAlpha 1e-3 1e-3"))
    from binary_ep.datasets import TensorBatches, load_digits_split
    (xtr, ytr), _ = load_digits_split()
    batches = TensorBatches(xtr[:96], ytr[:96], 16, False)
    reads = []
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: (reads.append(_n), _o(self, *a))[1])
    torch.set_num_threads(1)  # (the CPU streams add no reads either way)
    try:
        result = Tools_fc.train_bin(net, batches, 1, EP(args.beta))
    finally:
        torch.set_num_threads(2)
    assert len(reads) == 6 + 1, reads
    assert result["train_error"] >= 0 and len(result["flips"]) == 2
