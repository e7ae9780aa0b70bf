"""The activations, one-hot targets and the readouts of the output layer (DESIGN.md sections 4,
5 and 10).

Every state is clamped to [0, 1]: ``hardsigm`` is ``clamp(a, 0, 1)``, ``sigm`` the logistic of
slope 4 centred on 0.5, ``tanh`` the hyperbolic tangent clamped to [0, 1].  ``heaviside`` names
the binary neurons of ``binary_ep.neurons`` (they send ``H(s - rho_threshold)``), not a ``rho``.
"""

import torch

from binary_ep.vocabulary import N_CLASSES


def rho(a, name):
    """Activation followed by the clamp of every state to [0, 1].

    Works in place (``a`` must be a fresh tensor the caller owns) unless autograd is recording
    through ``a`` (BPTT), where the out-of-place form keeps the graph valid.
    """
    inplace = not (torch.is_grad_enabled() and a.requires_grad)
    if name == "hardsigm":
        return a.clamp_(0, 1) if inplace else a.clamp(0, 1)
    if name == "sigm":  # logistic of slope 4 centred on 0.5, as in the original code
        return torch.sigmoid_(a.sub_(0.5).mul_(4)) if inplace else torch.sigmoid(4 * (a - 0.5))
    if name == "tanh":  # tanh, then clamped to [0, 1] like every state
        return a.tanh_().clamp_(0, 1) if inplace else torch.tanh(a).clamp(0, 1)
    raise ValueError(f"unknown activation {name!r}")


def output_slope(s_out, activation):
    """Slope ``rho'(a)`` of the output activation at the pre-activation ``a`` that produced the
    output states ``s_out = rho(a)``, read off the states themselves (elementwise, same shape):
    hardsigm: 1 inside (0, 1), 0 where saturated; sigm (slope-4 logistic): ``4 s (1 - s)``;
    tanh clamped to [0, 1]: ``1 - s^2`` inside (0, 1), 0 where clamped."""
    inside = ((s_out > 0) & (s_out < 1)).to(s_out.dtype)
    if activation == "hardsigm":
        return inside
    if activation == "sigm":
        return 4 * s_out * (1 - s_out)
    if activation == "tanh":
        return inside * (1 - s_out * s_out)
    raise ValueError(f"unknown activation {activation!r}")


def one_hot(labels, expand=1):
    """One-hot targets in {0, 1}, each class's entry repeated ``expand`` (E) times in place
    (class c owns the outputs c E ... c E + E - 1): labels (B,) -> (B, 10 E) float32."""
    y = torch.nn.functional.one_hot(labels, N_CLASSES).to(torch.float32)
    return y if expand == 1 else y.repeat_interleave(expand, dim=1)


def class_scores(out, expand=1):
    """The population readout: the mean output state of each class's ``expand`` (E) neurons,
    (B, 10 E) -> (B, 10); the prediction is its argmax."""
    return out if expand == 1 else out.view(out.shape[0], N_CLASSES, expand).mean(2)


def first_neuron_scores(out, expand):
    """The first output neuron of each class alone, (B, 10 E) -> (B, 10)."""
    return out[:, ::expand]

