"""Runs of binary-neuron networks (issue 18, DESIGN.md section 10: ``--binary_settings bin_W_N``):
learning on real data with a bound stated before the run, resume bit for bit, the resume of a
run folder written before binary neurons existed, all in-process through ``main.main``.  (The
data-parallel step of bin_W_N is a line of ``test_data_parallel``'s one-step test.)"""

import os
import shutil

import pandas as pd
import pytest
import torch

import main
from binary_ep import datasets
from test_robustness import assert_same_run, checkpoint, only_run, resumed_equals_whole, temp_files

NEURONS = "--binary_settings bin_W_N --activationFun heaviside --gamma_neur 0.5".split()
CHANCE = 90.0  # % error of a guess among the 10 classes

# fc 64-512-100 on scikit-learn's digits (1437 training, 360 test images), 10 output neurons a
# class: the paper's fc line 13 (T 20, Kmax 10, beta 2, gamma 2e-6, thresholds 2.5e-7 2e-7, lrBias
# 1e-7) with batches of 32 instead of 64 (twice the flips an epoch).  Measured over seeds 0-9
# after 3 epochs: test error 11.4-24.2 % (first-neuron test error within a few points of it).
FC_DIGITS = ("--device -1 --archi fc --dataset digits --layersList 64 512 100 --expand_output 10 "
             "--T 20 --Kmax 10 --beta 2 --random_beta 1 --gamma 2e-6 2e-6 --gradThreshold 2.5e-7 2e-7 "
             "--lrBias 1e-7 1e-7 --batchSize 32 --test_batchSize 360 --seed 0 --epochs 3").split() + NEURONS
FC_DIGITS_BOUND = 40.0  # % test error after 3 epochs (chance: 90)

# the paper's Section 4 conv geometry (kernel 5, padding 1, max-pool 3: 28 -> 26 -> 8 -> 6 -> 2)
# with 16 and 32 channels instead of 256 and 512, 10 output neurons a class, on 2048 Fashion-MNIST
# training images, 3 epochs.  With rho_threshold 0.5 this narrow network goes silent (every state
# below the threshold, every gradient 0) after its first flips and stays at chance; with 0.3 its
# layers stay active.  T 15 suffices there (the free phase's bits stop changing by step 10).
# Measured over seeds 0-5: test error 56.8-65.6 % after 3 epochs (chance: 90).
CONV_FASHION = ("--device -1 --archi conv --dataset fashion_mnist --layersList 100 --expand_output 10 "
                "--convList 32 16 1 --kernelSize 5 --padding 1 --Fpool 3 --T 15 --Kmax 8 --beta 1 "
                "--random_beta 0 --gamma 5e-6 5e-6 5e-6 --gradThreshold 5e-6 5e-6 1.25e-5 "
                "--lrBias 2e-6 5e-6 1e-5 --batchSize 32 --test_batchSize 512 --trainSubset 2048 "
                "--testSubset 512 --seed 0 --epochs 3 --rho_threshold 0.3").split() + NEURONS
CONV_FASHION_BOUND = 75.0  # % test and train error after 3 epochs (chance: 90)

# small and quick, every piece of state a resume must carry: learnt alpha with a decay at epoch 3,
# random sign of beta, non-default neuron constants, 2 output neurons a class (the conv filters
# start at the seeded 2 gamma N(0, 1) draw)
FC_RESUME = ("--device -1 --archi fc --dataset digits --layersList 64 32 20 --expand_output 2 --T 10 "
             "--Kmax 5 --beta 1.5 --random_beta 1 --gamma 1e-3 1e-3 --gradThreshold 2e-4 2e-4 "
             "--lrBias 1e-3 1e-3 --learnAlpha 1 --lrAlpha 1e-3 1e-3 --decayLrAlpha 2 --epochDecayLrAlpha 3 "
             "--batchSize 16 --trainSubset 256 --testSubset 200 --test_batchSize 200 --seed 7").split() + \
    "--binary_settings bin_W_N --activationFun heaviside --rho_threshold 0.45 --gamma_neur 0.6".split()
CONV_RESUME = ("--device -1 --archi conv --dataset digits --layersList 20 --expand_output 2 --convList 8 4 1 "
               "--kernelSize 3 --padding 1 --Fpool 2 --T 8 --Kmax 4 --beta 1 --random_beta 1 "
               "--gamma 1e-3 1e-3 1e-3 --gradThreshold 1e-4 1e-4 1e-4 --lrBias 0.01 0.01 0.01 --learnAlpha 1 "
               "--lrAlpha 1e-3 1e-3 1e-3 --decayLrAlpha 2 --epochDecayLrAlpha 3 --batchSize 16 "
               "--trainSubset 256 --testSubset 200 --test_batchSize 200 --seed 7").split() + \
    "--binary_settings bin_W_N --activationFun heaviside --rho_threshold 0.4 --gamma_neur 0.6".split()

# a bin_W run as every run folder before binary neurons was (rate neurons, one output a class)
BIN_W = ("--device -1 --archi fc --dataset digits --layersList 64 32 10 --T 8 --Kmax 4 --beta 0.5 "
         "--random_beta 1 --gamma 0.01 0.01 --gradThreshold 1e-6 1e-6 --lrBias 0.05 0.1 --learnAlpha 1 "
         "--lrAlpha 1e-2 1e-2 --batchSize 16 --test_batchSize 200 --trainSubset 256 --testSubset 200 "
         "--seed 7").split()
NEW_KEYS = ("binary_settings", "rho_threshold", "gamma_neur", "expand_output")


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The figures of each run are not what these tests check (drawing them costs more than the
    small runs themselves): ``main.plot_run`` draws nothing here."""
    monkeypatch.setattr(main, "plot_run", lambda path: None)


def results(out):
    return pd.read_csv(only_run(out) / "results.csv", index_col="epoch")


def test_fc_binary_neurons_learn_digits(tmp_path):
    assert main.main(FC_DIGITS + ["--outDir", str(tmp_path)]) == 0
    df = results(tmp_path)
    print(df[["train_error", "test_error", "train_error_single", "test_error_single"]].to_string())
    assert list(df.index) == [1, 2, 3]
    assert df["test_error"].iloc[-1] < FC_DIGITS_BOUND, df["test_error"].tolist()
    assert df["train_error"].iloc[-1] < FC_DIGITS_BOUND, df["train_error"].tolist()
    # the first neuron of each class alone, a readout of its own: also far from chance
    assert df["test_error_single"].iloc[-1] < 60.0, df["test_error_single"].tolist()
    assert df["test_error"].iloc[-1] < df["test_error"].iloc[0]  # it got better
    assert (df.filter(like="flips_") > 0).all().all()


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """A data folder for Fashion-MNIST, unpacked from Debian's ``dataset-fashion-mnist``."""
    files = [os.path.join(datasets.DEBIAN_FASHION_MNIST, f + ".gz") for f in datasets.MNIST_FILES]
    if not all(os.path.exists(f) for f in files):
        pytest.skip(f"Fashion-MNIST is not installed in {datasets.DEBIAN_FASHION_MNIST} "
                    f"(Debian package dataset-fashion-mnist)")
    return tmp_path_factory.mktemp("data")


def test_conv_binary_neurons_learn_a_fashion_mnist_subset(tmp_path, fashion_dir):
    assert main.main(CONV_FASHION + ["--dataDir", str(fashion_dir), "--outDir", str(tmp_path)]) == 0
    df = results(tmp_path)
    print(df[["train_error", "test_error", "train_error_single", "test_error_single"]].to_string())
    assert list(df.index) == [1, 2, 3]
    assert df["test_error"].iloc[-1] < CONV_FASHION_BOUND, df["test_error"].tolist()
    assert df["train_error"].iloc[-1] < CONV_FASHION_BOUND, df["train_error"].tolist()
    assert (df.filter(like="flips_").loc[2:] > 0).all().all()  # still learning after epoch 1


def check_resume_bit_for_bit(tmp_path, config):
    """3 epochs at once against 1 epoch resumed to 3: results.csv (but epoch_seconds) and every
    tensor of checkpoint.pt equal; the resumed epochs did flip weights and move alpha."""
    ckpt, df = resumed_equals_whole(tmp_path, config, 1, 3)
    assert ckpt["args"]["binary_settings"] == "bin_W_N"
    assert (ckpt["args"]["rho_threshold"], ckpt["args"]["gamma_neur"]) == tuple(
        float(config[config.index(f) + 1]) for f in ("--rho_threshold", "--gamma_neur"))
    assert "test_error_single" in df.columns
    assert (df.filter(like="flips_").loc[2:].sum() > 0).all()
    assert (df.filter(like="alpha_").nunique() > 1).all()
    assert not temp_files(tmp_path)


def test_resume_of_binary_neurons_is_bit_for_bit_fc(tmp_path):
    check_resume_bit_for_bit(tmp_path, FC_RESUME)


def test_resume_of_binary_neurons_is_bit_for_bit_conv(tmp_path):
    check_resume_bit_for_bit(tmp_path, CONV_RESUME)


def strip_new_keys(run):
    """Make ``run`` a folder as written before binary neurons: no ``NEW_KEYS`` in checkpoint.pt's
    saved arguments, nor in any section of Hyperparameters.txt."""
    ckpt = checkpoint(run)
    assert set(NEW_KEYS) & set(ckpt["args"])  # there was something to remove
    for key in NEW_KEYS:
        ckpt["args"].pop(key, None)
    torch.save(ckpt, run / "checkpoint.pt")
    hp = run / "Hyperparameters.txt"
    lines = hp.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.split(":")[0] not in NEW_KEYS]
    assert len(kept) < len(lines)
    hp.write_text("".join(kept))


def test_a_bin_w_folder_from_before_binary_neurons_resumes_as_bin_w(tmp_path):
    """An old folder (no binary_settings, rho_threshold, gamma_neur, expand_output anywhere) trains
    one more epoch exactly as the same folder with those keys does."""
    assert main.main(BIN_W + ["--epochs", "1", "--outDir", str(tmp_path / "new")]) == 0
    new = only_run(tmp_path / "new")
    old = tmp_path / "old" / new.relative_to(tmp_path / "new")
    shutil.copytree(new, old)
    strip_new_keys(old)
    for run in (new, old):
        assert main.main(["--resume", str(run), "--epochs", "2"]) == 0
    assert_same_run(old, new)  # results.csv (but epoch_seconds) and every tensor
    df = pd.read_csv(old / "results.csv", index_col="epoch")
    assert list(df.index) == [1, 2] and "test_error_single" not in df.columns
    assert df.loc[2].filter(like="flips_").sum() > 0
    args = checkpoint(old)["args"]
    assert (args["binary_settings"], args["expand_output"]) == ("bin_W", 1)
    assert "resumed after epoch 1" in (old / "Hyperparameters.txt").read_text()
