"""``checkpoint.pt``: everything a run needs to resume, and the random number generators' states."""

import io
import os

import numpy as np
import torch

from binary_ep.files import write_bytes
from binary_ep.vocabulary import UserError


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
    """Restore what ``save_checkpoint`` wrote (once ``check_network`` found its tensors shaped
    like ``net``'s); returns the epoch it was taken after."""
    payload = torch.load(os.path.join(path, "checkpoint.pt"), map_location="cpu", weights_only=False)
    check_network(path, payload.get("model"), net)
    net.load_state_dict(payload["model"])
    net.optW.load_state_dict(payload["optW"])
    net.optB.load_state_dict(payload["optB"])
    set_rng_state(payload["rng"])
    for k, g in generators.items():
        g.set_state(payload["generators"][k])
    return payload["epoch"]


def check_network(path, model, net):
    """``UserError`` unless the saved state_dict ``model`` of ``path/checkpoint.pt`` has exactly
    ``net``'s tensors, each of ``net``'s shape (``W.0.weight`` of an fc net: (layersList[-1],
    layersList[-2])); ``net`` is built from the checkpoint's own arguments, so a mismatch is a
    checkpoint whose arguments were edited, or whose tensors are another run's."""
    ckpt = os.path.join(path, "checkpoint.pt")
    advice = "restore checkpoint.pt from a copy or start a new run"
    if not isinstance(model, dict):
        raise UserError(f"{ckpt} holds no network (no 'model' state); it is damaged: {advice}")
    needed = net.state_dict()
    for name, tensor in needed.items():
        if name not in model:
            raise UserError(f"{ckpt} has no tensor {name}, which the network its arguments describe "
                            f"needs: {advice}")
        shape = tuple(getattr(model[name], "shape", ()))
        if shape != tuple(tensor.shape):
            raise UserError(f"{ckpt}: tensor {name} is {_shape(shape)} but the network its arguments "
                            f"describe needs {_shape(tensor.shape)} (its arguments were edited, or its "
                            f"tensors are another run's): {advice}")
    extra = sorted(set(model) - set(needed))
    if extra:
        raise UserError(f"{ckpt} has tensors the network its arguments describe does not have "
                        f"({', '.join(extra)}): {advice}")


def _shape(shape):
    return "x".join(str(n) for n in shape) if len(shape) else "a scalar"
