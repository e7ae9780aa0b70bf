"""A log stream whose reader leaves (``2>&1 | head -1``, a ``tee`` that dies) or whose file
breaks must not end a run: the stream goes silent, training and saving carry on, exit code 0."""

import errno
import io
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from tqdm import tqdm

import main
from binary_ep import log_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ("--device -1 --archi fc --dataset digits --layersList 64 16 10 --T 4 --Kmax 2 --beta 0.5 "
         "--gamma 0.01 0.01 --gradThreshold 1e-6 1e-6 --lrBias 0.05 0.1 --batchSize 32 "
         "--test_batchSize 200 --trainSubset 64 --testSubset 64 --seed 1 --epochs 2").split()


def broken_pipe(encoding="utf-8", buffering=1):
    """A text stream (line-buffered unless told) on the write end of a pipe whose read end is closed."""
    r, w = os.pipe()
    os.close(r)
    return open(w, "w", buffering=buffering, encoding=encoding)


def is_devnull(fd):
    return os.path.samestat(os.fstat(fd), os.stat(os.devnull))


def assert_two_epochs_saved(out):
    (run,) = out.glob("DATA-0-fc-digits/*/S-*")
    assert list(pd.read_csv(run / "results.csv")["epoch"]) == [1, 2]
    assert torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["epoch"] == 2
    assert (run / "errors.png").exists()  # drawn after the last epoch: the run went to its end


def test_a_write_after_the_reader_left_makes_the_stream_silent():
    r, w = os.pipe()
    stream = open(w, "w", buffering=1)
    guard = log_stream.GuardedStream(stream)
    assert guard.write("first\n") == 6 and os.read(r, 100) == b"first\n"  # a live stream: passed on
    assert not is_devnull(w)
    os.close(r)  # the reader leaves
    assert guard.write("epoch 1\n") == 8  # EPIPE: swallowed, nothing raised
    assert guard.silent and is_devnull(w)  # C-level writers and the final flush find /dev/null
    assert guard.write("epoch 2\n") == 8
    guard.flush()
    print("a print", file=guard)
    assert stream.closed is False and guard.fileno() == w  # everything else is the stream's own
    stream.close()

    buffered = broken_pipe(buffering=-1)
    guard = log_stream.GuardedStream(buffered)
    guard.write("rank 1: waiting\n")  # in the buffer: nothing failed yet
    assert not guard.silent
    guard.reconfigure(line_buffering=True, write_through=False)  # as distributed.start does: flushes
    assert guard.silent and is_devnull(buffered.fileno())
    buffered.close()


def test_a_closed_stream_goes_silent_and_other_errors_still_raise():
    stream = io.StringIO()
    guard = log_stream.GuardedStream(stream)
    with pytest.raises(TypeError):  # a wrong argument is a bug of the caller, not a broken stream
        guard.write(b"bytes")
    assert not guard.silent
    stream.close()
    assert guard.write("after close\n") == 12 and guard.silent
    guard.flush()

    ascii_pipe = broken_pipe("ascii")
    guard = log_stream.GuardedStream(ascii_pipe)
    with pytest.raises(UnicodeEncodeError):  # a ValueError, but the stream is fine
        guard.write("\u00e9\n")
    assert not guard.silent and not is_devnull(ascii_pipe.fileno())

    class Busy(io.StringIO):
        def write(self, text):
            raise BlockingIOError(errno.EAGAIN, "busy", 0)  # not a stream that broke
    guard = log_stream.GuardedStream(Busy())
    with pytest.raises(BlockingIOError):
        guard.write("x\n")
    assert not guard.silent
    guard = log_stream.GuardedStream(broken_pipe())
    guard.write("x\n")
    assert guard.silent
    guard._stream.close()


def test_a_tqdm_bar_made_inside_the_block_writes_through_the_guard(monkeypatch):
    pipe, buffered = broken_pipe(), broken_pipe(buffering=-1)
    monkeypatch.setattr(sys, "stderr", pipe)
    monkeypatch.setattr(sys, "stdout", buffered)
    with log_stream.guarded_streams():
        guard = sys.stderr
        assert isinstance(guard, log_stream.GuardedStream) and guard._stream is pipe
        assert sum(tqdm(range(3), disable=False, mininterval=0)) == 3  # bar on the broken stream
        tqdm.write("a line", file=sys.stderr)
        assert guard.silent and is_devnull(pipe.fileno())
        print("kept in the buffer")  # block-buffered: the pipe's failure is not seen yet
        assert not sys.stdout.silent
    # put back for whoever called main in-process; stdout's failure was found by the last flush,
    # so the interpreter's final flush will not fail (exit code 120)
    assert sys.stderr is pipe and sys.stdout is buffered and is_devnull(buffered.fileno())
    pipe.close()
    buffered.close()


def test_main_in_process_with_a_broken_stderr_trains_saves_and_returns_0(tmp_path, monkeypatch, one_thread):
    pipe = broken_pipe()
    monkeypatch.setattr(sys, "stderr", pipe)
    assert main.main(QUICK + ["--outDir", str(tmp_path)]) == 0
    assert sys.stderr is pipe and is_devnull(pipe.fileno())
    assert_two_epochs_saved(tmp_path)
    pipe.close()


def test_a_pipe_closed_by_its_reader_after_one_line(tmp_path):
    """What ``| head -1`` does, step by step: read one line of stdout + stderr, close the read end."""
    env = dict(os.environ, EP_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "main.py"] + QUICK + ["--outDir", str(tmp_path)], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert p.stdout.readline().startswith(b"run folder: ")
    p.stdout.close()
    assert p.wait(timeout=120) == 0
    assert_two_epochs_saved(tmp_path)
