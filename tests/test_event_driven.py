"""Event-driven relaxation of binary neurons (issue 19, ``binary_ep/events.py``): the counts
brought up to date from the bits that changed equal the dense products bit for bit, and so do
whole runs (``EP_EVENT_DRIVEN=1`` against ``EP_EVENT_DRIVEN=0``: ``results.csv`` but the seconds
and the share of incremental steps, every tensor of ``checkpoint.pt``), while the activity
columns show that most steps took the incremental path.  The activity statistics are checked
against counts worked out by hand, and the dense path (CUDA's) reads nothing per step.
In-process; the runs read Debian's Fashion-MNIST (package dataset-fashion-mnist)."""

import csv
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import main
from benchmarks.event_exactness import differences, rows_of
from binary_ep import cpu_kernels, datasets, events, loops
from binary_ep.activity import Activity, ActivityLog, activity_columns
from binary_ep.neurons import BinaryNeurons, count, count_signs

# the paper's Section 4 lines (its authors' repository: lines 13 and 17), --device -1
FC1H = ("--device -1 --dataset fashion_mnist --optim ep --archi fc --binary_settings bin_W_N --layersList 784 "
        "8192 100 --expand_output 10 --activationFun heaviside --T 20 --Kmax 10 --beta 2 --random_beta 1 "
        "--gamma_neur 0.5 --gamma 2e-6 2e-6 --gradThreshold 2.5e-7 2e-7 --lrBias 1e-7 1e-7 --batchSize 64 "
        "--test_batchSize 512 --learnAlpha 0 --rho_threshold 0.5 --seed 3")
CONV = ("--device -1 --dataset fashion_mnist --optim ep --archi conv --binary_settings bin_W_N --layersList 700 "
        "--convList 512 256 1 --expand_output 70 --padding 1 --kernelSize 5 --Fpool 3 --activationFun heaviside "
        "--T 100 --Kmax 50 --beta 1 --random_beta 1 --classi_gamma 5e-8 --conv_gamma 5e-8 5e-8 "
        "--classi_threshold 8e-8 --conv_threshold 8e-8 2e-7 --lrBias 2e-6 5e-6 1e-5 --batchSize 64 "
        "--test_batchSize 512 --learnAlpha 0 --rho_threshold 0.5 --seed 4")


def with_flags(line, **flags):
    """``line`` with each ``--flag value`` of ``flags`` replaced (or added)."""
    argv = line.split()
    for flag, value in flags.items():
        values = str(value).split()
        if f"--{flag}" in argv:
            k = argv.index(f"--{flag}")
            end = next((j for j in range(k + 1, len(argv)) if argv[j].startswith("--")), len(argv))
            argv[k + 1:end] = values
        else:
            argv += [f"--{flag}"] + values
    return argv


# ----------------------------------------------------------------------------------------------
# The parts, against the dense products
# ----------------------------------------------------------------------------------------------
def test_bits_are_what_send_sends():
    """``BinaryNeurons.bits`` (a bool compare) is 1 exactly where ``send`` sends 1: at the
    threshold (H(0) = 1), one float32 step either side of it, and for a threshold that float32
    cannot hold (0.3)."""
    for theta in (0.5, 0.3):
        neurons = BinaryNeurons(theta, 0.5)
        t = torch.tensor(theta, dtype=torch.float32)
        near = torch.stack([t, torch.nextafter(t, torch.tensor(0.0)), torch.nextafter(t, torch.tensor(1.0))])
        s = torch.cat([near, torch.rand(1000, generator=torch.Generator().manual_seed(0)), torch.tensor([0.0, 1.0])])
        assert torch.equal(neurons.bits(s), neurons.send(s) == 1)
        assert neurons.bits(near).tolist() == [True, False, True]


def bit_sequence(shape, steps, rates, seed):
    """``steps`` bool tensors of ``shape``: all ones, then each one flipping a fraction
    ``rates[t]`` of the previous one's bits."""
    g = torch.Generator().manual_seed(seed)
    bits = [torch.ones(shape, dtype=torch.bool)]
    for t in range(1, steps):
        bits.append(bits[-1] ^ (torch.rand(shape, generator=g) < rates[t % len(rates)]))
    return bits


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("feature_major", [True, False])
def test_a_counted_product_kept_from_the_changes_equals_the_dense_count(batch, feature_major, monkeypatch):
    """``Events.product`` over 12 steps of bits changing 0 %, 0.5 % ... 60 % between steps (some
    steps from the changes, some dense, in every order), both layouts, a batch of 1 (where a
    transposed or expanded tensor is no copy): the dense count, bit for bit, each step from
    the changes where at most ``MAX_UNION`` of the outputs changed in some sample; the
    all-ones counts it started from stay as they were."""
    monkeypatch.setattr(events, "MAX_UNION", 0.1)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 53, generator=g)  # 53 inputs, 37 outputs
    signs = count_signs(w)
    matrix, rows = (signs, signs.t().contiguous()) if feature_major else (None, signs.t().contiguous())
    first = count(signs, torch.ones(53, 1), torch.float32)[:, 0]
    kept = first.clone()
    shape = (53, batch) if feature_major else (batch, 53)
    ev = events.Events(True)
    modes = []
    for bits in bit_sequence(shape, 12, [0.0, 0.005, 0.03, 0.6, 0.0, 0.01], seed=batch):
        sent = ev.send(0, bits, 1 if feature_major else 0)
        got = ev.product("p", sent, rows, first, torch.float32, matrix)
        dense = (signs.float() @ bits.float()) if feature_major else bits.float() @ signs.float().t()
        assert torch.equal(got, dense) and got.is_contiguous()
        modes.append(sent.event)
        assert sent.event == (int(sent.changed.any(1 if feature_major else 0).sum()) <= 0.1 * 53)
    assert True in modes[1:] and False in modes and modes[0]  # the first step: no change at all
    assert torch.equal(first, kept)


@pytest.mark.skipif(not cpu_kernels.available(), reason="the compiled CPU kernels cannot be built here")
def test_a_counted_convolution_kept_from_the_changes_equals_the_dense_count(monkeypatch):
    """``Events.conv_counts`` (``cpu_kernels.conv_delta`` on the integer counts) over 10 steps of
    3 samples whose bits change at different rates: each sample from its changes where at most
    ``CONV_MAX_CHANGED`` changed, else recomputed; always the dense count bit for bit."""
    monkeypatch.setattr(events, "CONV_MAX_CHANGED", 0.1)
    g = torch.Generator().manual_seed(2)
    w = torch.sign(torch.randn(6, 4, 3, 3, generator=g)).contiguous(memory_format=torch.channels_last)
    flipped = cpu_kernels.flipped_weight(w)
    ones = torch.ones(1, 4, 7, 7).contiguous(memory_format=torch.channels_last)
    first = F.conv2d(ones, w, padding=1).contiguous(memory_format=torch.channels_last)
    ev = events.Events(True)
    ev.begin()

    def dense(bits):
        return F.conv2d(bits, w, padding=1).contiguous(memory_format=torch.channels_last)
    computed = 0
    for t, bits in enumerate(bit_sequence((3, 4, 7, 7), 10, [0.0, 0.02, 0.5, 0.05], seed=3)):
        sent = ev.send(2, bits.contiguous(memory_format=torch.channels_last), 0, products=False)
        got = ev.conv_counts("c", 2, sent, flipped, first, 1, dense)
        assert torch.equal(got, dense(bits.float().contiguous(memory_format=torch.channels_last)))
        computed = ev.activity.event[2]
    assert 0 < computed < 30  # some sample-steps from the changes, some recomputed


# ----------------------------------------------------------------------------------------------
# The activity statistics, by hand
# ----------------------------------------------------------------------------------------------
def test_activity_counts_by_hand():
    """Two streams of a layer of 3 neurons, feature-major, 2 and 1 samples, 3 steps each.
    Stream A sends [[1,1],[1,1],[1,1]] (no change from the initial all-ones), then
    [[1,0],[0,0],[1,1]] (3 changed: neuron 0 in sample 1, neuron 1 in both), then
    [[1,0],[0,1],[1,1]] (1: neuron 1, sample 1).  Stream B: [1,1,1], [1,1,0] (neuron 2), [1,1,0].
    Active: A 6 + 3 + 4 = 13, B 3 + 2 + 2 = 7; changed: A 0 + 3 + 1, B 0 + 1 + 0; the union over
    the batch per step: {} , {0, 1, 2}, {1}: 4 of 9."""
    a, b = events.Events(False), events.Events(False)
    ra, rb = a.begin(), b.begin()
    t = torch.tensor
    for step_a, step_b in [([[1, 1], [1, 1], [1, 1]], [[1], [1], [1]]),
                           ([[1, 0], [0, 0], [1, 1]], [[1], [1], [0]]),
                           ([[1, 0], [0, 1], [1, 1]], [[1], [1], [0]])]:
        a.send(0, t(step_a, dtype=torch.bool), 1)
        b.send(0, t(step_b, dtype=torch.bool), 1)
    joined = Activity.join([ra, rb])
    assert (int(ra.active[0]), int(rb.active[0]), int(joined.active[0])) == (13, 7, 20)
    assert (int(ra.changed[0]), int(rb.changed[0]), int(joined.changed[0])) == (4, 1, 5)
    assert [m.tolist() for m in joined.union[0]] == [[False] * 3, [True] * 3, [False, True, False]]
    assert (joined.samples[0], joined.steps[0], joined.units[0], joined.event[0]) == (9, 3, 3, 0)
    log = ActivityLog()
    log.add(joined, [joined, joined])  # one free phase, two nudged phases like it
    cols = log.columns(["fc0"])
    assert list(cols) == activity_columns(["fc0"]) == [
        "active_free_fc0", "active_nudged_fc0", "changed_free_fc0", "changed_nudged_fc0",
        "changed_union_free_fc0", "changed_union_nudged_fc0", "incremental_free_fc0", "incremental_nudged_fc0"]
    assert cols["active_free_fc0"] == cols["active_nudged_fc0"] == pytest.approx(100 * 20 / 27)
    assert cols["changed_free_fc0"] == cols["changed_nudged_fc0"] == pytest.approx(100 * 5 / 27)
    assert cols["changed_union_free_fc0"] == pytest.approx(100 * 4 / 9)
    assert cols["incremental_free_fc0"] == 0.0


def test_the_first_step_from_the_initial_states_reads_no_input():
    """A free phase from ``initHidden`` (all ones): its first step sends no change, so every
    product starts from the all-ones counts (``first``), computed once per weight update and
    shared by the streams: two drives of the same weights hold the same tensors."""
    args = main.parse(with_flags(FC1H, layersList="64 40 20", expand_output=2, dataset="digits",
                                 outDir="/tmp"))[1]
    net = main.build_network(args)
    x = torch.rand(4, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        drive = net.input_drive(x)
        phase = net._relax(net.initHidden(4), drive, 1)
    assert [int(phase.activity.changed[k]) for k in (0, 1)] == [0, 0]
    assert phase.activity.event == {0: 4, 1: 4}  # from the changes (there are none)
    assert net.input_drive(x).first[("up", 1)] is drive.first[("up", 1)]
    assert torch.equal(drive.first[("down", 0)], net.W[0].weight.sign().sum(1))


def test_the_dense_path_reads_nothing_while_relaxing(monkeypatch):
    """With ``EP_EVENT_DRIVEN=0`` (what CUDA runs) no tensor value reaches Python while a
    binary-neuron epoch of 4 batches relaxes (``phases``: the statistics are summed as tensors),
    and the epoch's activity is read at its end, once."""
    monkeypatch.setenv("EP_EVENT_DRIVEN", "0")
    args = main.parse(with_flags(FC1H, layersList="64 40 20", expand_output=2, dataset="digits",
                                 T=6, Kmax=3, outDir="/tmp"))[1]
    net = main.build_network(args)
    from binary_ep.datasets import TensorBatches, load_digits_split
    from binary_ep.estimators import EP
    (xtr, ytr), _ = load_digits_split()
    batches = TensorBatches(xtr[:64].flatten(1), ytr[:64], 16, False)
    reads, where = [], {"now": None}
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: (reads.append((where["now"], _n)), _o(self, *a))[1])
    for owner, name, label in ((net, "phases", "relaxing"), (ActivityLog, "columns", "activity")):
        def counted(*a, _f=getattr(owner, name), _label=label, **k):
            where["now"] = _label
            try:
                return _f(*a, **k)
            finally:
                where["now"] = None
        monkeypatch.setattr(owner, name, counted)
    result = loops.train_epoch(net, batches, 1, EP(args.beta), lambda n, x: x)
    assert [r for r in reads if r[0] == "relaxing"] == []
    assert [r for r in reads if r[0] == "activity"] == [("activity", "tolist")]
    assert set(activity_columns(net.layer_names)) <= set(result)
    assert result["incremental_free_fc1"] == 0.0 and 0 < result["active_free_fc1"] < 100


def test_event_driven_only_on_the_cpu(monkeypatch):
    """CUDA stays dense (finding the changes would wait for the host); ``EP_EVENT_DRIVEN=0``
    makes the CPU dense too."""
    assert events.event_driven(torch.device("cpu")) and not events.event_driven(torch.device("cuda"))
    monkeypatch.setenv("EP_EVENT_DRIVEN", "0")
    assert not events.event_driven(torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# Whole runs: event-driven against dense
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if not all(os.path.exists(os.path.join(datasets.DEBIAN_FASHION_MNIST, f + ".gz"))
               for f in datasets.MNIST_FILES):
        pytest.skip(f"Debian's Fashion-MNIST ({datasets.DEBIAN_FASHION_MNIST}, package "
                    f"dataset-fashion-mnist) is not installed")
    return str(tmp_path_factory.mktemp("data"))


def event_and_dense(argv, out, monkeypatch):
    """Run ``argv`` event-driven, then dense, into the same date folder: (S-1, S-2)."""
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("EP_EVENT_DRIVEN", flag)
        assert main.main(argv + ["--outDir", str(out)]) == 0
        (date,) = out.glob("DATA-0-*/*")
        runs.append(str(date / f"S-{len(runs) + 1}"))
    return runs


def assert_same_runs(event, dense, layers):
    """``results.csv`` equal cell for cell but ``epoch_seconds`` and ``incremental_*`` (0 dense),
    ``checkpoint.pt`` equal (``benchmarks/event_exactness.differences``); event-driven, over 75 %
    of every layer's free steps (after the first few, dense) and over 60 % of all steps came
    from the changes, though the nudge keeps the small output layers busy."""
    assert differences(event, dense) == []
    rows = rows_of(event)
    assert len(rows) >= 1 and set(activity_columns(layers)) <= set(rows[0])
    for row in rows:
        shares = {c: float(v) for c, v in row.items() if c.startswith("incremental_")}
        assert all(v > 75 for c, v in shares.items() if c.startswith("incremental_free_")), shares
        assert len(shares) == 2 * len(layers) and sum(shares.values()) / len(shares) > 60, shares
        assert 0 < float(row[f"active_free_{layers[0]}"]) < 100
    assert all(float(v) == 0.0 for c, v in rows_of(dense)[0].items() if c.startswith("incremental_"))
    return rows


def test_fc1h_line_event_driven_equals_dense(data_dir, tmp_path, monkeypatch, capsys):
    """The Section 4 fc-1h line (784-8192-100, T 20, Kmax 10), 2 epochs of 512 + 256
    Fashion-MNIST images (``benchmarks/event_exactness.py fc1h``: the 4,000 + 1,000 of the issue);
    with the activity columns the two runs still plot and summarise (``plotFunctions.py`` in
    their date folder: one group of 2 runs, its final test error theirs)."""
    from test_summary import plot_in_process
    argv = with_flags(FC1H, trainSubset=512, testSubset=256, epochs=2, dataDir=data_dir)
    event, dense = event_and_dense(argv, tmp_path, monkeypatch)
    rows = assert_same_runs(event, dense, ["fc0", "fc1"])
    assert float(rows[-1]["incremental_nudged_fc1"]) > 90  # the hidden layer settles: few changes
    date = os.path.dirname(event)
    code, _, err, drawn = plot_in_process(Path(date), monkeypatch, capsys, save=())
    assert code == 0 and err[-1].startswith("plotted 2 run(s) in 1 group(s)"), err
    assert [label for label, _, _ in drawn["S-1/errors.png"]] == [
        "train error", "test error", "train (first neuron)", "test (first neuron)"]
    with open(os.path.join(date, "summary.csv"), newline="") as f:
        (summary,) = list(csv.DictReader(f))
    assert summary["runs"] == "2" and float(summary["final_test_error_mean"]) == float(rows[-1]["test_error"])


def test_learnt_alpha_and_symmetric_nudging_event_driven_equal_dense(data_dir, tmp_path, monkeypatch):
    """The fc-1h learnt-alpha line (its ``--lrAlpha`` raised so that alpha moves in 2 batches),
    784-2048-100 and with symmetric nudging (two nudged phases from the free fixed point)."""
    for nudging, out in (("one-sided", tmp_path / "alpha"), ("symmetric", tmp_path / "symmetric")):
        argv = with_flags(FC1H, layersList="784 2048 100", trainSubset=128, testSubset=64, epochs=1,
                          learnAlpha=1, lrAlpha="1e-2 1e-2", nudging=nudging, dataDir=data_dir)
        event, dense = event_and_dense(argv, out, monkeypatch)
        assert_same_runs(event, dense, ["fc0", "fc1"])
        rows = rows_of(event)
        assert float(rows[0]["alpha_fc0"]) != float(main.build_network(main.parse(argv)[1]).alphas()[0])


def test_conv_line_event_driven_equals_dense(data_dir, tmp_path, monkeypatch):
    """The Section 4 conv line, its convolutions narrowed to 32 and 16 channels and T 30, Kmax
    10, 64 + 64 images (``benchmarks/event_exactness.py conv``: as printed on 256 + 256)."""
    argv = with_flags(CONV, convList="32 16 1", T=30, Kmax=10, trainSubset=64, testSubset=64, epochs=1,
                      dataDir=data_dir)
    assert_same_runs(*event_and_dense(argv, tmp_path, monkeypatch), ["fc0", "conv0", "conv1"])


@pytest.mark.parametrize("patch_max", [1.0, 0.0])
def test_the_sign_matrices_follow_the_flips(patch_max, monkeypatch):
    """After ``updateWeights`` the cached sign matrices (``signs.SignCache``) equal ones made
    anew from the weights, with their counts of all-ones inputs (tens of flips per batch here,
    a learnt alpha rescaling every weight): the same tensors, patched where the flip rule
    flipped, where few flipped (``PATCH_MAX`` 1), else made anew (``PATCH_MAX`` 0); a weight
    changed by anything else, or moved (``net.double()``), is made anew."""
    from binary_ep import signs
    monkeypatch.setattr(signs, "PATCH_MAX", patch_max)
    args = main.parse(with_flags(FC1H, layersList="64 48 32 20", expand_output=2, dataset="digits", T=4, Kmax=2,
                                 gamma="0.5 0.5 0.5", gradThreshold="1e-9 1e-9 1e-9", lrBias="1e-3 1e-3 1e-3",
                                 learnAlpha=1, lrAlpha="1e-2 1e-2 1e-2", outDir="/tmp"))[1]
    torch.manual_seed(7)
    net = main.build_network(args)
    g = torch.Generator().manual_seed(6)
    weights = [layer.weight for layer in net.W[:-1]]
    kept = [net.signs.get(w) for w in weights]
    tensors = [(m.S, m.ST, m.rows, m.cols) for m in kept]
    flipped = []
    with torch.no_grad():
        for _ in range(3):
            x = torch.rand(16, 64, generator=g)
            free, nudged = net.phases(x, net.target(torch.randint(0, 10, (16,), generator=g)), (2.0,))
            net.computeGradient(x, nudged, free, 2.0)
            flipped.append([int(f) for f in net.updateWeights()[:-1]])
    assert all(sum(f) > 10 for f in zip(*flipped)), flipped
    for w, m, old in zip(weights, kept, tensors):
        now = net.signs.get(w)
        assert (now is m and all(a is b for a, b in zip((m.S, m.ST, m.rows, m.cols), old))) == (patch_max == 1.0)
        fresh = signs.SignMatrix(w)
        assert all(torch.equal(a, b) for a, b in zip((now.S, now.ST, now.rows, now.cols),
                                                     (fresh.S, fresh.ST, fresh.rows, fresh.cols)))
    m = net.signs.get(weights[0])
    with torch.no_grad():
        weights[0][0, 0] *= -1  # not the flip rule: made anew
    assert net.signs.get(weights[0]) is not m and int(net.signs.get(weights[0]).S[0, 0]) == -int(m.S[0, 0])
    net.double()  # new storage (``Module._apply``): made anew, in float64
    assert net.signs.get(weights[0]).rows.dtype == torch.float64
