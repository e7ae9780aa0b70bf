"""Writing run files safely: atomic replacement, stale temporaries."""

import os
import tempfile

from binary_ep.signals import critical


def atomic_write(path, write):
    """Write ``path`` through ``write(tmp_path)`` then rename, so a crash never leaves it truncated."""
    folder = os.path.dirname(os.path.abspath(path))
    with critical():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        try:
            os.close(fd)
            write(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are for everyone to read
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def remove_stale_temporaries(folder):
    """Delete the ``.*.tmp`` files a killed process (SIGKILL, power cut) left in ``folder``."""
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


