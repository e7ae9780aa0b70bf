"""CPU streams: single-threaded worker threads that each relax a share of a batch.

The relaxation's small matrix products keep a core far busier when each core runs its own
share of the batch single-threaded than when one product is split across cores.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import torch


MIN_STREAM_BATCH = 16  # smallest share of a batch worth a CPU stream of its own
_POOL = {}
_POOL_LOCK = threading.Lock()


def stream_pool(n):
    """A pool of ``n`` worker threads, each running PyTorch single-threaded (made once)."""
    with _POOL_LOCK:
        if n not in _POOL:
            main_threads = torch.get_num_threads()
            barrier = threading.Barrier(n)
            pool = ThreadPoolExecutor(n, thread_name_prefix="ep-stream")

            def start(_):
                torch.set_num_threads(1)  # this worker's operations stay on its own core
                barrier.wait()
            list(pool.map(start, range(n)))  # the barrier makes each of the n threads start once
            torch.set_num_threads(main_threads)  # the default for threads started later
            _POOL[n] = pool
        return _POOL[n]


def in_streams(n, task):
    """``[task(0), ..., task(n-1)]``, each in a single-threaded worker with autograd off."""
    def run(i):
        with torch.no_grad():
            return task(i)
    pool = stream_pool(n)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # MKL's thread count is process-wide: one per stream meanwhile
    try:
        return list(pool.map(run, range(n)))
    finally:
        torch.set_num_threads(threads)


