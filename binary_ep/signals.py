"""SIGINT/SIGTERM as the exception ``Interrupted``, held back while run files are written, and,
in a data-parallel run, held until every rank can stop at the same batch (``hold``).

Python runs a signal handler between any two bytecodes, also inside a weak-reference callback
or a ``__del__`` (importlib runs one for every module lock), where an exception is printed as
"Exception ignored" and dropped.  So the handler also keeps the signal in ``pending`` until it
reaches our code, and ``check`` (called after the imports and at every batch) raises it again
if it was dropped."""

import signal
import sys


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; ``signum`` tells which.  A ``BaseException`` like
    ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Critical:
    """Context in which SIGINT/SIGTERM are held back until the block ends (file writes).  While
    ``held`` (``hold``) a signal only waits in ``pending``, whatever the depth."""
    depth = 0
    pending = None
    held = False

    def __enter__(self):
        _Critical.depth += 1

    def __exit__(self, *exc):
        _Critical.depth -= 1
        if _Critical.depth == 0 and _Critical.pending is not None and not _Critical.held:
            signum, _Critical.pending = _Critical.pending, None
            if exc[0] is None:
                raise Interrupted(signum)


critical = _Critical


def install_signal_handlers():
    """SIGINT/SIGTERM raise ``Interrupted`` (deferred while files are being written; kept for
    ``check`` until ``delivered``), SIGXFSZ is ignored (a write past ``ulimit -f`` fails), and Python's "Exception ignored" report of an ``Interrupted``
    that a callback dropped is silenced (``check`` raises it again).  Returns what was replaced,
    for ``restore_signal_handlers`` (None outside the main thread, where Python cannot set
    handlers)."""
    def handler(signum, frame):
        _Critical.pending = signum  # kept until it reached us (``check``, ``delivered``)
        if not (_Critical.depth or _Critical.held):
            raise Interrupted(signum)
    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        # a write past the file-size limit (ulimit -f) fails with EFBIG, a clear error, instead
        # of SIGXFSZ ending the process halfway through a file
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except ValueError:
        return None
    report = sys.unraisablehook

    def unraisable(info):
        if not isinstance(info.exc_value, Interrupted):
            report(info)
    previous["unraisablehook"] = report
    sys.unraisablehook = unraisable
    _Critical.pending, _Critical.held = None, False
    return previous


def restore_signal_handlers(previous):
    """Put back what ``install_signal_handlers`` replaced."""
    _Critical.held = False
    previous = dict(previous or {})
    if "unraisablehook" in previous:
        sys.unraisablehook = previous.pop("unraisablehook")
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def ignore_signals():
    """Ignore SIGINT/SIGTERM (while a run that was interrupted cleans up and says how to resume)."""
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing was installed either
        pass


def hold(on=True):
    """``on``: from now on a signal raises nothing, it waits for ``take_pending`` (data-parallel
    training: the ranks agree on the batch after which they all stop); ``False``: signals raise
    ``Interrupted`` again (one that arrived while held waits for ``take_pending`` or for the end
    of the next ``critical`` block)."""
    _Critical.held = on


def check():
    """Raise ``Interrupted`` for a signal whose exception never reached us (dropped inside a
    weak-reference callback, say), unless signals are held back now."""
    if _Critical.pending is not None and not (_Critical.depth or _Critical.held):
        raise Interrupted(take_pending())


def delivered():
    """The ``Interrupted`` just caught is handled: ``check`` must not raise it again."""
    take_pending()


def take_pending():
    """The signal number waiting while held (cleared), or None."""
    signum, _Critical.pending = _Critical.pending, None
    return signum


def pending():
    """The signal number waiting while held (kept), or None."""
    return _Critical.pending
