"""Which ranks of a data-parallel run are lost (DESIGN.md section 9): every rank counts up a key
in the launcher's TCP key-value store (MASTER_ADDR:MASTER_PORT, a client of its own, public
``torch.distributed.TCPStore`` API) from a thread of its own, and a rank whose count stands
still is lost.  The same thread is a watchdog for a rank blocked on a lost peer (``Heartbeat``).
"""

import contextlib
import datetime
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

HEARTBEAT_S = 0.5  # each rank counts up its heartbeat key this often ...
LOST_AFTER_S = 2.0  # ... and one whose count stands still this long is lost
STOPPED = 6  # the exit code of a rank that stops because another rank failed or was lost


def lost_sentence(lost, rank):
    """What rank ``rank`` says of the ranks ``lost``."""
    return f"rank {', '.join(map(str, lost))} was lost (its process ended or stopped responding); rank {rank} stops too"


class Heartbeat:
    """Rank ``rank`` of ``world`` counts up its key every ``HEARTBEAT_S`` seconds; ``lost()``
    lists the ranks whose count stands still for ``LOST_AFTER_S`` seconds (None when the store
    cannot be reached).

    The thread is also a watchdog.  A rank blocked on a peer that hangs (stopped, swapping, on a
    node that lost power) or that died under NCCL (whose collectives then never return, and the
    batch's host read waits forever) would wait for the process-group timeout.  So while this
    rank waits on the others (``waiting``: inside a collective and, on the CUDA ``device``, until
    the GPU has run what was queued up to its end) at two beats in a row, the thread reads the
    peers' counts; once one stood still ``LOST_AFTER_S``, it writes ``describe(lost ranks)``, one
    line, to stderr and calls ``exit_process(STOPPED)`` (``os._exit``: the process ends as it is, no
    thread joined, no collective waited for).  It deletes nothing, and nothing is half-written:
    a waiting rank writes no file, an epoch's files were renamed into place before its last
    collective, and a temporary left by a write is removed by the next run."""

    def __init__(self, rank, world, device=None, describe=None, exit_process=os._exit):
        run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.rank, self.keys = rank, [f"binary_ep/{run}/heartbeat/{r}" for r in range(world)]
        self.cuda = device if device is not None and device.type == "cuda" else None
        self.describe = describe or (lambda lost: f"main.py: error: {lost_sentence(lost, rank)}")
        self._exit = exit_process
        self.lock = threading.Lock()  # held by the watchdog from its last check to the exit
        self.entered, self.inside, self.pending = 0, 0, None  # waits begun, under way; CUDA: an event
        self.seen = {}  # peer rank -> (its count, when this thread first saw that count)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="ep-heartbeat", daemon=True)
        self.thread.start()

    @staticmethod
    def _client():
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=10))

    @contextlib.contextmanager
    def waiting(self):
        """This rank waits on the others inside the block (and, on CUDA, until the GPU has passed
        an event recorded at its end; none while a CUDA graph is being captured)."""
        with self.lock:
            self.entered, self.inside = self.entered + 1, self.inside + 1
        try:
            yield
        finally:
            event = None
            if self.cuda is not None and not torch.cuda.is_current_stream_capturing():
                event = torch.cuda.Event()
                event.record()
            with self.lock:  # (waits here for good while the watchdog ends the process)
                self.inside, self.pending = self.inside - 1, event

    def _waited(self):
        """The number of the wait under way (``entered``), or None when this rank does not wait."""
        if self.inside:
            return self.entered
        try:
            return self.entered if self.pending is not None and not self.pending.query() else None
        except RuntimeError:  # a CUDA error: the next collective or read says more
            return None

    def _beat(self):
        if self.cuda is not None:
            with contextlib.suppress(Exception):  # (a CUDA that fails here fails the run itself)
                torch.cuda.set_device(self.cuda)  # this thread queries the events on the rank's GPU
        store, before = None, None
        while not self.stopped.is_set():
            try:
                store = store or self._client()
                store.add(self.keys[self.rank], 1)
                wait = self._waited()
                if wait is not None and wait == before and self._watch(store, wait):
                    return
                before = wait
            except Exception:  # noqa: BLE001 - no answer from the store: a new client at the next
                store, before = None, None  # beat (a thread that gave up would make this rank look lost)
            self.stopped.wait(HEARTBEAT_S)

    def _watch(self, store, wait):
        """Read the peers' counts during wait number ``wait``; a count the same as at least
        ``LOST_AFTER_S`` ago (counts only grow) while this rank still waits ends the process
        (True when ``exit_process`` returned, as a test's does)."""
        now, still = time.monotonic(), []
        for r, key in enumerate(self.keys):
            if r == self.rank:
                continue
            count = store.add(key, 0)
            if self.seen.get(r, (None,))[0] != count:
                self.seen[r] = (count, now)
            elif now - self.seen[r][1] >= LOST_AFTER_S:
                still.append(r)
        if not still:
            return False
        with self.lock:
            if self._waited() != wait:
                return False
            try:
                line = self.describe(still)
            except Exception:  # noqa: BLE001 - a line without the folder's state, never no exit
                line = f"main.py: error: {lost_sentence(still, self.rank)}"
            try:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            finally:
                self._exit(STOPPED)
        return True

    def lost(self):
        """The ranks whose count stands still over ``LOST_AFTER_S`` from now (None: no store)."""
        try:
            store = self._client()
            before = [store.add(k, 0) for k in self.keys]
            time.sleep(LOST_AFTER_S)
            after = [store.add(k, 0) for k in self.keys]
        except Exception:  # noqa: BLE001
            return None
        return [r for r in range(len(self.keys)) if r != self.rank and after[r] == before[r]]

    def stop(self):
        """End the thread and wait for it: a daemon thread still inside a store call when Python
        shuts down is ended by ``pthread_exit`` as it takes the GIL back, through C++ frames
        that may not unwind, and the process aborts ("terminate called without an active
        exception", SIGABRT).  A store that does not answer ends its call within its own
        10 s timeout."""
        self.stopped.set()
        self.thread.join(timeout=15)
