"""SIGINT/SIGTERM as the exception ``Interrupted``, held back while run files are written, and,
in a data-parallel run, held until every rank can stop at the same batch (``hold``)."""

import signal


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
    """SIGINT/SIGTERM raise ``Interrupted`` (deferred while files are being written).  Returns the
    previous handlers for ``restore_signal_handlers`` (None outside the main thread, where Python
    cannot set handlers)."""
    def handler(signum, frame):
        if _Critical.depth or _Critical.held:
            _Critical.pending = signum
        else:
            raise Interrupted(signum)
    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        return None
    _Critical.pending, _Critical.held = None, False
    return previous


def restore_signal_handlers(previous):
    """Put back what ``install_signal_handlers`` replaced."""
    _Critical.held = False
    for signum, handler in (previous or {}).items():
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


def take_pending():
    """The signal number waiting while held (cleared), or None."""
    signum, _Critical.pending = _Critical.pending, None
    return signum


def pending():
    """The signal number waiting while held (kept), or None."""
    return _Critical.pending
