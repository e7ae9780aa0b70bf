"""Output streams that cannot end a run: ``sys.stdout``/``sys.stderr`` whose reader left
(``python main.py ... 2>&1 | head -1``, a ``tee`` that died) or whose log file broke go silent.

Python ignores SIGPIPE, so a write to a pipe nobody reads raises ``BrokenPipeError``, from a
``print``, a tqdm bar, ``tqdm.write`` or a warning, in the middle of training, and at exit
the interpreter's final flush fails again (exit code 120).  Inside ``guarded_streams`` both
streams are ``GuardedStream``s: a write or flush that fails because the stream is broken
makes that stream silent for the rest of the process (its file descriptor is pointed at
``/dev/null``, so C-level writers and the final flush find a sink too), and nothing is said
about it: there is nobody to read it.  The run folder (``results.csv``) keeps every epoch.

Broken means: the stream object was closed, or an ``OSError`` whose errno is in ``BROKEN``:
EPIPE/ECONNRESET (the reader left), EBADF (the descriptor was closed), EIO (the terminal hung
up), ENOSPC/EDQUOT/EFBIG (a log file that cannot grow: its lines are lost either way, and the
run's own files say for themselves when they cannot be written).  Any other error (a
``TypeError``, a ``UnicodeEncodeError``, EAGAIN) is raised as before.
"""

import errno
import os
import sys
from contextlib import contextmanager

BROKEN = frozenset(getattr(errno, name) for name in ("EPIPE", "ECONNRESET", "EBADF", "EIO", "ENOSPC",
                                                     "EDQUOT", "EFBIG") if hasattr(errno, name))


class GuardedStream:
    """``stream`` (a text stream) that turns silent, instead of raising, once it is broken
    (``silent``).  ``write``, ``writelines``, ``flush`` and ``reconfigure`` are guarded;
    every other attribute is the stream's own (``fileno``, ``isatty``, ``encoding``, ...)."""

    def __init__(self, stream):
        self._stream = stream
        self.silent = False

    def write(self, text):
        self._guarded(self._stream.write, text)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        self._guarded(self._stream.flush)

    def reconfigure(self, **options):  # it flushes first
        self._guarded(self._stream.reconfigure, **options)

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def _guarded(self, method, *args, **options):
        if self.silent:
            return
        try:
            method(*args, **options)
        except (OSError, ValueError) as e:
            if not self._broken(e):
                raise
            self._silence(closed=isinstance(e, ValueError))

    def _broken(self, error):
        if isinstance(error, OSError):
            return error.errno in BROKEN
        # "I/O operation on closed file"; not a UnicodeEncodeError (also a ValueError)
        return bool(getattr(self._stream, "closed", False))

    def _silence(self, closed):
        """From now on writes go nowhere; an open stream's descriptor goes to ``/dev/null``
        (a closed stream's descriptor number may already belong to another file: left alone)."""
        self.silent = True
        if closed:
            return
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError):  # io.UnsupportedOperation: no descriptor (io.StringIO, say)
            return
        try:
            null = os.open(os.devnull, os.O_WRONLY)
        except OSError:  # no /dev/null (a bare chroot): the stream stays silent all the same
            return
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
        try:  # what the failed write left in the stream's buffer drains into /dev/null now
            self._stream.flush()
        except (OSError, ValueError):
            pass


@contextmanager
def guarded_streams():
    """For the block, ``sys.stdout`` and ``sys.stderr`` are ``GuardedStream``s of themselves
    (a stream that already is one, or is None, stays); at the end they are flushed (a reader
    that left since the last write is found now, while it is harmless) and put back, unless
    the block replaced them itself.  Objects made inside the block that keep the stream (a
    tqdm bar, a logging handler) keep the guard."""
    guards = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, GuardedStream):
            guards[name] = GuardedStream(stream)
            setattr(sys, name, guards[name])
    try:
        yield
    finally:
        for name, guard in guards.items():
            guard.flush()
            if getattr(sys, name) is guard:
                setattr(sys, name, guard._stream)
