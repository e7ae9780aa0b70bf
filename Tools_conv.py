"""Training, testing and run files of the convolutional network (the seed's ``Tools_conv``).

The loops and the run files are the package's (``binary_ep.loops``, ``binary_ep.run_folder``);
this module gives them what is specific to the conv architecture: its images kept as
(B, C, H, W) in the network's dtype and channels-last memory (the layout its convolutions run
fastest in), its run folders ``DATA-0-conv-<dataset>``, and its layer names, which name the
columns of ``results.csv``.  Layer names follow the per-layer lists (output first): ``fc0``
feeds the 10 output units, ``fc1`` ... the classifier layers below it, then ``conv0`` the top
convolution down to ``conv{N-1}`` the one that reads the image; ``alpha_conv<i>`` is the mean of
that convolution's per-output-channel scaling factors.
"""

import os

import torch

from binary_ep import loops, run_folder

ARCHI = "conv"
PLOT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plotFunctions.py")


def prepare_images(net, x):
    """A loader's batch of images (B, C, H, W) as the network's input: same shape, the
    network's dtype, channels-last memory."""
    return x.to(net.fc[0].weight.dtype).contiguous(memory_format=torch.channels_last)


def train_bin(net, loader, epoch, estimator):
    """Train ``net`` over ``loader`` once: per mini-batch the free and nudged phases of the
    classifier and the convolutions (the ``estimator``), then ``updateWeights``; tracks the
    weight flips of each layer.  Returns ``{"train_error", "train_loss", "flips"}``."""
    return loops.train_epoch(net, loader, epoch, estimator, prepare_images)


def test_bin(net, loader, epoch):
    """Test ``net`` over ``loader`` once (free phase only): ``{"test_error": %, "test_loss"}``."""
    return loops.test_epoch(net, loader, epoch, prepare_images)


def initDataframe(path, net):
    """The results dataframe of the run in ``path``: empty, with the classifier's and the
    convolutions' columns (``flips_fc0`` ... ``flips_conv0`` ...), or the rows of an existing
    ``results.csv`` (resume)."""
    return run_folder.init_results(path, net.layer_names, net.neurons.binary)


def updateDataframe(path, df, epoch, train, test, net, seconds):
    """Add epoch ``epoch``'s row (errors, losses, flips and alpha per layer, the convolutions'
    alpha averaged over output channels, seconds) to ``df`` and rewrite ``results.csv``."""
    return run_folder.update_results(path, df, epoch, train, test, net, seconds)


def createPath(args):
    """Create ``<outDir>/DATA-0-conv-<dataset>/<YYYY-MM-DD>/S-<n>`` (for ``--check`` of a
    ``--resume`` run: beside that run) with a copy of ``plotFunctions.py`` in the date folder;
    returns the ``S-<n>`` folder."""
    return run_folder.create_run_folder(run_folder.date_folder(args, ARCHI), PLOT_SCRIPT)


def saveHyperparameters(path, args, argv):
    """Write ``Hyperparameters.txt`` (arguments as given, effective values, command) into the
    conv run folder ``path``."""
    run_folder.write_hyperparameters(path, args, argv)
