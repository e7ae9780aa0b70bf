"""SIGINT/SIGTERM as the exception ``Interrupted``, held back while run files are written."""

import signal


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; ``signum`` tells which.  A ``BaseException`` like
    ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Critical:
    """Context in which SIGINT/SIGTERM are held back until the block ends (file writes)."""
    depth = 0
    pending = None

    def __enter__(self):
        _Critical.depth += 1

    def __exit__(self, *exc):
        _Critical.depth -= 1
        if _Critical.depth == 0 and _Critical.pending is not None:
            signum, _Critical.pending = _Critical.pending, None
            if exc[0] is None:
                raise Interrupted(signum)


critical = _Critical


def install_signal_handlers():
    """SIGINT/SIGTERM raise ``Interrupted`` (deferred while files are being written).  Returns the
    previous handlers for ``restore_signal_handlers`` (None outside the main thread, where Python
    cannot set handlers)."""
    def handler(signum, frame):
        if _Critical.depth:
            _Critical.pending = signum
        else:
            raise Interrupted(signum)
    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        return None
    _Critical.pending = None
    return previous


def restore_signal_handlers(previous):
    """Put back what ``install_signal_handlers`` replaced."""
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler)


def ignore_signals():
    """Ignore SIGINT/SIGTERM (while a run that was interrupted cleans up and says how to resume)."""
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing was installed either
        pass


