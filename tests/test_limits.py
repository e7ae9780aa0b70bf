"""Bad values (issue 17, section 3): the range of every numeric flag, the seeds derived from
``--seed``, the memory a network needs checked before it is built, and the effective
``--trainSubset``/``--testSubset`` recorded.  Everything runs in-process."""

import hashlib
import re

import pytest
import torch

import main
import Tools_conv
import Tools_fc
from binary_ep import datasets, limits, memory
from binary_ep.estimators import make_estimator
from binary_ep.vocabulary import UserError

# quick and valid (tests/test_robustness.py QUICK): digits, 64-16-10, a second or so of CPU
QUICK = ("--device -1 --archi fc --dataset digits --layersList 64 16 10 --T 4 --Kmax 2 --beta 0.5 "
         "--gamma 0.01 0.01 --gradThreshold 1e-6 1e-6 --lrBias 0.05 0.1 --batchSize 32 "
         "--test_batchSize 200 --trainSubset 64 --testSubset 64 --seed 1").split()
CONV = ("--device -1 --archi conv --dataset digits --layersList 12 10 --convList 8 4 1 --kernelSize 3 "
        "--padding 1 --Fpool 2 --T 3 --Kmax 2 --beta 0.5 --gamma 0.1 0.1 0.1 0.1 "
        "--gradThreshold 1e-6 1e-6 1e-6 1e-6 --lrBias 0.05 0.1 0.1 0.1 --batchSize 24 "
        "--test_batchSize 40 --seed 0").split()

BIN_W_N = ["--binary_settings", "bin_W_N", "--activationFun", "heaviside"]


def refused(argv, capsys):
    """The one line ``main.parse(argv)`` exits with (exit code 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main.parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("main.py: error: "), err
    return err


# (refused extra flags, fragments of the message, accepted extra flags at the bound)
BOUNDS = [
    (["--T", "1000001"], ["--T", "1..1000000", "got 1000001"], ["--T", "1000000"]),
    (["--Kmax", "1000001"], ["--Kmax", "1..1000000"], ["--Kmax", "1000000"]),
    (["--batchSize", "2147483648"], ["--batchSize", "1..2147483647"], ["--batchSize", "2147483647"]),
    (["--test_batchSize", "0"], ["--test_batchSize", "1..2147483647", "got 0"], ["--test_batchSize", "1"]),
    (["--epochs", "2147483648"], ["--epochs", "1..2147483647"], ["--epochs", "2147483647"]),
    (["--epochDecayLrAlpha", "0"], ["--epochDecayLrAlpha", "1..2147483647"], ["--epochDecayLrAlpha", "1"]),
    (["--trainSubset", "2147483648"], ["--trainSubset", "1..2147483647"], ["--trainSubset", "2147483647"]),
    (["--testSubset", "-5"], ["--testSubset", "1..2147483647", "got -5"], ["--testSubset", "1"]),
    (["--workers", "257"], ["--workers", "0..256", "got 257"], ["--workers", "256"]),
    (["--workers", "-1"], ["--workers", "0..256"], ["--workers", "0"]),
    (["--device", "-2"], ["--device", "-1..127", "got -2"], ["--device", "-1"]),
    (["--device", "128"], ["--device", "-1..127", "got 128"], []),
    (["--seed", "4294967296"], ["--seed", "0..4294967295", "got 4294967296"], ["--seed", "4294967295"]),
    (["--seed", "-1"], ["--seed", "0..4294967295", "got -1"], ["--seed", "0"]),
    (["--seed", "18446744073709551615"], ["--seed", "0..4294967295"], []),
    (["--seed", "-9223372036854775809"], ["--seed", "0..4294967295"], []),
    (["--layersList", "64", "4294967296", "10"], ["--layersList", "1..4294967295", "got 4294967296"],
     ["--layersList", "64", "4294967295", "10"]),
    (["--layersList", "64", "99999999999999999999", "10"], ["--layersList", "1..4294967295"], []),
    (["--kernelSize", "9"], ["--kernelSize", "1..8", "got 9"], ["--kernelSize", "8"]),
    (["--Fpool", "0"], ["--Fpool", "1..8", "got 0"], ["--Fpool", "8"]),
    (["--padding", "9"], ["--padding", "0..8", "got 9"], ["--padding", "8"]),
    # floats: the float32 rounding must be finite, and normal unless 0 is allowed and given
    (["--gradThreshold", "1e300", "1e-6"], ["--gradThreshold", "0 or more", "got 1e+300"],
     ["--gradThreshold", "3.4e38", "0"]),
    (["--gradThreshold", "1e-40", "1e-6"], ["--gradThreshold", "got 1e-40", "subnormal"],
     ["--gradThreshold", "1.2e-38", "0"]),
    (["--lrBias", "1e39", "0.1"], ["--lrBias", "0 or more", "got 1e+39"], ["--lrBias", "3.4e38", "0"]),
    (["--gamma", "1e-45", "0.01"], ["--gamma", "(0, 1]", "got 1e-45"], ["--gamma", "1.2e-38", "1"]),
    (["--learnAlpha", "1", "--lrAlpha", "1e39", "1e-2"], ["--lrAlpha", "got 1e+39"],
     ["--learnAlpha", "1", "--lrAlpha", "3.4e38", "0"]),
    (["--decayLrAlpha", "1e39"], ["--decayLrAlpha", "positive", "got 1e+39"], ["--decayLrAlpha", "3.4e38"]),
    (["--decayLrAlpha", "1e-40"], ["--decayLrAlpha", "positive", "got 1e-40"], ["--decayLrAlpha", "1.2e-38"]),
    (["--learnAlpha", "1", "--lrAlpha", "1e30", "1", "--decayLrAlpha", "1e-10"],
     ["--lrAlpha", "--decayLrAlpha", "1e+40"], ["--learnAlpha", "1", "--lrAlpha", "1e30", "1",
                                                "--decayLrAlpha", "1e-8"]),
    # beta: a normal float32 whose 1/(beta B) stays a normal float32 for B = 1 .. --batchSize
    (["--beta", "1e-40"], ["--beta", "got 1e-40"], ["--beta", "1.2e-38"]),
    (["--beta", "1e39"], ["--beta", "got 1e+39"], ["--beta", "-2.6e36"]),  # 1/(32 * 2^-126) = 2.66e36
    (["--beta", "2.7e36"], ["--beta", "1/(beta B)", "--batchSize 32", "2.66e+36"], ["--beta", "2.6e36"]),
    (["--beta", "1.4e36", "--nudging", "symmetric"], ["--beta", "1/(2 beta B)", "1.33e+36"],
     ["--beta", "1.3e36", "--nudging", "symmetric"]),
    # issue 18: output neurons per class (the output layer has 10 x that many), binary neurons
    (["--expand_output", "214748365"], ["--expand_output", "1..214748364", "got 214748365"],
     ["--expand_output", "214748364", "--layersList", "64", "16", "2147483640"]),
    (["--expand_output", "0"], ["--expand_output", "1..214748364", "got 0"], ["--expand_output", "1"]),
    (BIN_W_N + ["--gamma_neur", "0"], ["--gamma_neur", "(0, 1]", "got 0"], BIN_W_N + ["--gamma_neur", "1"]),
    (BIN_W_N + ["--gamma_neur", "1.0000001"], ["--gamma_neur", "(0, 1]"], BIN_W_N + ["--gamma_neur", "1"]),
    (BIN_W_N + ["--gamma_neur", "1e-40"], ["--gamma_neur", "got 1e-40", "subnormal"],
     BIN_W_N + ["--gamma_neur", "1.2e-38"]),
    (BIN_W_N + ["--rho_threshold", "1.0000001"], ["--rho_threshold", "[0, 1]", "got 1.0000001"],
     BIN_W_N + ["--rho_threshold", "1"]),
    (BIN_W_N + ["--rho_threshold", "-1e-45"], ["--rho_threshold", "[0, 1]"], BIN_W_N + ["--rho_threshold", "0"]),
    (BIN_W_N + ["--rho_threshold", "inf"], ["--rho_threshold", "finite", "got inf"],
     BIN_W_N + ["--rho_threshold", "1e-45"]),
]


@pytest.mark.parametrize("case", range(len(BOUNDS)))
def test_every_numeric_flag_has_a_range(case, capsys, tmp_path):
    bad, fragments, good = BOUNDS[case]
    err = refused(QUICK + bad + ["--outDir", str(tmp_path)], capsys)
    assert all(f in err for f in fragments), err
    if good:  # the bound itself is accepted
        main.parse(QUICK + good + ["--outDir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_conv_sizes_and_split_lists_are_checked(capsys, tmp_path):
    out = ["--outDir", str(tmp_path)]
    err = refused(CONV + ["--convList", "8", "4294967296", "1"] + out, capsys)
    assert "--convList" in err and "1..4294967295" in err
    split = [a for a in CONV if a not in ("--gamma",)]
    i = split.index("0.1")
    split[i:i + 4] = ["--gamma_classi", "0.1", "0.1", "--gamma_conv", "0.1", "1e-45"]
    assert "--gamma_conv" in refused(split + out, capsys)  # the flag as typed is named


def test_resumed_flags_are_range_checked(tmp_path, capsys):
    """--epochs, --workers and --device may change on --resume: they are range-checked too."""
    assert main.main(QUICK + ["--epochs", "1", "--outDir", str(tmp_path)]) == 0
    (run,) = tmp_path.glob("DATA-0-*/*/S-*")
    for extra, fragments in ((["--epochs", "2147483648"], ["--epochs", "1..2147483647"]),
                             (["--workers", "-1"], ["--workers", "0..256"]),
                             (["--device", "-7"], ["--device", "-1..127", "got -7"])):
        err = refused(["--resume", str(run)] + extra, capsys)
        assert all(f in err for f in fragments), err


def test_seed_range_is_in_the_help():
    text = " ".join(main.build_parser().format_help().split())
    assert "0..4294967295" in text and "(seed + 1) mod 2^32" in text
    assert "at most 1000000" in text  # --T, --Kmax


@pytest.mark.parametrize("seed", [0, 7, 2 ** 32 - 1])
def test_derived_seeds_are_distinct_and_in_range(seed):
    seeds = limits.derived_seeds(seed)
    assert set(seeds) == {"torch", "numpy", "data", "beta"}
    assert all(0 <= s < 2 ** 32 for s in seeds.values())
    assert seeds["torch"] == seeds["numpy"] == seeds["data"] == seed  # as every run so far
    assert seeds["beta"] == (seed + 1) % 2 ** 32 != seeds["data"]
    # torch keeps the low 32 bits: the beta generator equals the old manual_seed(seed + 1)'s
    old = torch.Generator().manual_seed(seed + 1)
    new = torch.Generator().manual_seed(seeds["beta"])
    assert torch.equal(torch.rand(8, generator=old), torch.rand(8, generator=new))


def augmentation_draws(seed):
    """The draws ``CIFAR10Images`` makes from a sample's generator: flip, then (top, left)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(0, 2, (1,), generator=g), torch.randint(0, 9, (2,), generator=g)])


def test_augmentation_seeds_are_32_bit_and_draw_as_before():
    cases = [(0, 1, 0), (7, 3, 49999), (2 ** 32 - 1, 12, 123)] + [(5, 1, i) for i in range(200)]
    for seed, epoch, index in cases:
        digest = hashlib.blake2b(f"{seed} {epoch} {index}".encode(), digest_size=8).digest()
        old = int.from_bytes(digest, "little")  # the 8-byte value used before
        new = datasets.augmentation_seed(seed, epoch, index)
        assert 0 <= new < 2 ** 32 and new == old % 2 ** 32
        assert torch.equal(augmentation_draws(old), augmentation_draws(new))


def measured(net, args, x, labels):
    """Bytes of the tensors a network really holds after one EP step on ``x``: parameters,
    gradients, filter buffers, and for the training batch the free and nudged phases' states and
    max-pool indices with the input ``x``."""
    estimator, batch = make_estimator(args, torch.Generator().manual_seed(0)), x.shape[0]
    with torch.no_grad():
        target = net.target(labels)
        estimator.compute_gradient(net, x, target)
        net.updateWeights()
        drive = net.input_drive(x)  # the free and the nudged phase of the batch
        free = net.relax(net.initHidden(batch), drive, args.T)
        phases = (free, net.relax(free.states, drive, args.Kmax, target, args.beta))
    params = list(net.parameters())
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for p in phases
            for t in p.states + [i for v in p.last_step.values() for i in v]}  # shared once
    return {"parameters": sum(p.nbytes for p in params),
            "gradients": sum(p.grad.nbytes for p in params if p.grad is not None),
            "filter buffers": sum(t.nbytes for s in net.optW.state.values() for t in s.values()
                                  if isinstance(t, torch.Tensor)),
            "training batch": sum(held.values()) + x.nbytes}


@pytest.mark.parametrize("line", ["fc", "conv"])
def test_memory_estimate_matches_the_real_tensors(line, tmp_path, one_thread):
    argv = (QUICK if line == "fc" else CONV) + ["--outDir", str(tmp_path)]
    _, args, _ = main.parse(argv)
    torch.manual_seed(0)
    net = main.build_network(args, torch.device("cpu"))
    batch = args.batchSize
    x = (Tools_fc if line == "fc" else Tools_conv).prepare_images(net, torch.rand(batch, 1, 8, 8))
    real = measured(net, args, x, torch.randint(0, 10, (batch,)))
    estimate = memory.estimate(args, "cpu")
    for part in ("parameters", "gradients", "filter buffers"):  # counted exactly
        assert estimate[part] == real[part], part
    # the batch: the free and nudged states and the input really held, plus a scratch set of
    # states and the batch's constants the estimate adds: within a factor 2 above what is held
    assert real["training batch"] <= estimate["training batch"] <= 2 * real["training batch"]
    assert memory.needed_bytes(args, "cpu") == sum(estimate[p] for p in ("parameters", "gradients",
                                                                      "filter buffers")) + \
        max(estimate["training batch"], estimate["test batch"])


NEEDED = re.compile(r"needs at least (\S+) GiB of CPU memory .*but only (\S+) GiB (is )?available")


def test_a_network_larger_than_memory_is_refused_before_it_is_built(tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    assert main.main(QUICK + ["--layersList", "64", "4000000000", "10", "--outDir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("main.py: error: "), err
    m = NEEDED.search(err)
    assert m, err
    _, args, _ = main.parse(QUICK + ["--layersList", "64", "4000000000", "10", "--outDir", str(out)])
    # 64*4e9 + 4e9*10 weights: parameters and filter buffers, the gradient and the transposed
    # copy of the hidden-to-output layer: at least (2 * 2.96e11 + 2 * 4e10) * 4 bytes = 2503 GiB
    need = memory.needed_bytes(args, "cpu")
    assert m.group(1) == memory.gib(need) and need / 2 ** 30 > 2500
    assert 0 < float(m.group(2)) < float(m.group(1))
    assert "--layersList" in err and "--batchSize" in err
    assert not out.exists()


def test_the_available_memory_is_what_the_check_compares_with(tmp_path, monkeypatch):
    _, args, _ = main.parse(QUICK + ["--outDir", str(tmp_path)])
    need = memory.needed_bytes(args, "cpu")
    monkeypatch.setattr(memory, "cpu_available_bytes", lambda: need - 1)
    with pytest.raises(UserError) as e:
        main.build_network(args, torch.device("cpu"))
    m = NEEDED.search(str(e.value))
    assert m and m.group(1) == memory.gib(need) and m.group(2) == memory.gib(need - 1), e.value
    monkeypatch.setattr(memory, "cpu_available_bytes", lambda: need)
    assert main.build_network(args, torch.device("cpu")).W[0].weight.shape == (10, 16)


def test_cpu_available_memory_is_the_smaller_of_meminfo_and_the_cgroup(monkeypatch, tmp_path):
    # cgroup v2 and v1 files, found from /proc/self/cgroup and /proc/self/mountinfo: the least
    # headroom (limit - usage) of the process's cgroup and its parents
    for version, (limit_file, usage_file) in (("2", ("memory.max", "memory.current")),
                                              ("1", ("memory.limit_in_bytes", "memory.usage_in_bytes"))):
        mount = tmp_path / f"cg{version}"
        leaf = mount / "job" / "task"
        leaf.mkdir(parents=True)
        (mount / "job" / limit_file).write_text("3000\n")
        (mount / "job" / usage_file).write_text("1000\n")
        (leaf / limit_file).write_text("max\n" if version == "2" else "9223372036854771712\n")
        (leaf / usage_file).write_text("500\n")
        cgroup, mountinfo = tmp_path / f"cgroup{version}", tmp_path / f"mountinfo{version}"
        cgroup.write_text("0::/job/task\n" if version == "2" else "4:memory:/job/task\n1:cpu:/\n")
        kind = "cgroup2 cgroup2 rw" if version == "2" else "cgroup cgroup rw,memory"
        mountinfo.write_text(f"31 23 0:28 / {mount} rw,relatime - {kind}\n")
        monkeypatch.setattr(memory, "CGROUP", str(cgroup))
        monkeypatch.setattr(memory, "MOUNTINFO", str(mountinfo))
        assert memory.cgroup_headroom() == 2000, version
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000000 kB\nMemAvailable:    500000 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", str(meminfo))
    assert memory.cpu_available_bytes() == 2000  # the cgroup's 2000 bytes are fewer
    monkeypatch.setattr(memory, "cgroup_headroom", lambda: None)
    assert memory.cpu_available_bytes() == 500000 * 1024


def test_train_and_test_subsets_record_the_counts_used(tmp_path):
    argv = [a for a in QUICK if a not in ("--trainSubset", "--testSubset", "64")]
    argv += ["--layersList", "64", "16", "10", "--trainSubset", "100000", "--testSubset", "5000",
             "--epochs", "1", "--outDir", str(tmp_path)]
    assert main.main(argv) == 0
    (run,) = tmp_path.glob("DATA-0-*/*/S-*")
    text = (run / "Hyperparameters.txt").read_text()
    given, effective = text.split("[arguments as given]")[1].split("[effective values]")
    assert "trainSubset: 100000" in given and "testSubset: 5000" in given
    assert "trainSubset: 1437\n" in effective and "testSubset: 360\n" in effective
    saved = torch.load(run / "checkpoint.pt", weights_only=False)["args"]
    assert (saved["trainSubset"], saved["testSubset"]) == (1437, 360)
    # the command as recorded, re-pasted on --resume, is no conflict
    assert main.main(["--resume", str(run), "--trainSubset", "100000", "--epochs", "2"]) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU memory check needs CUDA")
def test_gpu_memory_estimate_is_below_the_peak_and_refuses_what_does_not_fit(tmp_path, capsys):
    device = torch.device("cuda", 0)
    _, args, _ = main.parse(QUICK + ["--device", "0", "--layersList", "64", "2048", "10", "--batchSize",
                                     "256", "--outDir", str(tmp_path)])
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    net = main.build_network(args, device)
    x = torch.rand(args.batchSize, 64, device=device)
    measured(net, args, x, torch.randint(0, 10, (args.batchSize,), device=device))
    peak = torch.cuda.max_memory_allocated(device) - base
    assert memory.estimate(args, "cuda")["training batch"] > 0
    assert peak / 3 <= memory.needed_bytes(args, "cuda") <= peak  # a lower estimate, not a wild one
    _, big, _ = main.parse(QUICK + ["--device", "0", "--layersList", "64", "4000000000", "10",
                                    "--outDir", str(tmp_path)])
    with pytest.raises(UserError, match=r"needs at least \S+ GiB of GPU memory on cuda:0"):
        main.build_network(big, device)
