"""Data-parallel training on ``torch.distributed`` (DESIGN.md section 9).

PyTorch's own launcher starts the processes (``torchrun``, ``python -m torch.distributed.run``,
one node or several, SLURM through torchrun) and its process group moves the bytes: gloo on the
CPU, NCCL on CUDA.  Nothing here launches, schedules or transports anything itself.

Every rank holds a whole replica of the network and relaxes its share of each global batch (the
samples a one-process run with the same seed draws: ``datasets.share_bounds``); the EP sums are
normalised by the global batch and added up across the ranks (``Replicas.combine``), so every
rank applies the same flips, bias and alpha steps.  Rank 0 alone touches the run folder
(``Replicas.on_root``) and its outcome, good or bad, reaches every rank.  Signals wait for the
next batch, where the ranks agree to stop together (``signals.hold``).  A rank that dies makes
the others' next collective fail; they name it from the heartbeats every rank counts up in the
launcher's key-value store.  A rank that hangs (or dies under NCCL, whose collectives then wait
forever) is found by the same heartbeats: a rank blocked on it ends with one line and exit 6.
Only public ``torch.distributed`` APIs that torch 2.4 documents are used (tests/test_distributed_api.py).
"""

import contextlib
import datetime
import hashlib
import inspect
import math
import os
import shlex
import signal
import sys

import torch
import torch.distributed as dist

from binary_ep import heartbeat, signals
from binary_ep.datasets import share_bounds
from binary_ep.device import cuda_problem, prepare

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# A collective waits this long for a live peer: longer than any work rank 0 does alone (a
# download, a checkpoint, the plots); a dead peer is noticed at once (its sockets close).
TIMEOUT = datetime.timedelta(minutes=30)
STOPPED = heartbeat.STOPPED  # exit code of a rank that stops because another rank failed or was lost


class StopAll(Exception):
    """This rank stops because of another (rank 0 failed, a peer was lost, the replicas
    differ): one sentence, and ``code``, the exit status."""

    def __init__(self, message, code=STOPPED):
        super().__init__(message)
        self.code = code


def select_device(error, index, local_rank=None, warn=True):
    """The ``torch.device`` of ``--device index``: -1 the CPU, N >= 0 GPU N; without CUDA a
    warning (when ``warn``) and the CPU.  Under a launcher (``local_rank`` given) any N >= 0
    means the GPUs and the rank takes GPU ``local_rank`` of its node.  ``error(message)`` reports
    an index beyond the node's GPUs (it exits)."""
    if index < 0:
        return torch.device("cpu")
    problem = cuda_problem(index if local_rank is None else local_rank)
    if problem is not None:
        if warn:
            print(f"warning: --device {index} asked for a GPU but CUDA is not available; running on "
                  f"the CPU: {problem}", file=sys.stderr)
        return torch.device("cpu")
    count = torch.cuda.device_count()

    def names():
        return ", ".join(f"{i} ({torch.cuda.get_device_name(i)})" for i in range(count))
    if index >= count:
        error(f"--device {index} does not exist; available GPUs: {names()}; use -1 for the CPU")
    if local_rank is None:
        return torch.device("cuda", index)
    if local_rank >= count:
        error(f"local rank {local_rank} has no GPU of its own: this node has {count} ({names()}); "
              f"start at most {count} processes per node (--nproc_per_node), or use --device -1")
    return torch.device("cuda", local_rank)


def launcher_environment(error):
    """``(rank, world size, local rank)`` from the variables a launcher sets, or None when none
    is set (plain ``python main.py``).  A partial or inconsistent set is ``error(message)``."""
    present = [v for v in LAUNCHER_VARIABLES if v in os.environ]
    if not present:
        return None
    missing = [v for v in LAUNCHER_VARIABLES if v not in os.environ]
    if missing:
        error(f"the environment of a launcher is incomplete ({', '.join(present)} set, "
              f"{', '.join(missing)} missing): start data-parallel runs with torchrun "
              f"--nproc_per_node N main.py ..., or unset {', '.join(present)} for one process")
    try:
        rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        error("RANK, WORLD_SIZE and LOCAL_RANK must be integers; start data-parallel runs with "
              "torchrun --nproc_per_node N main.py ...")
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        error(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} do not describe a rank of a "
              f"process group; start data-parallel runs with torchrun --nproc_per_node N main.py ...")
    return rank, world, local


class Replicas:
    """The processes that train one run together, one replica of the network each: ``rank`` of
    ``world`` (rank 0 owns the run folder), ``device`` this rank computes on.  With ``world = 1``
    and no process group (plain ``python main.py``) every method is a no-op that costs nothing."""

    def __init__(self, device, rank=0, world=1, local_rank=0, group=False):
        self.device, self.rank, self.world, self.local_rank = device, rank, world, local_rank
        self.active, self._heartbeat = group, None

    @property
    def share(self):
        """``(rank, world)``: which share of every global batch this rank takes."""
        return self.rank, self.world

    # -- collectives; a failure becomes StopAll naming the lost rank ---------------------------
    def _run(self, collective, *args, **kwargs):
        try:
            with self._waiting():
                collective(*args, **kwargs)
        except RuntimeError as e:  # DistBackendError, DistNetworkError: a peer's failure
            raise self._lost(e) from None

    def _waiting(self):
        """Context of a wait on the other ranks (the heartbeat's watchdog watches it)."""
        return self._heartbeat.waiting() if self._heartbeat is not None else contextlib.nullcontext()

    def sum_(self, t):
        """``t`` summed over the ranks, in place (returned)."""
        if self.active:
            self._run(dist.all_reduce, t)
        return t

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.active:
            return value
        box = [value]
        self._run(dist.broadcast_object_list, box, src=0)
        return box[0]

    def stop_flags(self, device):
        """(2,) float64 on ``device``: whether this rank holds a SIGINT, a SIGTERM (``signals.hold``);
        summed over the ranks they tell ``stop_if_asked`` whether to stop (zeros without a group)."""
        flags = torch.zeros(2, dtype=torch.float64, device=device)  # (made there: no copy, no wait)
        if self.active and signals.pending() is not None:
            flags[0 if signals.pending() == signal.SIGINT else 1] = 1.0
        return flags

    def stop_if_asked(self, summed, where):
        """``summed``: ``stop_flags`` added up over the ranks (floats).  When any rank holds a
        signal, every rank raises ``Interrupted`` here, at the same batch (``where``, words for
        the message): with the signal it holds itself, else SIGTERM if any rank holds one,
        else SIGINT."""
        if summed[0] + summed[1] > 0:
            own = signals.take_pending()
            stop = signals.Interrupted(own or (signal.SIGTERM if summed[1] > 0 else signal.SIGINT))
            stop.args = (f"{stop.args[0]}; every rank stopped after {where}",)
            raise stop

    def stop_point(self, device, where):
        """A batch boundary without other exchange (the test loop): stop together if asked."""
        if self.active:
            self.stop_if_asked(self.sum_(self.stop_flags(device)).tolist(), where)

    # -- the gradient ----------------------------------------------------------------------------
    def combine(self, net, batch, shared=None):
        """Add up the ranks' gradients of one global batch of ``batch`` samples (each normalised by
        ``batch``): afterwards every rank holds the one-process gradient and ``updateWeights``
        takes the same steps everywhere.  A weight whose gradient is pending as two thin factors
        (``optW.pending_factors``: a (n, b) and x (b, ...)) exchanges the factors, all-gathered
        in rank order, wherever ``batch * (n + x's row)`` numbers are fewer than the weight's;
        every rank then forms the product from the same factors, the one-process factors.
        Every other weight's ``.grad`` and every bias's are all-reduced as one flat tensor, with
        ``shared`` (a small 1-d tensor: counts, flags; sent in the gradients' dtype) at its end.
        Returns ``shared`` summed over the ranks (float64; without a group: ``shared``)."""
        if not self.active:
            return shared
        gather, reduce = [], []
        for w in net.binary_weights():
            factors = net.optW.pending_factors(w)
            if factors is not None and batch * (factors[0].shape[0] + math.prod(factors[1].shape[1:])) < w.numel():
                gather.append((w, factors))
                continue
            if factors is not None:  # the product is the smaller message: form it
                w.grad = net.optW.pending_grad(w)
            reduce.append(w.grad)
        reduce += [b.grad for b in net.biases()]
        extra = [] if shared is None else [shared.to(reduce[0].dtype)]
        flat = torch.cat([g.reshape(-1) for g in reduce] + extra)
        top = -(-batch // self.world)  # the largest share: all_gather needs equal sizes
        sent = []
        for w, (a, x, scale) in gather:  # this rank's rows [a^T | x], padded with zero rows to ``top``
            rows = a.new_zeros(top, a.shape[0] + math.prod(x.shape[1:]))
            rows[:a.shape[1], :a.shape[0]] = a.t()
            rows[:a.shape[1], a.shape[0]:] = x.flatten(1)
            sent.append((w, rows, a.new_empty(self.world * top, rows.shape[1]), a.shape[0], x.shape[1:], scale))
        try:  # the two collectives run side by side; all_gather (every rank's rows into its own
            # block of ``everyone``) is on every backend of every torch (gloo had no
            # all_gather_into_tensor in torch 2.1)
            with self._waiting():
                works = [dist.all_reduce(flat, async_op=True)]
                works += [dist.all_gather(list(everyone.split(top)), rows, async_op=True) for _, rows, everyone, *_ in sent]
                for work in works:
                    work.wait()
        except RuntimeError as e:  # DistBackendError, DistNetworkError: a peer's failure
            raise self._lost(e) from None
        offset = 0
        for g in reduce:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        sizes = [hi - lo for lo, hi in (share_bounds(batch, q, self.world) for q in range(self.world))]
        for w, _, everyone, n, tail, scale in sent:  # each rank's rows without its padding, in rank order
            rows = torch.cat([everyone[q * top:q * top + size] for q, size in enumerate(sizes)])
            net.optW.set_outer_grad(w, rows[:, :n].t().contiguous(),
                                    rows[:, n:].reshape((-1,) + tuple(tail)).contiguous(), scale)
        return None if shared is None else flat[offset:].to(torch.float64)

    # -- rank 0's work -----------------------------------------------------------------------------
    def on_root(self, work, send=True, live=True):
        """``work()`` on rank 0 alone; its outcome reaches every rank: the result (``send``; else
        None on the others), or the failure, which rank 0 raises itself and the others as
        ``StopAll`` naming it (or as ``Interrupted`` with rank 0's signal).  ``live``: signals
        raise on rank 0 during the work, as in one process (a download, say); else they wait for
        the next batch (a checkpoint: the epoch is saved whole, then every rank stops)."""
        if not self.active:
            return work()
        if self.rank == 0:
            outcome = ("failed", "it ended unexpectedly")
            signals.hold(not live)
            try:
                result = work()
                outcome = ("ok", result if send else None)
                return result
            except signals.Interrupted as e:
                outcome = ("interrupted", e.signum)
                raise
            except BaseException as e:
                outcome = ("failed", _sentence(e))
                raise
            finally:
                signals.hold(True)
                self.broadcast(outcome)
        kind, value = self.broadcast(None)
        if kind == "interrupted":
            signals.take_pending()
            raise signals.Interrupted(value)
        if kind == "failed":
            raise StopAll(f"rank 0 stopped: {value}")
        return value

    def root_first(self, work):
        """``work()`` on rank 0, then, once it succeeded, on the other ranks (rank 0 prepares
        what they share, a download say, before they read it)."""
        result = self.on_root(work, send=False)
        return result if self.rank == 0 else work()

    # -- replicas stay identical -------------------------------------------------------------------
    def check_replicas(self, net, epoch):
        """Compare a fingerprint (BLAKE2b) of every rank's weights (alpha included), biases and
        filter buffers with rank 0's; a difference stops every rank with ``StopAll``."""
        if not self.active:
            return
        tensors = dict(net.state_dict())
        for g in net.optW.param_groups:
            state = net.optW.state.get(g["params"][0], {})
            if "filtered_grad" in state:
                tensors[f"filter buffer of {g['name']}"] = state["filtered_grad"]
        mine = {name: _fingerprint(t) for name, t in tensors.items()}
        everyone = [None] * self.world
        self._run(dist.all_gather_object, everyone, mine)
        for rank, theirs in enumerate(everyone):
            differ = [name for name in mine if theirs.get(name) != everyone[0].get(name)]
            if differ:
                raise StopAll(f"the replicas drifted apart: after epoch {epoch}, rank {rank} holds "
                              f"other values than rank 0 in {', '.join(differ[:3])}; please report "
                              f"this with the command line")

    # -- a lost peer -------------------------------------------------------------------------------
    def _lost(self, error):
        """``StopAll`` for a failed collective, naming the ranks whose heartbeat stopped."""
        lost = self._heartbeat.lost() if self._heartbeat is not None else None
        if lost:
            return StopAll(heartbeat.lost_sentence(lost, self.rank))
        return StopAll(f"a collective with the other ranks failed ({_sentence(error)}); a peer rank was "
                       f"lost; rank {self.rank} stops too")


def lost_line(progress, rank):
    """``line(lost)``: the one line of rank ``rank`` that the heartbeat's watchdog ends because
    the ranks ``lost`` hang: main's line for them (``outcome.ending``) with the state of the run
    folder (``progress``, the run's ``outcome.Progress``; None: the sentence alone).  ``ending``'s
    one clean-up, rank 0 removing the folder it made while no epoch is finished, is not for that
    thread: rank 0 then says there is nothing to resume in it, and keeps it."""
    def line(lost):
        error = StopAll(heartbeat.lost_sentence(lost, rank))
        if progress is None:
            return f"main.py: error: {error}"
        if progress.root and progress.path is not None and progress.done == 0 and not progress.resumed:
            return (f"main.py: error: {error}; no epoch finished, so there is nothing to resume in "
                    f"{shlex.quote(str(progress.path))}")
        from binary_ep.outcome import ending  # (it imports this module); a finished epoch: no clean-up
        return ending(error, progress)[0]
    return line


def _fingerprint(t):
    """BLAKE2b digest of the bytes of tensor ``t``."""
    data = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.blake2b(data.view(torch.uint8).numpy() if data.numel() else b"", digest_size=16).hexdigest()


def _sentence(error):
    """The first line of an exception's message (its type when it has none; an exit code for
    ``SystemExit``, whose message was printed already)."""
    if isinstance(error, SystemExit):
        return f"it exited with code {error.code}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_CURRENT = None


def current():
    """The ``Replicas`` this process trains with (one process, no group, until ``start``)."""
    return _CURRENT if _CURRENT is not None else Replicas(torch.device("cpu"))


def start(parser, args, progress=None):
    """The ``Replicas`` of this process.  Plain ``python main.py``: one process on ``--device``.
    Under a launcher: joins its process group (gloo on the CPU, NCCL on CUDA; ``--device -1``
    the CPU, any ``--device N >= 0`` the rank's local GPU), a seed drawn because none was given
    becomes rank 0's, and signals are held for the ranks to stop together; ``progress`` (the
    run's ``outcome.Progress``) words the line of a rank that a hung peer blocks.  ``--check gdu`` and
    ``--export`` run on rank 0 alone, without a group: the other ranks get None (nothing to do).
    Bad launcher variables, more ranks than ``--batchSize`` or a GPU beyond the node's are
    ``parser.error``."""
    global _CURRENT
    env = launcher_environment(parser.error)
    rank, world, local = env or (0, 1, None)
    if rank and (args.check == "gdu" or args.export):
        return None
    if args.export:  # reads a checkpoint and writes a file: no device, no group
        _CURRENT = Replicas(torch.device("cpu"))
        return _CURRENT
    if env is None or args.check == "gdu":
        _CURRENT = Replicas(prepare(select_device(parser.error, args.device, local), getattr(args, "tf32", 0)))
        return _CURRENT
    if world > args.batchSize:
        parser.error(f"{world} ranks cannot share mini-batches of --batchSize {args.batchSize}: start "
                     f"at most {args.batchSize} processes or raise --batchSize")
    # every line reaches stderr in one write, so that the ranks' lines never interleave in a shared log
    sys.stderr.reconfigure(line_buffering=True, write_through=False)
    device = select_device(parser.error, args.device, local, warn=rank == 0)
    prepare(device, getattr(args, "tf32", 0))  # (a Namespace made by hand has no --tf32: float32)
    # Imported later (the first torch.optim optimizer imports torch._dynamo, which imports it),
    # torch.distributed.nn would capture the process group in its functions' default arguments
    # (group=group.WORLD): destroy_process_group could not end it, and its gloo threads would
    # release their last work while Python shuts down and abort the process (SIGABRT).  (Not
    # "import torch.distributed.nn", which would make torch a local name of this function.)
    from torch.distributed import nn  # noqa: F401
    # device_id (the NCCL communicator formed at once, on the rank's GPU) where this torch has it
    bind = {"device_id": device} if device.type == "cuda" and "device_id" in inspect.signature(
        dist.init_process_group).parameters else {}
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT, **bind)
    except Exception as e:  # noqa: BLE001 - the rendezvous failed: one sentence
        print(f"main.py: error: rank {rank} could not join the process group of the launcher "
              f"({_sentence(e)})", file=sys.stderr)
        sys.exit(STOPPED)
    _CURRENT = Replicas(device, rank, world, local, group=True)
    _CURRENT._heartbeat = heartbeat.Heartbeat(rank, world, device, lost_line(progress, rank))
    args.seed = _CURRENT.broadcast(args.seed)
    signals.hold(True)
    return _CURRENT


def stop():
    """Stop the heartbeat and leave the process group (if any), which ends its threads."""
    global _CURRENT
    replicas, _CURRENT = _CURRENT, None
    if replicas is not None and replicas.active:
        replicas._heartbeat.stop()
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - after a lost peer there may be nothing to destroy
            pass
