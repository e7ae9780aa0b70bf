"""Resuming a run (``--resume S-<n>``): the saved arguments checked against the command line, and
the results so far."""

import argparse
import os

from binary_ep.vocabulary import UserError


SPLIT_SPELLINGS = {"gamma_classi", "gamma_conv", "classi_threshold", "conv_threshold"}


def resumed_args(parser, args, given, resume_free, normalise):
    """The saved arguments of ``--resume PATH``, checked against the flags ``given`` with it
    (``{flag: value as typed}``): each is compared, normalised by ``normalise(parser, args,
    given)`` as on the first run, with the value the run used, so a re-pasted command is no
    conflict.  The flags in ``resume_free`` may change (``--epochs`` only upwards); the run
    stays in its folder, so a different ``--outDir`` is an error."""
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


def resumed_dataframe(path, read, columns, done):
    """``results.csv`` of a run resumed after epoch ``done``: ``read()`` (the architecture's
    ``initDataframe``), checked to have ``columns`` and rows 1..done; the rows after ``done``
    (an epoch whose checkpoint was not written) are dropped."""
    try:
        df = read()
        ok = list(df.columns) == columns and all(e in df.index for e in range(1, done + 1))
    except Exception:  # noqa: BLE001 - any unreadable CSV is the same user error
        ok = False
    if not ok:
        raise UserError(f"--resume {path}: results.csv is missing, damaged or does not match "
                        f"checkpoint.pt (epoch {done}); restore it from a copy or start a new run")
    return df[df.index <= done]
