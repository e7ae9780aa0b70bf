"""Training, testing and run files of the fully connected network (the seed's ``Tools_fc``).

The loops and files are the same for both architectures and live once in ``shared_fc_conv``;
the network supplies what differs (input flattening, state layout, layer names ``fc0`` ... with
``fc0`` feeding the output layer, which name the ``flips_*``/``fliprate_*``/``alpha_*`` columns).

* ``train_bin(net, loader, epoch)``: free phase, nudged phase, update; flip counts; tqdm progress.
* ``test_bin(net, loader, epoch)``: free phase only; test error (%) and loss.
* ``initDataframe(path, layer_names)`` / ``updateDataframe(path, df, epoch, train, test, net, s)``.
* ``createPath(args)``: ``<outDir>/DATA-0-fc-<dataset>/<date>/S-<n>``; ``saveHyperparameters``.
"""

from shared_fc_conv import (createPath, initDataframe, saveHyperparameters,  # noqa: F401
                            test_epoch as test_bin, train_epoch as train_bin, updateDataframe)
