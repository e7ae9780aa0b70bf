"""CPU streams: with several threads a batch relaxes as single-threaded shares side by side.
The samples of a batch never interact, so the states must be those of the whole batch relaxed
in one piece (to float32 rounding), for both architectures, every phase and both nudgings."""

import pytest
import torch

import main
from binary_ep import datasets, streams
from binary_ep.estimators import nudged_betas

FC = ("--archi fc --layersList 64 48 24 10 --T 30 --Kmax 6 --gamma 1e-4 1e-4 1e-4 "
      "--gradThreshold 2e-5 2e-5 2e-5 --lrBias 0.05 0.05 0.05")
CONV = ("--archi conv --layersList 10 --convList 6 4 1 --kernelSize 3 --padding 1 --Fpool 2 --T 30 "
        "--Kmax 5 --gamma 1e-4 1e-4 1e-4 --gradThreshold 2e-5 2e-5 2e-5 --lrBias 0.05 0.05 0.05")


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("line", [FC, CONV], ids=["fc", "conv"])
@pytest.mark.parametrize("nudging", ["one-sided", "symmetric"])
def test_streams_compute_the_states_of_the_whole_batch(line, nudging, two_threads, monkeypatch):
    args = main.parse(f"--device -1 --dataset digits --beta 0.5 --seed 0 --outDir /tmp --nudging {nudging} "
                      f"{line}".split())[1]
    torch.manual_seed(0)
    net = main.build_network(args)
    (xtr, ytr), _ = datasets.load_digits_split()
    x, y = main.architecture(args.archi)[1].prepare_images(net, xtr[:64]), net.target(ytr[:64])
    with torch.no_grad():
        assert net._streams(64, x.device) == 2 and net._streams(31, x.device) == 1
    assert net._streams(64, x.device) == 1  # autograd on: one stream
    runs = []
    for min_share in (16, 10 ** 6):  # two streams, then one
        monkeypatch.setattr(streams, "MIN_STREAM_BATCH", min_share)
        with torch.no_grad():
            phases = net.phases(x, y, nudged_betas(args.nudging, args.beta))
            (free,) = net.phases(x)
            s, drive = net.free_phase(x)
            s_plus = net.forward([v.clone() for v in s], drive, args.Kmax, y, args.beta)
        assert len(phases) == (3 if nudging == "symmetric" else 2)
        runs.append([v for phase in phases for v in phase.states] + free.states + s + s_plus)
    for a, b in zip(*runs):
        assert a.shape == b.shape and a.stride() == b.stride()  # same memory layout too
        assert float((a - b).abs().max()) < 1e-5
    # the phases themselves are what they say: free == free_phase, nudged moved from it
    two = runs[0]
    n = len(free.states)
    assert all(torch.equal(a, b) for a, b in zip(two[:n], two[-3 * n:-2 * n]))
    assert float((two[n] - two[0]).abs().max()) > 1e-3  # the nudged output moved
    if nudging == "symmetric":  # -beta moves the output the other way
        plus, minus, s0 = two[n], two[2 * n], two[0]
        assert float(((plus - s0) * (minus - s0)).sum()) < 0
