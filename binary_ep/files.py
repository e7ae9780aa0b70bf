"""Writing run files safely: atomic replacement, write failures as one sentence, stale
temporaries, and the lock that keeps one writer per run folder."""

import contextlib
import errno
import fcntl
import os
import tempfile
import time

from binary_ep.signals import critical

LOCK_NAME = "run.lock"
_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
            errno.EIO: "an input/output error", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
_HELD = {}  # folder -> open lock file, kept for the life of the process


class WriteFailed(Exception):
    """A run file could not be written: ``folder``, ``name`` and ``reason`` (one phrase)."""

    def __init__(self, folder, name, reason):
        super().__init__(f"cannot write {name} in {folder}: {reason}")
        self.folder, self.name, self.reason = folder, name, reason


class FolderInUse(Exception):
    """Another process holds the run folder's lock (``pid``, as it wrote it, or None)."""

    def __init__(self, folder, pid):
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"{folder} is in use by {holder} (a run, --resume, --check or --export); "
                         f"wait for it to end or stop it, then try again")
        self.folder, self.pid = folder, pid


def reason_of(error):
    """The cause of an ``OSError`` in words ("no space left on the device", ...)."""
    return _REASONS.get(error.errno) or (error.strerror or type(error).__name__).lower()


def atomic_write(path, write):
    """Write ``path`` through ``write(tmp_path)`` then rename, so a crash never leaves it
    truncated; an ``OSError`` (full disk, quota, I/O error) becomes ``WriteFailed`` and leaves
    neither a temporary file nor a changed ``path``.  Inside ``all_or_nothing`` the rename waits
    for the end of the block."""
    folder = os.path.dirname(os.path.abspath(path))
    with critical():
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
            os.close(fd)
            write(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are for everyone to read
            if _PENDING is not None:
                _PENDING.append((tmp, path))
                tmp = None
            else:
                os.replace(tmp, path)
        except OSError as e:
            raise WriteFailed(folder, os.path.basename(path), reason_of(e)) from None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)


_PENDING = None  # inside all_or_nothing: the (temporary, path) renames still to do


@contextlib.contextmanager
def all_or_nothing():
    """The files ``atomic_write`` writes in this block are renamed into place together at its
    end (renames need no space), or, if any write fails, none is: an epoch's ``results.csv``
    and ``checkpoint.pt`` change together or not at all."""
    global _PENDING
    _PENDING = pending = []
    try:
        with critical():
            yield
            for tmp, path in pending:
                os.replace(tmp, path)
            del pending[:]
    finally:
        _PENDING = None
        for tmp, _ in pending:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_bytes(path, data):
    """``atomic_write`` of the bytes ``data``."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def write_text(path, text):
    """``atomic_write`` of the string ``text``."""
    write_bytes(path, text.encode())


def remove_stale_temporaries(folder):
    """Delete the ``.*.tmp`` files a killed process (SIGKILL, power cut) left in ``folder``."""
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def lock_run_folder(folder):
    """Take the exclusive lock of the run folder ``folder`` for the rest of this process's life
    (``fcntl.flock`` on ``folder/run.lock``: it vanishes with the process, even after SIGKILL)
    and write this process's PID into it.  Raises ``FolderInUse`` (naming the holder's PID) when
    another process holds it; taking it again in the same process is a no-op."""
    folder = os.path.abspath(folder)
    if folder in _HELD:
        return
    try:
        f = open(os.path.join(folder, LOCK_NAME), "a+")
    except OSError as e:
        raise WriteFailed(folder, LOCK_NAME, reason_of(e)) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(f)
        f.close()
        raise FolderInUse(folder, pid) from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
    except OSError as e:
        f.close()
        raise WriteFailed(folder, LOCK_NAME, reason_of(e)) from None
    _HELD[folder] = f


def _holder(f, wait_s=2.0):
    """The PID the holder of ``f``'s lock wrote into it, or None.  The holder writes it right
    after taking the lock: a file still empty is read again, for up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        f.seek(0)
        pid = f.read().strip()
        if pid.isdigit() or time.monotonic() > deadline:
            return pid if pid.isdigit() else None
        time.sleep(0.01)


def release_run_folders():
    """Give back every run-folder lock this process holds (``main`` does when it returns, so
    that a caller in the same process, a test say, leaves no folder locked)."""
    while _HELD:
        _HELD.popitem()[1].close()
