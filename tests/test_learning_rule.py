"""The learning rule, checked: BPTT baseline (``--optim bptt``), EP against BPTT per layer
(``--check gdu``), symmetric nudging, random sign of beta, and memory of the BPTT loop.

Conventions: both estimators are compared as what they write into ``.grad``, i.e. as estimates
of dL/dtheta for L = ||s[0] - y||^2 / 2 summed over the output units, averaged over the batch.
"""

import ctypes
import ctypes.util
import os

import pandas as pd
import pytest
import torch

import main
import Network_conv
import Network_fc
import Tools_fc
from binary_ep import activations, datasets, network
from binary_ep.activations import output_slope
from binary_ep.estimators import BPTT, EP, truncated_gradient
from binary_ep.gdu_check import GDU_COLUMNS, ep_updates, free_trajectory_tail, gdu_rows


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """The tensors here are tiny: one thread is faster than two and does not slow down (busy
    waiting) when the other core is taken by another job.  Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fc_args(layers="64 32 16 10", T=60, Kmax=8, extra=""):
    n = len(layers.split()) - 1
    ones = lambda v: " ".join([v] * n)  # noqa: E731
    return main.parse((f"--device -1 --archi fc --dataset digits --layersList {layers} --T {T} "
                       f"--Kmax {Kmax} --gamma {ones('0.5')} --gradThreshold {ones('0')} "
                       f"--lrBias {ones('0.1')} --seed 0 {extra}").split())[1]


def conv_args(T=60, Kmax=8, extra=""):
    # digits are 8x8: conv 3x3 (padding 1) -> 8x8, pool 2 -> 4x4; conv 3x3 -> 4x4, pool 2 -> 2x2
    return main.parse((f"--device -1 --archi conv --dataset digits --layersList 10 --convList 6 4 1 "
                       f"--kernelSize 3 --padding 1 --Fpool 2 --T {T} --Kmax {Kmax} "
                       f"--gamma 0.5 0.5 0.5 --gradThreshold 0 0 0 --lrBias 0.1 0.1 0.1 --seed 0 "
                       f"{extra}").split())[1]


ARCHIS = ["fc", "conv"]
NETWORKS = {"fc": Network_fc.Network_fc, "conv": Network_conv.Network_conv}


def build(archi, **kw):
    """A float64 network (exact comparisons) and one batch of 32 real digits."""
    args = fc_args(**kw) if archi == "fc" else conv_args(**kw)
    torch.manual_seed(0)
    net = main.build_network(args).double()
    assert type(net) is NETWORKS[archi]
    (xtr, ytr), _ = datasets.load_digits_split()
    x = main.architecture(archi)[1].prepare_images(net, xtr[:32].double())
    return net, args, x, ytr[:32]


def unsaturate_outputs(net):
    """Put the output units inside (0, 1) at the free fixed point: output biases 0.5, output
    weights scaled down (they stay binary: alpha * sign).  The seed's nudge beta (y - s[0]) is
    added after the activation, so on a saturated output unit it moves a state whose true
    gradient is zero; EP's theory (and so the exact match) assumes no such unit."""
    with torch.no_grad():
        net.binary_weights()[0].mul_(0.25)
        net.biases()[0].fill_(0.5)


def table(rows, k):
    df = pd.DataFrame(rows)
    return df[df["k"] == k].set_index(["layer", "quantity"])


# ----------------------------------------------------------------------------------------------
# BPTT estimator
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("archi", ARCHIS)
@pytest.mark.parametrize("T, Kmax", [(12, 12), (30, 7)])
def test_bptt_step_is_the_gradient_of_the_batch_mean_loss(archi, T, Kmax):
    """bptt_step's .grad equals an independent autograd computation: T - Kmax stepper calls
    without graph, Kmax with, loss = mean over the batch of sum_units (out - onehot)^2 / 2
    (read through net.output, so the state layout does not matter)."""
    net, args, x, labels = build(archi, T=T, Kmax=Kmax)
    target = net.target(labels)
    with torch.no_grad():
        s_ret = BPTT(T, Kmax).compute_gradient(net, x, target)
    got = [p.grad.clone() for p in net.binary_weights() + net.biases()]
    params = net.binary_weights() + net.biases()
    with torch.no_grad():
        drive, s = net.input_drive(x), net.initHidden(x.shape[0])
        for _ in range(T - Kmax):
            s = net.stepper(s, drive)
    with torch.enable_grad():
        drive = net.input_drive(x)
        for _ in range(Kmax):
            s = net.stepper(s, drive)
        out = net.output(s)
        loss = 0.5 * ((out - activations.one_hot(labels).double()) ** 2).sum(1).mean()
        want = torch.autograd.grad(loss, params, allow_unused=True)
    for g, w, p in zip(got, want, params):
        w = torch.zeros_like(p) if w is None else w
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12)
    assert any(float(g.abs().max()) > 0 for g in got)
    for a, b in zip(s_ret, s):  # the returned states are the free phase's, detached
        assert not a.requires_grad and a.grad_fn is None
        assert torch.allclose(a, b.detach())
    assert all(p.grad.grad_fn is None and not p.grad.requires_grad for p in params)


# ----------------------------------------------------------------------------------------------
# EP against BPTT
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("archi", ARCHIS)
def test_ep_matches_bptt_per_layer_with_small_beta(archi):
    """Small beta (1e-3), converged free phase (T large), output units inside (0, 1): for every
    k = 1..Kmax the EP update after k nudged steps equals the BPTT gradient through the last k
    free steps, per layer, weights and biases (cosine > 0.99, relative error < 2 %); where BPTT's
    gradient is exactly zero (a layer that cannot reach the output in k steps), so is EP's."""
    net, args, x, labels = build(archi)
    unsaturate_outputs(net)
    target = net.target(labels)
    _, tail, last = free_trajectory_tail(net, x, 1)
    assert max(float((a - b).abs().max()) for a, b in zip(tail[0], tail[1])) < 1e-9  # converged
    s0 = tail[-1][0]
    assert float(s0.min()) > 0 and float(s0.max()) < 1
    df = pd.DataFrame(gdu_rows(net, x, target, 1e-3, args.Kmax))
    assert len(df) == args.Kmax * 2 * len(net.layer_names)
    zero = df["bptt_norm"] == 0
    assert (df.loc[zero, "ep_norm"] < 1e-9).all()
    assert df[~zero]["cosine"].min() > 0.99, df[~zero].sort_values("cosine").head()
    assert df[~zero]["rel_error"].max() < 0.02, df[~zero].sort_values("rel_error").tail()
    final = df[df["k"] == args.Kmax]
    assert (final["bptt_norm"] > 0).all()  # at k = Kmax every layer gets a gradient
    assert final["cosine"].min() > 0.999


@pytest.mark.parametrize("archi", ARCHIS)
def test_saturated_outputs_are_the_gap_between_seed_ep_and_bptt(archi):
    """Untouched network, real digits: some output units sit saturated away from their target.
    One nudged step gives, exactly, EP output-bias gradient = batch mean of (s* - y) while BPTT's
    is the batch mean of rho'(a*) (s* - y): the nudge is added after the activation.  With the
    nudge passed through rho' (diagnostic columns *_slope_nudge) EP matches BPTT again."""
    net, args, x, labels = build(archi, T=150, extra="--beta 1e-3")
    target = net.target(labels)
    _, tail, last = free_trajectory_tail(net, x, 1)
    assert max(float((a - b).abs().max()) for a, b in zip(tail[0], tail[1])) < 1e-12  # converged
    s0 = tail[-1][0]
    slope = output_slope(s0, "hardsigm")
    assert bool(((slope == 0) & (s0 != target)).any())  # the case under study occurs
    rows = gdu_rows(net, x, target, 1e-3, args.Kmax)
    ep1 = ep_updates(net, x, net.input_drive(x), last, target, 1e-3, 1)[0]
    n = len(net.layer_names)
    batch_mean = lambda v: net.output([v]).mean(0)  # noqa: E731 - (B, 10) whatever the layout
    assert torch.allclose(ep1[n], batch_mean(s0 - target), atol=1e-9)
    bptt_bias = batch_mean(slope * (s0 - target))
    assert torch.allclose(truncated_gradient(net, x, tail[-1], target, 1)[0][n], bptt_bias,
                          atol=1e-12)
    df = pd.DataFrame(rows)
    df = df[df["bptt_norm"] > 0]
    assert df["cosine"].min() < 0.95  # the seed's EP visibly departs from the gradient here
    assert df["cosine_slope_nudge"].min() > 0.99
    assert df["rel_error_slope_nudge"].max() < 0.02


@pytest.mark.parametrize("archi", ARCHIS)
def test_symmetric_nudging_is_closer_to_bptt_than_one_sided(archi):
    """Same batch, same beta (0.2, not small): the one-sided estimate carries an O(beta) bias,
    the symmetric one an O(beta^2) bias, so its error against BPTT is smaller, every layer."""
    net, args, x, labels = build(archi, Kmax=8)
    unsaturate_outputs(net)
    target = net.target(labels)
    one = table(gdu_rows(net, x, target, 0.2, args.Kmax, "one-sided"), args.Kmax)
    sym = table(gdu_rows(net, x, target, 0.2, args.Kmax, "symmetric"), args.Kmax)
    assert (one["rel_error"] > 0.02).all()  # beta = 0.2 is visibly biased one-sided
    assert (sym["rel_error"] < 0.5 * one["rel_error"]).all(), pd.concat(
        {"one": one["rel_error"], "sym": sym["rel_error"]}, axis=1)
    assert (sym["cosine"] >= one["cosine"] - 1e-6).all()


@pytest.mark.parametrize("nudging", ["one-sided", "symmetric"])
def test_training_step_writes_the_checked_estimate(nudging):
    """The EP estimator (what training uses) writes the same .grad as the check's EP side after
    Kmax nudged steps, for both nudging modes (so the check verifies the trained estimator)."""
    net, args, x, labels = build("fc", T=60, Kmax=5, extra=f"--nudging {nudging}")
    target = net.target(labels)
    drive, _, free = free_trajectory_tail(net, x, 0)
    want = ep_updates(net, x, drive, free, target, 0.3, args.Kmax, nudging)[-1]
    with torch.no_grad():
        EP(0.3, nudging).compute_gradient(net, x, target)
    got = net.weight_grads() + [p.grad for p in net.biases()]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# --optim bptt end to end, and its memory
# ----------------------------------------------------------------------------------------------
BPTT_DIGITS = ("--device -1 --archi fc --dataset digits --layersList 64 256 10 --T 20 --Kmax 6 "
               "--beta 0.5 --gamma 1e-3 1e-3 --gradThreshold 3e-5 3e-5 --lrBias 0.05 0.1 "
               "--batchSize 32 --test_batchSize 360 --seed 0 --optim bptt --epochs 5")


@pytest.mark.parametrize("activation, bound", [("sigm", 25.0), ("hardsigm", 65.0)])
def test_optim_bptt_trains_digits_well_below_chance(activation, bound, tmp_path):
    """Chance on 10 balanced classes is 90 % test error, and a constant output cannot do better
    than about 88 % on these 360 test digits.  BPTT through the binary optimizer must end 5
    epochs far below that: under 25 % with the smooth ``sigm``; under 65 % with ``hardsigm``,
    where the exact gradient is zero through every saturated output unit, so an output unit that
    starts (or falls) saturated away from its target is never corrected by BPTT (EP's nudge,
    added after the activation, does move it).  Both bounds are many standard errors (~2.6 %)
    away from chance."""
    code = main.main(BPTT_DIGITS.split() + ["--outDir", str(tmp_path), "--activationFun", activation])
    assert code == 0
    (csv,) = tmp_path.glob("DATA-0-fc-digits/*/S-1/results.csv")
    df = pd.read_csv(csv, index_col="epoch")
    assert len(df) == 5
    assert df["test_error"].iloc[-1] < bound, df["test_error"].tolist()
    assert df["train_loss"].iloc[-1] < df["train_loss"].iloc[0]
    assert (df[[c for c in df.columns if c.startswith("flips_")]].sum(axis=1) > 0).all()


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def test_bptt_training_memory_is_flat_over_50_batches():
    """Resident memory (RSS, which does see torch's CPU allocations, unlike tracemalloc) measured
    after each of 50 BPTT training batches grows by less than 16 MiB between batch 10 and batch
    50.  The same loop with a deliberate leak (each batch keeps a T-step graph alive, as a
    forgotten ``loss_sum += loss`` would with a graph through the whole free phase) grows by more
    than 40 MiB, so the measurement does detect kept graphs (a Kmax-step graph, half as big,
    measured 38-74 MiB depending on what the allocator had cached)."""
    args = fc_args("64 512 10", T=20, Kmax=10)
    torch.manual_seed(0)
    net = main.build_network(args)
    (xtr, ytr), _ = datasets.load_digits_split()
    batches = [(xtr[i * 64 % 1344:i * 64 % 1344 + 64], ytr[i * 64 % 1344:i * 64 % 1344 + 64])
               for i in range(50)]

    def growth(leak):
        # memory freed by earlier tests (a large network) stays in the C heap, where a leak could
        # grow without raising RSS: give it back first (glibc), so RSS sees new allocations
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        rss, kept = [], []

        class Recording(BPTT):
            def compute_gradient(self, net, x, target, batch=None):
                s = super().compute_gradient(net, x, target, batch)
                after(s, net, x)
                return s

        def after(s, net, x):
            if leak:
                with torch.enable_grad():
                    kept.append(net.forward([v.clone() for v in s], net.input_drive(x), args.T)[0])
            rss.append(_rss_mib())
        Tools_fc.train_bin(net, batches, 1, Recording(args.T, args.Kmax))
        assert len(rss) == 50
        return rss[-1] - rss[9]

    flat = growth(False)
    leaky = growth(True)
    assert flat < 16.0, flat
    assert leaky > 40.0, leaky  # measured ~140 alone
    assert all(p.grad.grad_fn is None for p in net.binary_weights() + net.biases())


# ----------------------------------------------------------------------------------------------
# --random_beta
# ----------------------------------------------------------------------------------------------
EP_DIGITS = ("--device -1 --archi fc --dataset digits --layersList 64 64 10 --T 15 --Kmax 5 "
             "--beta 0.5 --gamma 1e-3 1e-3 --gradThreshold 3e-5 3e-5 --lrBias 0.05 0.1 "
             "--batchSize 32 --test_batchSize 360 --epochs 2 --seed 7 --trainSubset 640")


_PHASES = network.EPNetwork.phases


def _run_recording_betas(argv, out, monkeypatch):
    betas = []
    original = _PHASES

    def recording(self, x, target=None, nudged=()):
        if target is not None:  # a training batch: one-sided, so one nudged phase
            (beta,) = nudged
            betas.append(beta)
        return original(self, x, target, nudged)
    monkeypatch.setattr(network.EPNetwork, "phases", recording)
    assert main.main(argv.split() + ["--outDir", str(out)]) == 0
    (folder,) = out.glob("DATA-0-fc-digits/*/S-1")
    df = pd.read_csv(folder / "results.csv", index_col="epoch").drop(columns="epoch_seconds")
    model = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    return betas, df, model


def test_random_beta_repeats_exactly_and_draws_both_signs(tmp_path, monkeypatch):
    """--random_beta 1 with a fixed --seed: two runs give the same beta signs, identical
    results.csv (all but epoch_seconds) and identical weights; both signs are drawn, about half
    each; --random_beta 0 keeps beta positive."""
    argv = EP_DIGITS + " --random_beta 1"
    b1, df1, m1 = _run_recording_betas(argv, tmp_path / "a", monkeypatch)
    b2, df2, m2 = _run_recording_betas(argv, tmp_path / "b", monkeypatch)
    assert len(b1) == 2 * 20  # 640 digits in batches of 32, two epochs
    assert b1 == b2
    assert set(b1) == {0.5, -0.5}
    assert 0.3 < sum(b < 0 for b in b1) / len(b1) < 0.7
    pd.testing.assert_frame_equal(df1, df2)
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert df1["test_error"].iloc[-1] < 50.0  # still learns with random signs
    b0, _, m0 = _run_recording_betas(EP_DIGITS, tmp_path / "c", monkeypatch)
    assert set(b0) == {0.5}
    assert not all(torch.equal(m0[k], m1[k]) for k in m0)


# ----------------------------------------------------------------------------------------------
# --check gdu end to end
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nudging", ["one-sided", "symmetric"])
def test_check_gdu_writes_csv_and_png(nudging, tmp_path, capsys):
    argv = (f"--device -1 --archi fc --dataset digits --layersList 64 32 16 10 --T 60 --Kmax 6 "
            f"--beta 0.05 --gamma 1e-3 1e-3 1e-3 --gradThreshold 1e-6 1e-6 1e-6 --lrBias 0.05 0.1 0.1 "
            f"--batchSize 16 --seed 0 --check gdu --nudging {nudging} --outDir {tmp_path}")
    assert main.main(argv.split()) == 0
    (folder,) = tmp_path.glob("DATA-0-fc-digits/*/S-1")
    assert sorted(p.name for p in folder.iterdir()) == ["Hyperparameters.txt", "gdu.csv", "gdu.png", "run.lock"]
    df = pd.read_csv(folder / "gdu.csv")
    assert list(df.columns[:len(GDU_COLUMNS)]) == GDU_COLUMNS
    assert {"free_residual", "saturated_outputs", "samples_with_saturated_error"} <= set(df.columns)
    assert len(df) == 6 * 3 * 2
    assert sorted(df["k"].unique()) == list(range(1, 7))
    assert set(df["layer"]) == {"fc0", "fc1", "fc2"} and set(df["quantity"]) == {"weight", "bias"}
    assert (df["nudging"] == nudging).all() and (df["beta"] == 0.05).all()
    final = df[df["k"] == 6]
    assert final["cosine"].between(-1, 1).all() and (final["rel_error"] >= 0).all()
    assert final["cosine_slope_nudge"].min() > 0.95
    # k = 1: only the output layer can reach s[0]; the others have no gradient (NaN cosine)
    assert df[(df["k"] == 1) & (df["layer"] != "fc0")]["cosine"].isna().all()
    with open(folder / "gdu.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert str(folder) in out and "fc0" in out and "cosine" in out
    assert "--check gdu" in (folder / "Hyperparameters.txt").read_text()


def test_check_gdu_on_a_trained_network_with_resume(tmp_path, capsys):
    """``--resume S-1 --check gdu`` checks the network saved in S-1 (not a fresh one), in a new
    folder, and leaves S-1 as it was."""
    train = EP_DIGITS.split() + ["--outDir", str(tmp_path)]
    assert main.main(train) == 0
    (run,) = tmp_path.glob("DATA-0-fc-digits/*/S-1")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main.main(["--resume", str(run), "--check", "gdu"]) == 0
    assert main.main(train + ["--check", "gdu"]) == 0  # the same settings, untrained network
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    trained = pd.read_csv(run.parent / "S-2" / "gdu.csv")
    fresh = pd.read_csv(run.parent / "S-3" / "gdu.csv")
    assert len(trained) == len(fresh) == 5 * 2 * 2
    assert not trained["bptt_norm"].equals(fresh["bptt_norm"])
    assert "resume" in (run.parent / "S-2" / "Hyperparameters.txt").read_text()
    assert "network of run S-1 after epoch 2" in capsys.readouterr().out
    # trained, the outputs no longer sit saturated away from their targets: EP's final-step
    # update follows BPTT's gradient in every layer (untrained, those outputs open a gap)
    final, first = trained[trained["k"] == trained["k"].max()], fresh[fresh["k"] == fresh["k"].max()]
    assert final["cosine"].min() > 0.95, final  # measured 0.987 - 0.990
    assert first["cosine"].min() < 0.9, first  # measured -0.04 - 0.44


def test_check_gdu_needs_kmax_at_most_t(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse(f"--device -1 --dataset digits --layersList 64 10 --gamma 0.1 --gradThreshold 0 "
                   f"--lrBias 0.1 --T 5 --Kmax 6 --check gdu --outDir {tmp_path}/o".split())
    assert e.value.code == 2
    assert "--Kmax (6) must not exceed --T (5)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
