"""Writing run files safely: atomic replacement, write failures as one sentence, stale
temporaries, and the lock that keeps one writer per run folder."""

import contextlib
import errno
import fcntl
import os
import stat
import tempfile

from binary_ep.signals import critical

LOCK_NAME = "run.lock"
_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
            errno.EIO: "an input/output error", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EFBIG: "the file-size limit is reached (ulimit -f)"}
_HELD = {}  # folder -> file descriptor of its locked run.lock, kept for the life of the process


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


def _temporary(path, write):
    """``write(tmp)`` into a new temporary file beside ``path``; returns its name.  An ``OSError``
    (full disk, quota, I/O error) becomes ``WriteFailed`` and leaves no temporary behind."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are for everyone to read
        return tmp
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise WriteFailed(folder, os.path.basename(path), reason_of(e)) from None


def atomic_write(path, write):
    """Write ``path`` through ``write(tmp_path)`` then rename, so a crash never leaves it
    truncated; an ``OSError`` (full disk, quota, I/O error) becomes ``WriteFailed`` and leaves
    neither a temporary file nor a changed ``path``.  Inside ``all_or_nothing`` the rename waits
    for the end of the block."""
    with critical():
        tmp = _temporary(path, write)
        if _PENDING is not None:
            _PENDING.append((tmp, path))
            return
        try:
            os.replace(tmp, path)
        except OSError as e:
            os.remove(tmp)
            raise WriteFailed(os.path.dirname(os.path.abspath(path)), os.path.basename(path),
                              reason_of(e)) from None


_PENDING = None  # inside all_or_nothing: the (temporary, path) renames still to do
_STAGED = []  # (temporary, path) that ``stage`` wrote ahead, renamed with the next block


def stage(path, data):
    """Write the bytes ``data`` for ``path`` now, into a temporary beside it (so that a full disk
    shows at once), and put them in place only together with the files of the next
    ``all_or_nothing`` block (a resume's note, with the first epoch it saves): until then
    ``path`` is untouched, and ``release_run_folders`` removes a temporary still waiting."""
    with critical():
        _STAGED.append((_temporary(path, lambda tmp: _write_to(tmp, data)), path))


@contextlib.contextmanager
def all_or_nothing():
    """The files ``atomic_write`` writes in this block are renamed into place together at its
    end (renames need no space), with those ``stage`` wrote ahead, or, if any write fails, none
    is: an epoch's ``results.csv`` and ``checkpoint.pt`` change together or not at all."""
    global _PENDING
    _PENDING = pending = []
    try:
        with critical():
            yield
            for tmp, path in _STAGED + pending:
                os.replace(tmp, path)
            del pending[:], _STAGED[:]
    finally:
        _PENDING = None
        for tmp, _ in pending:
            if os.path.exists(tmp):
                os.remove(tmp)


def _write_to(name, data):
    with open(name, "wb") as f:
        f.write(data)


def write_bytes(path, data):
    """``atomic_write`` of the bytes ``data``."""
    atomic_write(path, lambda tmp: _write_to(tmp, data))


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


class LockRefused(Exception):
    """The run folder's ``run.lock`` is not a lock file this suite can use (a symbolic link, a
    folder, a device, a file it may not open): one sentence naming it; nothing was touched."""

    def __init__(self, folder, what):
        super().__init__(f"{os.path.join(folder, LOCK_NAME)} is {what}, not the run's lock file; "
                         f"nothing in {folder} was changed; if no run uses this folder, remove it "
                         f"and try again")
        self.folder = folder


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def lock_run_folder(folder):
    """Take the exclusive lock of the run folder ``folder`` for the rest of this process's life
    (``fcntl.flock`` on ``folder/run.lock``, created empty if missing: it vanishes with the
    process, even after SIGKILL).  The file is never written and never followed through a
    symbolic link, so the lock changes nothing a run saved.  Raises ``FolderInUse`` (naming the
    holder's PID) when another process holds it and ``LockRefused`` when ``run.lock`` is not a
    regular file (or cannot be opened); taking it again in the same process is a no-op."""
    folder = os.path.abspath(folder)
    if folder in _HELD:
        return
    flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(os.path.join(folder, LOCK_NAME), flags, 0o644)
    except OSError as e:
        what = "a symbolic link" if e.errno == errno.ELOOP else f"a file that cannot be opened ({reason_of(e)})"
        raise LockRefused(folder, "a folder" if e.errno == errno.EISDIR else what) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise LockRefused(folder, next((w for test, w in _KINDS if test(mode)), "not a regular file"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = lock_holder(fd)
        os.close(fd)
        raise FolderInUse(folder, pid) from None
    _HELD[folder] = fd


def lock_holder(fd, locks="/proc/locks"):
    """The PID (a string) of the process holding a ``flock`` on the file open as ``fd``, from the
    kernel's table of locks (``/proc/locks``: ``1: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode>
    ...``, device numbers in hex), else the PID an earlier version of this suite wrote into the
    file, else None."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open(locks) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key and fields[4] != "0":
                    return fields[4]
    except OSError:
        pass
    written = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return written if written.isdigit() else None


def release_run_folders():
    """Give back every run-folder lock this process holds and remove the temporaries ``stage``
    wrote for a block that never came (``main`` does when it returns, so that a caller in the
    same process, a test say, leaves no folder locked)."""
    while _STAGED:
        tmp, _ = _STAGED.pop()
        if os.path.exists(tmp):
            os.remove(tmp)
    while _HELD:
        os.close(_HELD.popitem()[1])
