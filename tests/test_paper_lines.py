"""The paper's 18 command lines (issue 18), as its authors' repository prints them
(``shared/seed/original-readme-commands.txt``, typos included): each parses to the values it
means, the MNIST ones build their networks and (the cheap ones) train an epoch of Fashion-MNIST,
and the CIFAR-10 one gets past its arguments to the missing data set.  In-process."""

import gzip
import os
import shlex

import pandas as pd
import pytest

import main
from binary_ep import datasets, run_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = os.path.join(ROOT, "..", "shared", "seed", "original-readme-commands.txt")
ABSENT = "(not carried)"  # rho_threshold and gamma_neur describe binary neurons only
# appended to the MNIST lines for a quick epoch; ./data is found to hold Debian's Fashion-MNIST
QUICK = "--trainSubset 64 --testSubset 64 --epochs 1 --T 2 --Kmax 1".split()


def paper_lines():
    """The 18 command lines, each as ``shlex.split`` gives it without ``python main.py``."""
    with open(COMMANDS, encoding="utf-8") as f:
        lines = [shlex.split(line) for line in f if line.startswith("python main.py")]
    assert len(lines) == 18 and all(line[:2] == ["python", "main.py"] for line in lines)
    return [line[2:] for line in lines]


def _variants(base, *changes):
    """``base`` then ``base`` updated by each of ``changes`` in turn (not cumulative)."""
    return [base] + [{**base, **c} for c in changes]


BPTT = {"optim": "bptt"}
_FC1 = dict(archi="fc", dataset="mnist", binary_settings="bin_W", layersList=[784, 4096, 10],
            convList=[64, 32, 1], padding=0, kernelSize=5, Fpool=2, activationFun="hardsigm", T=50,
            Kmax=10, beta=0.3, random_beta=1, gamma=[1e-5, 1e-4], gradThreshold=[5e-7, 5e-7],
            lrBias=[0.025, 0.05], learnAlpha=0, lrAlpha=[0.0, 0.0], decayLrAlpha=1.0,
            epochDecayLrAlpha=1, expand_output=1, rho_threshold=ABSENT, gamma_neur=ABSENT,
            optim="ep", epochs=50)
_FC2 = {**_FC1, "layersList": [784, 4096, 4096, 10], "T": 250, "gamma": [5e-6, 2e-5, 2e-5],
        "gradThreshold": [5e-7] * 3, "lrBias": [0.025, 0.05, 0.1], "lrAlpha": [0.0] * 3}
_CONV = {**_FC1, "archi": "conv", "layersList": [10], "convList": [64, 32, 1], "padding": 2, "T": 150,
         "gamma": [5e-8] * 3, "gradThreshold": [1e-8] * 3, "lrBias": [0.025, 0.05, 0.1],
         "lrAlpha": [0.0] * 3}
_CIFAR = {**_CONV, "dataset": "cifar10", "convList": [256, 256, 128, 64, 3], "gamma": [2e-7] * 5,
          "gradThreshold": [1e-8] * 5, "lrBias": [0.025, 0.05, 0.1, 0.2, 0.4], "lrAlpha": [0.0] * 5,
          "epochs": 500}
_BIN_FC1 = {**_FC1, "binary_settings": "bin_W_N", "layersList": [784, 8192, 100], "expand_output": 10,
            "activationFun": "heaviside", "T": 20, "beta": 2.0, "gamma": [2e-6, 2e-6],
            "gradThreshold": [2.5e-7, 2e-7], "lrBias": [1e-7, 1e-7], "epochs": 100,
            "rho_threshold": 0.5, "gamma_neur": 0.5}
_BIN_FC2 = {**_BIN_FC1, "layersList": [784, 8192, 8192, 6000], "expand_output": 600, "T": 30,
            "random_beta": 0, "gamma": [1e-6] * 3, "gradThreshold": [2e-8, 1e-8, 5e-8],
            "lrBias": [1e-6] * 3, "lrAlpha": [0.0] * 3}
_BIN_CONV = {**_BIN_FC1, "archi": "conv", "layersList": [700], "convList": [512, 256, 1],
             "expand_output": 70, "padding": 1, "Fpool": 3, "T": 100, "Kmax": 50, "beta": 1.0,
             "gamma": [5e-8] * 3, "gradThreshold": [8e-8, 8e-8, 2e-7], "lrBias": [2e-6, 5e-6, 1e-5],
             "lrAlpha": [0.0] * 3, "epochs": 50}
# line number -> the effective values it must parse to (per-layer lists: output layer first)
EXPECTED = dict(enumerate(
    _variants(_FC1, BPTT, {"learnAlpha": 1, "lrAlpha": [1e-4, 1e-4]})
    + _variants(_FC2, BPTT, {"learnAlpha": 1, "lrAlpha": [1e-2] * 3})
    + _variants(_CONV, BPTT, {"learnAlpha": 1, "lrAlpha": [1e-3] * 3})
    + _variants(_CIFAR, BPTT, {"learnAlpha": 1, "lrAlpha": [1e-4, 1e-2, 1e-2, 1e-2, 1e-2],
                               "decayLrAlpha": 10.0, "epochDecayLrAlpha": 10})
    + _variants(_BIN_FC1, {"learnAlpha": 1, "lrAlpha": [1e-6, 1e-6]})
    + _variants(_BIN_FC2, {"learnAlpha": 1, "lrAlpha": [1e-8] * 3})
    + _variants(_BIN_CONV, {"learnAlpha": 1, "lrAlpha": [1e-5, 1e-3, 1e-3]}), start=1))
GLUED_NOTE = ("main.py: note: read '8e-8--conv_threshold' as the two arguments '8e-8' "
              "'--conv_threshold' (a space was missing)")


def test_every_paper_line_parses_to_what_it_means(tmp_path, capsys):
    lines = paper_lines()
    assert len(EXPECTED) == 18
    wrong = []
    for number, argv in enumerate(lines, start=1):
        capsys.readouterr()
        _, args, used = main.parse(argv + ["--outDir", str(tmp_path)])
        err = capsys.readouterr().err
        got = {name: getattr(args, name, ABSENT) for name in EXPECTED[number]}
        wrong += [f"line {number}: {name} {got[name]!r}, expected {value!r}"
                  for name, value in EXPECTED[number].items() if got[name] != value]
        if err != (GLUED_NOTE + "\n" if number == 18 else ""):
            wrong.append(f"line {number}: stderr {err!r}")
        if number == 18:
            k = used.index("--classi_threshold")
            assert used[k:k + 4] == ["--classi_threshold", "8e-8", "--conv_threshold", "8e-8"]
    assert not wrong, "\n".join(wrong)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def in_data_folder(tmp_path_factory):
    """A fresh working folder whose ./data (the lines' default --dataDir) holds MNIST as
    torchvision keeps it (``data/MNIST/raw``): MNIST cannot be downloaded here, so Debian's real
    Fashion-MNIST files (the same format and sizes) are put there as MNIST's."""
    if not all(os.path.exists(os.path.join(datasets.DEBIAN_FASHION_MNIST, f + ".gz"))
               for f in datasets.MNIST_FILES):
        pytest.skip(f"Debian's Fashion-MNIST ({datasets.DEBIAN_FASHION_MNIST}, package "
                    f"dataset-fashion-mnist) is not installed")
    here, folder = os.getcwd(), tmp_path_factory.mktemp("paper_lines")
    raw = folder / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in datasets.MNIST_FILES:
        with gzip.open(os.path.join(datasets.DEBIAN_FASHION_MNIST, f + ".gz")) as src:
            (raw / f).write_bytes(src.read())
    os.chdir(folder)
    yield folder
    os.chdir(here)


@pytest.mark.parametrize("number", [1, 7, 13, 14, 18])
def test_paper_line_trains_an_epoch(number, in_data_folder, capsys):
    """The MNIST line as printed plus QUICK: one epoch of 64 images, exit 0; line 18
    (the glued '8e-8--conv_threshold') records the flags as meant and a command that re-parses
    to the same arguments."""
    out = in_data_folder / f"out{number}"
    assert main.main(paper_lines()[number - 1] + QUICK + ["--outDir", str(out)]) == 0
    (run,) = out.glob("DATA-0-*-mnist/*/S-1")
    df = pd.read_csv(run / "results.csv", index_col="epoch")
    assert list(df.index) == [1] and 0 <= df["test_error"].iloc[0] <= 100
    binary = number >= 13
    assert ("test_error_single" in df.columns) == binary
    given, effective = run_folder.read_hyperparameters(run)
    assert effective["binary_settings"] == ("bin_W_N" if binary else "bin_W")
    assert ("gamma_neur" in effective, "rho_threshold" in effective) == (binary, binary)
    if number == 18:
        assert capsys.readouterr().err.count(GLUED_NOTE) == 1
        assert (given["classi_threshold"], given["conv_threshold"]) == ("8e-08", "8e-08 2e-07")
        assert effective["gradThreshold"] == "8e-08 8e-08 2e-07"
        command = (run / "Hyperparameters.txt").read_text().splitlines()[1]
        assert command.startswith("command: python main.py ") and "8e-8--" not in command
        again = main.parse(shlex.split(command[len("command: "):])[2:])[1]
        assert {k: run_folder._value(v) for k, v in vars(again).items() if k != "given"} == effective
        assert {k: run_folder._value(v) for k, v in again.given.items() if k != "seed"} == given


# line -> (output units per class, the binary weights' shapes, output layer first)
BUILT = {15: (600, [(6000, 8192), (8192, 8192), (8192, 784)]),
         16: (600, [(6000, 8192), (8192, 8192), (8192, 784)]),
         17: (70, [(700, 2048), (512, 256, 5, 5), (256, 1, 5, 5)])}


@pytest.mark.parametrize("number", sorted(BUILT))
def test_paper_line_builds_its_network(number, tmp_path):
    """Lines too big for an epoch on two cores in a test (or the same network as one that
    trains): parsed and built (conv 17: 28 -> conv 26 -> pool 8 -> conv 6 -> pool 2, 512 x 2 x 2
    = 2048 classifier inputs)."""
    _, args, _ = main.parse(paper_lines()[number - 1] + ["--outDir", str(tmp_path)])
    net = main.build_network(args, "cpu")
    assert net.expand_output == BUILT[number][0] and net.neurons.kind == "binary"
    assert [tuple(w.shape) for w in net.binary_weights()] == BUILT[number][1]
    assert (net.neurons.rho_threshold, net.neurons.gamma_neur) == (0.5, 0.5)


def test_cifar10_line_gets_to_the_missing_data(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    capsys.readouterr()
    code = main.main(paper_lines()[9] + ["--dataDir", str(data), "--outDir", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    # without a usable GPU, --device 0 falls back to the CPU, said in one line of its own
    fallback = "warning: --device 0 asked for a GPU but CUDA is not available; running on the CPU"
    if lines and lines[0].startswith(fallback):
        lines = lines[1:]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"main.py: error: the cifar10 data set is not in {data}/cifar-10-batches-py "
                               f"and could not be downloaded"), lines
    assert list(data.iterdir()) == [] and list(out.iterdir()) == []
