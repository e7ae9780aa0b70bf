"""Resuming a run (``--resume S-<n>``): the saved arguments checked against the command line and
against the network the folder's Hyperparameters.txt records, and the results so far."""

import argparse
import os

from binary_ep.vocabulary import UserError


SPLIT_SPELLINGS = {"gamma_classi", "gamma_conv", "classi_threshold", "conv_threshold"}
# the arguments that make the network (its tensors' shapes, its input): a checkpoint.pt must agree
# with its folder's Hyperparameters.txt on each
NETWORK_FLAGS = ("archi", "dataset", "layersList", "convList", "kernelSize", "padding", "Fpool")


def resumed_args(parser, args, given, resume_free, normalise):
    """The saved arguments of ``--resume PATH``, checked against the flags ``given`` with it
    (``{flag: value as typed}``): each is compared, normalised by ``normalise(parser, args,
    given)`` as on the first run, with the value the run used, so a re-pasted command is no
    conflict.  The flags in ``resume_free`` may change (``--epochs`` only upwards); the run
    stays in its folder, so a different ``--outDir`` is an error.  An argument the checkpoint
    lacks (an older version saved it: ``workers`` and ``export`` came with commit 4e77073) takes
    its parser default, here and nowhere else.  The network's arguments (``NETWORK_FLAGS``) must
    be those Hyperparameters.txt records (``check_recorded_network``)."""
    import torch
    path = args.resume
    ckpt = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(ckpt) or not os.path.isfile(os.path.join(path, "Hyperparameters.txt")):
        parser.error(f"--resume {path} is not a run folder with checkpoint.pt and Hyperparameters.txt "
                     f"(give an S-<n> folder whose first epoch finished)")
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)["args"]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same user error
        parser.error(f"--resume {path}: checkpoint.pt cannot be read ({type(e).__name__}); it is "
                     f"damaged, resume from a copy or start a new run")
    if "outDir" in given and os.path.abspath(given["outDir"]) != os.path.abspath(saved["outDir"]):
        parser.error(f"--outDir {given['outDir']} does not apply to --resume: the run stays in its "
                     f"folder {path}; leave --outDir out")
    new = argparse.Namespace(**saved)
    for action in parser._actions:
        if action.dest != "help" and not hasattr(new, action.dest):
            setattr(new, action.dest, action.default)
    check_recorded_network(parser, path, vars(new))
    compared = set(given) - resume_free - {"outDir"}
    if compared:  # the given flags over the saved ones, normalised as on the first run
        retyped = argparse.Namespace(**vars(new))
        for f in compared:
            setattr(retyped, f, given[f])
        normalise(parser, retyped, given)
        conflicts = sorted(f for f in vars(retyped) if f not in SPLIT_SPELLINGS | resume_free | {"given", "outDir"}
                           and f in saved and getattr(retyped, f) != saved[f])
        if conflicts:
            parser.error("--resume keeps the saved settings; these flags differ from the run's: "
                         + ", ".join(f"--{f} (saved {saved[f]}, given {getattr(retyped, f)})" for f in conflicts))
    for f in resume_free & (set(given) | {"resume"}):
        setattr(new, f, getattr(args, f))
    new.given = dict(given)  # what this invocation typed (a --check folder records it)
    if new.epochs < saved["epochs"]:
        parser.error(f"--epochs can only be raised when resuming (saved {saved['epochs']}, given {new.epochs})")
    return new


def check_recorded_network(parser, path, values):
    """``parser.error`` unless the network arguments in ``values`` (the checkpoint's, defaults
    filled in) are those ``path/Hyperparameters.txt`` records (its effective values; a file that
    records none leaves the check to the tensors' shapes, ``checkpoint.check_network``): a
    checkpoint.pt of another run copied in would mix two runs in one results.csv."""
    from binary_ep.run_folder import recorded_differences  # run_folder imports this module
    try:
        differ = recorded_differences(path, values, NETWORK_FLAGS)
    except UserError as e:
        parser.error(str(e))
    if differ:
        parser.error(f"--resume {path}: checkpoint.pt is not the network this folder's "
                     f"Hyperparameters.txt records: "
                     + ", ".join(f"--{n} {mine} in checkpoint.pt, {theirs} in Hyperparameters.txt"
                                 for n, mine, theirs in differ)
                     + "; put the run's own checkpoint.pt back, or resume the folder it came from")


def resumed_dataframe(path, read, columns, done):
    """``results.csv`` of a run resumed after epoch ``done``: ``read()`` (the architecture's
    ``initDataframe``, whose ``run_folder.read_results`` checks every row), checked to have
    ``columns`` and a row for each epoch 1..done; the rows after ``done`` (an epoch whose checkpoint
    was not written: older versions wrote results.csv first) are dropped.  Anything else is one
    ``UserError`` naming the line or epoch and the column."""
    csv = os.path.join(path, "results.csv")
    if not os.path.exists(csv):
        raise UserError(f"{csv} is missing (checkpoint.pt is after epoch {done}); restore it from a "
                        f"copy or start a new run")
    df = read()
    have = list(df.columns)
    if have != columns:
        k = next(k for k, (a, b) in enumerate(zip(have + [None], columns + [None])) if a != b)
        found, wanted = (repr(c[k]) if k < len(c) else "no column" for c in (have, columns))
        raise UserError(f"{csv} line 1, column {k + 2}: {found} where this network's results have "
                        f"{wanted}; the file is another run's or damaged: restore it from a copy or "
                        f"start a new run")
    missing = next((e for e in range(1, done + 1) if e not in df.index), None)
    if missing is not None:
        raise UserError(f"{csv} has no row for epoch {missing} (checkpoint.pt is after epoch {done}); "
                        f"restore it from a copy or start a new run")
    return df[df.index <= done]
