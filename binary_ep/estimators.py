"""Gradient estimators, interchangeable behind one call.

``estimator.compute_gradient(net, x, target, batch=None)`` relaxes the batch ``x`` (the
network's input layout) and leaves the estimate of ``dL/dtheta`` (``L = ||s[0] - y||^2 / 2``
summed over the output units, averaged over ``batch`` samples: by default those of ``x``; in a
data-parallel run the global mini-batch, of which ``x`` is this rank's share, so that the ranks'
gradients add up to the one-process gradient) of every binary weight and bias in ``.grad``, where
``net.updateWeights()`` takes it: the flip rule for the weights, SGD for the biases.  A weight
whose gradient is a product of two thin factors (the fc input layer under EP) may be handed to
the flip optimizer as those factors (``optW.set_outer_grad``); ``net.weight_grads()`` forms it.
It returns the free-phase states, from which the loops read the error and the loss.

* ``EP``: equilibrium propagation, the seed's estimator: free phase, nudged phase(s),
  ``net.computeGradient`` from the two phases (one-sided: free and ``+beta``; symmetric:
  ``+beta`` and ``-beta``; with ``random_sign`` the sign of beta drawn per batch).
* ``BPTT``: backpropagation through the last ``Kmax`` free steps (autograd), the baseline the
  gradient check compares EP with.
"""

import torch


# The variants of EP: the betas of their nudged phases, in units of --beta.  Decided here once;
# the network runs the phases it is given (``EPNetwork.phases``).
NUDGED_PHASES = {"one-sided": (1.0,), "symmetric": (1.0, -1.0)}


def nudged_betas(nudging, beta):
    """The betas of the nudged phases of the EP variant ``nudging``: ``(beta,)`` one-sided,
    ``(beta, -beta)`` symmetric."""
    return tuple(m * beta for m in NUDGED_PHASES[nudging])


def ep_gradient(net, x, free, nudged, betas, batch=None):
    """``net.computeGradient`` from the phases of one EP variant: one nudged phase against the
    free one (``beta_span = beta``), or two nudged phases against each other (``beta_span =
    beta_1 - beta_2``, 2 beta for symmetric nudging)."""
    plus, minus = (nudged[0], free) if len(nudged) == 1 else nudged
    span = betas[0] - (betas[1] if len(betas) > 1 else 0.0)
    net.computeGradient(x, plus, minus, span, batch)


class EP:
    """Equilibrium propagation with nudging strength ``beta``; ``nudging`` is ``one-sided`` or
    ``symmetric`` (``NUDGED_PHASES``); with a ``sign_generator`` (a ``torch.Generator``) the sign
    of beta is drawn per batch (``--random_beta 1``)."""

    def __init__(self, beta, nudging="one-sided", sign_generator=None):
        self.beta, self.nudging, self.sign_generator = beta, nudging, sign_generator

    def compute_gradient(self, net, x, target, batch=None):
        beta = self.beta
        if self.sign_generator is not None and float(torch.rand(1, generator=self.sign_generator)) < 0.5:
            beta = -beta
        betas = nudged_betas(self.nudging, beta)
        free, *nudged = net.phases(x, target, betas)
        ep_gradient(net, x, free, nudged, betas, batch)
        return free.states


def loss(s, target, batch):
    """``||s[0] - y||^2 / 2`` summed over the output units, averaged over ``batch`` samples."""
    return 0.5 * (s[0] - target).pow(2).sum() / batch


def truncated_gradient(net, x, s_start, target, steps, batch=None):
    """Gradient of ``L(s)`` (averaged over ``batch`` samples, default ``x.shape[0]``) after
    ``steps`` free steps from ``s_start`` (a constant) w.r.t. every binary weight and bias
    (weights then biases, output layer first), by autograd.  Returns (grads, final states
    detached); no graph survives the call."""
    params = net.binary_weights() + net.biases()
    with torch.enable_grad():
        drive = net.input_drive(x)  # rebuilt with graph: the input weights and biases live here
        s = net.forward([v.detach() for v in s_start], drive, steps)
        grads = torch.autograd.grad(loss(s, target, x.shape[0] if batch is None else batch), params,
                                    allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return grads, [v.detach() for v in s]


class BPTT:
    """``--optim bptt``: a free phase of ``T`` steps from ``initHidden``, the first ``T - Kmax``
    without graph, the last ``Kmax`` through autograd; the exact gradient of ``L`` in ``.grad``."""

    def __init__(self, T, Kmax):
        self.T, self.K = T, min(Kmax, T)

    def compute_gradient(self, net, x, target, batch=None):
        with torch.no_grad():
            drive = net.input_drive(x)
            s = net.initHidden(x.shape[0])
            if self.T - self.K:
                s = net.forward(s, drive, self.T - self.K)
            del drive
        grads, s = truncated_gradient(net, x, s, target, self.K, batch)
        for p, g in zip(net.binary_weights() + net.biases(), grads):
            if p.grad is None or p.grad.shape != p.shape:
                p.grad = g.detach()
            else:
                p.grad.copy_(g)
        return s


def make_estimator(args, sign_generator):
    """The estimator ``--optim`` names, with the run's ``--beta``, ``--nudging`` and
    ``--random_beta`` (drawing the signs from ``sign_generator``)."""
    if args.optim == "bptt":
        return BPTT(args.T, args.Kmax)
    return EP(args.beta, args.nudging, sign_generator if args.random_beta else None)
