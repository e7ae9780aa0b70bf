"""``checkpoint.pt``: everything a run needs to resume, and the random number generators' states."""

import os

import numpy as np
import torch

from binary_ep.files import atomic_write


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, net, epoch, args, generators):
    """``checkpoint.pt``: weights, biases, alpha (in the weights), filter buffers, RNG states, epoch,
    arguments; written atomically."""
    payload = {"epoch": epoch, "model": net.state_dict(), "optW": net.optW.state_dict(),
               "optB": net.optB.state_dict(), "rng": rng_state(),
               "generators": {k: g.get_state() for k, g in generators.items()},
               "args": dict(vars(args))}
    atomic_write(os.path.join(path, "checkpoint.pt"), lambda tmp: torch.save(payload, tmp))


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


