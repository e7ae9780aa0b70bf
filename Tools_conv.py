"""Training, testing and run files of the convolutional network (the seed's ``Tools_conv``).

The loops and files are the same for both architectures and live once in ``shared_fc_conv``;
the network supplies what differs (images kept as (B, C, H, W), classifier and convolution
states, layer names).  Layer names follow the per-layer lists (output first): ``fc0`` feeds
the 10 output units, ``fc1`` ... the classifier layers below it, then ``conv0`` the top
convolution down to ``conv{N-1}`` the one that reads the image.  ``results.csv`` has, per epoch,
``train_error``, ``test_error`` (%), ``train_loss``, ``test_loss`` (per sample), then for every
layer in that order ``flips_<layer>`` (weights flipped during the epoch), ``fliprate_<layer>``
(the same in % of the layer's weights) and ``alpha_<layer>`` (the scaling factor at the end of
the epoch; for a convolution, the mean of its per-output-channel factors), and
``epoch_seconds``.

* ``train_bin(net, loader, epoch)``: free phase, nudged phase, update; flip counts; tqdm progress.
* ``test_bin(net, loader, epoch)``: free phase only; test error (%) and loss.
* ``initDataframe(path, layer_names)`` / ``updateDataframe(path, df, epoch, train, test, net, s)``.
* ``createPath(args)``: ``<outDir>/DATA-0-conv-<dataset>/<date>/S-<n>``; ``saveHyperparameters``.
"""

from shared_fc_conv import (createPath, initDataframe, saveHyperparameters,  # noqa: F401
                            test_epoch as test_bin, train_epoch as train_bin, updateDataframe)
