"""The neuron models (DESIGN.md section 10): what a neuron sends to its neighbours and how its
state follows its input.  ``Network_fc`` and ``Network_conv`` take one (``neuron_model``); the
weights, the flip rule, the phases and the estimators are the same for both.

* ``RateNeurons`` (``--binary_settings bin_W``): a neuron sends its state ``s`` in [0, 1], and
  its state is ``rho(a)`` of its input ``a`` (plus the nudge at the output), clamped to [0, 1].
* ``BinaryNeurons`` (``bin_W_N``): the state ``s`` in [0, 1] is a filtered pre-activation (a
  membrane); the neuron sends the bit ``b = H(s - rho_threshold)`` (H(0) = 1); its input is
  masked by ``rho'(s - rho_threshold)`` (1 where ``|s - rho_threshold| <= 0.5``) and the state
  follows it with the low-pass filter ``s <- clamp((1 - gamma_neur) s + gamma_neur a, 0, 1)``.
  Every product of binary inputs is then an integer count (``sign(W) b``) times alpha.
"""

import torch

from binary_ep.activations import rho


class RateNeurons:
    """Full-precision neurons: send ``s``, update ``s <- clamp(rho(a) + nudge, 0, 1)``."""

    kind = "rate"
    binary = False

    def __init__(self, activation):
        self.activation = activation

    def send(self, s):
        """What a layer of states ``s`` (any shape) sends: the states themselves (not a copy)."""
        return s

    def update(self, s, a, diff=None, beta=0.0):
        """The new states of a layer from its input ``a`` (a fresh tensor, overwritten unless
        autograd records through it), its previous states ``s`` (unused) and, for the output
        layer in a nudged phase, ``diff = y - s_ref``: ``clamp(rho(a) + beta diff, 0, 1)``."""
        a = rho(a, self.activation)
        if diff is None:
            return a
        if torch.is_grad_enabled() and (a.requires_grad or diff.requires_grad):
            return (a + beta * diff).clamp(0, 1)
        return a.add_(diff, alpha=beta).clamp_(0, 1)


class BinaryNeurons:
    """Binary neurons with a filtered membrane: send ``H(s - rho_threshold)``, update
    ``s <- clamp((1 - gamma_neur) s + gamma_neur (rho'(s - rho_threshold) a + nudge), 0, 1)``."""

    kind = "binary"
    binary = True

    def __init__(self, rho_threshold, gamma_neur):
        self.rho_threshold, self.gamma_neur = rho_threshold, gamma_neur

    def send(self, s):
        """The bits of the states ``s`` (any shape): 1.0 where ``s >= rho_threshold``, else 0.0."""
        return (s >= self.rho_threshold).to(s.dtype)

    def mask(self, s):
        """``rho'(s - rho_threshold)``: True where ``|s - rho_threshold| <= 0.5``."""
        return (s - self.rho_threshold).abs_() <= 0.5

    def update(self, s, a, diff=None, beta=0.0):
        """The new states of a layer from its input ``a`` (a fresh tensor, overwritten), its
        previous states ``s`` (read) and, for the output layer in a nudged phase, ``diff = y -
        s_ref``: the input masked by ``rho'``, plus ``beta diff``, filtered into the states."""
        a.mul_(self.mask(s))
        if diff is not None:
            a.add_(diff, alpha=beta)
        g = self.gamma_neur
        return a.mul_(g).add_(s, alpha=1.0 - g).clamp_(0, 1)


def neuron_model(args):
    """The neuron model ``--binary_settings`` names, with its constants from ``args``."""
    if args.binary_settings == "bin_W_N":
        return BinaryNeurons(args.rho_threshold, args.gamma_neur)
    return RateNeurons(args.activationFun)
