"""How a run ends: where it stood (``Progress``) and, for each exception a run ends with on
purpose, its one line and exit code (``ending``, the table ``expected_errors``).  The one clean-up
allowed: a run folder this process created that holds no finished epoch is removed."""

import os
import shlex

from binary_ep import distributed, files, run_folder, signals
from binary_ep.loops import Diverged
from binary_ep.model_file import ExportError
from binary_ep.vocabulary import UserError


class Progress:
    """Where this process's run stands, for the line that ends it: ``path``, its ``S-<n>`` folder
    (None before there is one); ``resumed``; ``start``, the epochs on disk when it began, and
    ``done``, those on disk now (an epoch counts the moment its files are in place); ``epoch``,
    the epoch under way (None before training); ``root``: rank 0, which owns the folder."""

    def __init__(self, resume=None):
        self.path, self.resumed = resume, bool(resume)
        self.start = self.done = 0
        self.epoch, self.root = None, True


def expected_errors():
    """The exceptions a run ends with on purpose, each mapped to its exit code by ``ending``."""
    return {UserError: 2, ExportError: 2, Diverged: 3, files.WriteFailed: 4, files.FolderInUse: 5,
            files.LockRefused: 5, distributed.StopAll: 6, signals.Interrupted: 128}


def ending(e, state):
    """``(line, exit code)`` for the expected exception ``e`` ending the run ``state`` describes.
    The only clean-up: the folders this process created that hold no finished epoch are removed
    (``run_folder.discard_unfinished``); everything a run saved stays as it is."""
    signals.ignore_signals()  # a second Ctrl-C must not cut the clean-up or the line short
    signals.delivered()
    code = next(c for kind, c in expected_errors().items() if isinstance(e, kind))
    if isinstance(e, (files.FolderInUse, files.LockRefused)):  # said whole; the folder is untouched
        return f"main.py: error: {e}", code
    path = shlex.quote(str(state.path))
    resume = f"continue with: python main.py --resume {path}"
    head, when, advice = f"main.py: error: {e}", "", None
    if isinstance(e, signals.Interrupted):
        code, head, advice = 128 + e.signum, f"interrupted ({e})", resume
        when = (" before training started" if state.epoch is None else
                " before the first epoch finished" if state.done == 0 and not state.resumed else
                f" during epoch {state.epoch}" if state.epoch > state.done else
                f" after epoch {state.epoch}")
    elif isinstance(e, files.WriteFailed):
        advice = "free space, then " + resume
    elif isinstance(e, Diverged):
        head = f"main.py: error: training diverged: {e}"
        advice = "try smaller learning rates, thresholds or beta"
    elif isinstance(e, distributed.StopAll):
        code, advice = e.code, resume
    if not state.root and isinstance(e, distributed.StopAll) and state.done == state.start:
        return head, code  # rank 0's failure or loss: rank 0 said (or could not say) the rest
    if state.path is None or (state.root and run_folder.discard_unfinished(state.path)):
        saved = "nothing was saved" if state.path is None else f"nothing to resume, {path} removed"
        advice = "free space or choose another --outDir" if isinstance(e, files.WriteFailed) else None
    elif state.done == 0 and not state.resumed:  # another rank, stopping with rank 0, which removes it
        saved, advice = f"nothing to resume, {path} removed", None
    elif state.done == state.start:
        saved = f"nothing in {path} was changed"
    else:
        saved = "epoch 1 is saved" if state.done == 1 else f"epochs 1-{state.done} are saved"
        saved += "" if resume in (advice or "") else f" in {path}"
    return f"{head}{when}; {saved}" + (f"; {advice}" if advice else ""), code
