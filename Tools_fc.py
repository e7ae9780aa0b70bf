"""Training, testing and run files of the fully connected network (the seed's ``Tools_fc``).

The loops and the run files are the package's (``binary_ep.loops``, ``binary_ep.run_folder``);
this module gives them what is specific to the fc architecture: its images flattened to
(B, C*H*W) rows, its run folders ``DATA-0-fc-<dataset>``, and its layer names, which name the
columns of ``results.csv``: ``fc0`` (the weights feeding the output layer) ... ``fc{L-2}`` (the
weights reading the input), the order of every per-layer list.
"""

import os

from binary_ep import loops, run_folder

ARCHI = "fc"
PLOT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plotFunctions.py")


def prepare_images(net, x):
    """A loader's batch of images (B, C, H, W) as the network's input: rows (B, C*H*W)."""
    return x.flatten(1)  # (an empty share of a batch too)


def train_bin(net, loader, epoch, estimator):
    """Train ``net`` over ``loader`` once: per mini-batch the free and nudged phases (the
    ``estimator``), then ``updateWeights``; tracks the weight flips of each layer.  Returns
    ``{"train_error": %, "train_loss": per sample, "flips": [per layer]}``."""
    return loops.train_epoch(net, loader, epoch, estimator, prepare_images)


def test_bin(net, loader, epoch):
    """Test ``net`` over ``loader`` once (free phase only): ``{"test_error": %, "test_loss"}``."""
    return loops.test_epoch(net, loader, epoch, prepare_images)


def initDataframe(path, net):
    """The results dataframe of the run in ``path``: empty, with the fc columns
    (``flips_fc0`` ... per layer), or the rows of an existing ``results.csv`` (resume)."""
    return run_folder.init_results(path, net.layer_names, net.neurons.binary)


def updateDataframe(path, df, epoch, train, test, net, seconds):
    """Add epoch ``epoch``'s row (errors, losses, flips and alpha per fc layer, seconds) to ``df``
    and rewrite ``results.csv`` atomically; returns ``df``."""
    return run_folder.update_results(path, df, epoch, train, test, net, seconds)


def createPath(args):
    """Create ``<outDir>/DATA-0-fc-<dataset>/<YYYY-MM-DD>/S-<n>`` (for ``--check`` of a
    ``--resume`` run: beside that run) with a copy of ``plotFunctions.py`` in the date folder;
    returns the ``S-<n>`` folder."""
    return run_folder.create_run_folder(run_folder.date_folder(args, ARCHI), PLOT_SCRIPT)


def saveHyperparameters(path, args, argv):
    """Write ``Hyperparameters.txt`` into the run folder ``path``."""
    run_folder.write_hyperparameters(path, args, argv)
