"""``checkpoint.pt``: everything a run needs to resume, and the random number generators' states."""

import io
import os

import numpy as np
import torch

from binary_ep.files import write_bytes


def rng_state():
    """The CPU generators' states (torch, numpy).  Nothing draws from the CUDA generators (the
    data order, beta's sign and the augmentation use CPU generators), so their states are not
    saved: a checkpoint resumes on a machine with any number of GPUs."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}


def set_rng_state(state):
    """Restore ``rng_state``'s states (the CUDA states older checkpoints carry are ignored)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])


def save_checkpoint(path, net, epoch, args, generators):
    """``checkpoint.pt``: weights, biases, alpha (in the weights), filter buffers, RNG states, epoch,
    arguments (their effective values; what each invocation typed is in Hyperparameters.txt);
    written atomically."""
    payload = {"epoch": epoch, "model": net.state_dict(), "optW": net.optW.state_dict(),
               "optB": net.optB.state_dict(), "rng": rng_state(),
               "generators": {k: g.get_state() for k, g in generators.items()},
               "args": {k: v for k, v in vars(args).items() if k != "given"}}
    write_bytes(os.path.join(path, "checkpoint.pt"), checkpoint_bytes(payload))


def checkpoint_bytes(payload):
    """``torch.save`` of ``payload`` into memory: its ``RuntimeError`` on a full disk carries no
    errno, so the bytes go to disk through ``write_bytes``, whose ``OSError`` does."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def load_checkpoint(path, net, generators):
    """Restore what ``save_checkpoint`` wrote; returns the epoch it was taken after."""
    payload = torch.load(os.path.join(path, "checkpoint.pt"), map_location="cpu", weights_only=False)
    net.load_state_dict(payload["model"])
    net.optW.load_state_dict(payload["optW"])
    net.optB.load_state_dict(payload["optB"])
    set_rng_state(payload["rng"])
    for k, g in generators.items():
        g.set_state(payload["generators"][k])
    return payload["epoch"]


