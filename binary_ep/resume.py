"""Resuming a run (``--resume S-<n>``): the saved arguments checked against the command line, the
results so far, and the resuming command noted in ``Hyperparameters.txt``."""

import argparse
import os
import shlex

from binary_ep.files import atomic_write
from binary_ep.vocabulary import UserError


def resumed_args(parser, args, given, resume_free):
    """The saved arguments of ``--resume PATH``, checked against the flags ``given`` with it;
    the flags in ``resume_free`` may change on resume (``--epochs`` only upwards)."""
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
    conflicts = sorted(f for f in given - resume_free
                       if f in saved and getattr(args, f, None) != saved[f])
    if conflicts:
        parser.error("--resume keeps the saved settings; these flags differ from the run's: "
                     + ", ".join(f"--{f} (saved {saved[f]}, given {getattr(args, f)})" for f in conflicts))
    new = argparse.Namespace(**saved)
    for action in parser._actions:
        if action.dest != "help" and not hasattr(new, action.dest):
            setattr(new, action.dest, action.default)
    for f in resume_free & (given | {"resume"}):
        setattr(new, f, getattr(args, f))
    if new.epochs < saved["epochs"]:
        parser.error(f"--epochs can only be raised when resuming (saved {saved['epochs']}, given {new.epochs})")
    new.outDir = saved["outDir"]
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


def note_resume(path, done, argv):
    """Append the resuming command to ``Hyperparameters.txt`` (the arguments above stay as given)."""
    hp = os.path.join(path, "Hyperparameters.txt")
    with open(hp) as f:
        text = f.read()
    text += ("" if text.endswith("\n") else "\n") + \
        f"resumed after epoch {done}: python main.py {' '.join(shlex.quote(a) for a in argv)}\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(hp, write)
