"""Fully connected binary-weight EP network (DESIGN.md section 4).

States are stored feature-major ("column" layout, one column per sample), so the code reads
like the math: ``s[k]`` has shape (n_k, B), ``s[0]`` is the output (10 units), the input ``x``
is clamped.  ``W[k]`` (an ``nn.Linear`` of weight shape (n_k, n_{k+1})) maps ``s[k+1] -> s[k]``;
``W[-1]`` maps the input.  Every per-layer list (gamma, gradThreshold, lrBias, lrAlpha) is
ordered like ``W``: output layer first.
"""

from collections import namedtuple

import torch
import torch.nn as nn

from binary_ep.activations import one_hot
from binary_ep.binary_optimizer import current_alpha
from binary_ep.events import Events, event_driven
from binary_ep.network import EPNetwork
from binary_ep.neurons import count, neuron_model, outer_count


FcConstants = namedtuple("FcConstants", "x W WT b alpha first events")
FcConstants.__doc__ = """What stays constant while one batch relaxes: ``x``, the input drive
``W[-1] x + b[-1]`` (n_{L-2}, B); ``W`` and ``WT``, the weight matrices and the contiguous
transposes of all but the input layer's; ``b``, the bias columns (n_k, 1); ``alpha``: None for
rate neurons (``W`` are the weights), else each layer's alpha (1, 1), with ``W``/``WT`` (but
the input layer's) the +-1 sign matrices of ``neurons.count_signs`` (binary neurons: products of
bits are integer counts times alpha); binary neurons also have ``first``, the count of all-ones
inputs of each product (``("down", k)``: ``sign(W[k]) 1``, ``("up", k)``: ``sign(W[k-1])^T 1``,
(n_k,)) and ``events``, the stream's ``events.Events`` (else None)."""


def _addmm(bias, a, b, out):
    """``bias + a @ b`` into ``out`` (a reused buffer) unless autograd is recording."""
    if out is None or torch.is_grad_enabled():
        return torch.addmm(bias, a, b)
    return torch.addmm(bias, a, b, out=out)


class Network_fc(EPNetwork):
    batch_dim = 1  # states and targets are (n_k, B)

    def __init__(self, args):
        """``args.layersList`` is input first (784 4096 10); internally sizes run output first."""
        super().__init__()
        self.sizes = list(reversed(args.layersList))  # [10, 4096, 784]
        self.neurons, self.expand_output = neuron_model(args), args.expand_output
        self.W = nn.ModuleList(nn.Linear(self.sizes[k + 1], self.sizes[k])
                               for k in range(len(self.sizes) - 1))
        names = [f"fc{k}" for k in range(len(self.W))]
        # learnt alpha: the original fc class scales its alpha estimate by 0.5 (DESIGN.md section 4)
        self._setup_optimizers(args, [l.weight for l in self.W], [l.bias for l in self.W], names,
                               [False] * len(self.W), alpha_scale=0.5)

    def target(self, labels):
        """One-hot targets in {0, 1}, each class's entry repeated ``expand_output`` (E) times,
        shape (10 E, B)."""
        return one_hot(labels, self.expand_output).to(self.W[0].weight.dtype).t()

    def output(self, s):
        """Output states, shape (B, 10 E)."""
        return s[0].t()

    def initHidden(self, batch):
        """Every state set to 1: a list of (n_k, B) tensors, output first."""
        w = self.W[0].weight
        return [torch.ones(n, batch, device=w.device, dtype=w.dtype) for n in self.sizes[:-1]]

    def input_drive(self, x):
        """``x``: the flattened images, (B, n_input).  The batch's constants during both phases:
        ``W[-1] x + b[-1]`` of shape (n_{L-2}, B), plus the weight matrices, their contiguous
        transposes and the bias columns the stepper uses (made once per batch instead of once per
        step; binary neurons: the sign matrices, made once per weight update)."""
        layer = self.W[-1]
        drive = torch.addmm(layer.bias.unsqueeze(1), layer.weight, x.t())
        biases = [l.bias.unsqueeze(1) for l in self.W]
        if self.neurons.binary:
            W, WT, alpha, first = self._sign_constants()
            return FcConstants(drive, W, WT, biases, alpha, first, Events(event_driven(x.device)))
        weights = [l.weight for l in self.W]
        return FcConstants(drive, weights, [w.t().contiguous() for w in weights[:-1]], biases, None, None, None)

    def _sign_constants(self):
        """Binary neurons read bits: the sign matrices of all but the input layer (with the
        input layer's weight, which reads x), their transposes, alpha and the counts of all-ones
        inputs (``FcConstants``; ``self.signs`` keeps them from one weight update to the next)."""
        signs = [self.signs.get(l.weight) for l in self.W[:-1]]
        first = {("down", k): m.rows for k, m in enumerate(signs)}
        first.update({("up", k + 1): m.cols for k, m in enumerate(signs)})
        return ([m.S for m in signs] + [self.W[-1].weight], [m.ST for m in signs],
                [current_alpha(l.weight, False) for l in self.W], first)

    def split_drive(self, drive, n):
        events = drive.events
        return [drive._replace(x=part.contiguous(), events=events and events.fresh())
                for part in drive.x.tensor_split(n, 1)]

    def stepper(self, s, drive, target=None, beta=0.0, out=None, record=None, ref=None):
        """One synchronous step, every layer from the previous states ``s``; rate neurons::

            s[0] <- rho(W[0] s[1] + b[0])  (+ beta (y - s[0]) in the nudged phase)
            s[k] <- rho(W[k] s[k+1] + b[k] + W[k-1]^T s[k-1])
            every state clamped to [0, 1]

        binary neurons (``BinaryNeurons``) read the bits ``H(s - rho_threshold)`` of their
        neighbours, as integer counts times alpha, and filter their input into their states.
        ``drive`` comes from ``input_drive`` (``drive.x`` is ``W[-1] x + b[-1]``); the nudge
        pulls towards ``target`` from ``ref`` (default the current ``s[0]``).  ``out``
        (optional, scratch buffers the caller owns) receives the new states of rate neurons,
        except the bottom hidden layer's, which is then updated in place in ``s`` (computed
        last, after its only reader): only ``relax`` passes ``out``, with states of its own.
        The fc step needs nothing besides the states for the gradient: ``record`` stays empty.
        """
        n, neurons = len(s), self.neurons
        if neurons.binary:
            return self._binary_step(s, drive, target, beta, ref)
        b = [neurons.send(v) for v in s]
        new = []
        for k in range(n):
            buf = None if out is None else out[k]
            if k == n - 1 and n > 1 and out is not None:
                buf = s[k]  # its one reader, layer k - 1, is done: update in place (less cache)
            if k == n - 1:  # bottom state: constant input drive
                a = drive.x.clone() if n == 1 else _addmm(drive.x, drive.WT[k - 1], b[k - 1], buf)
            else:
                a = _addmm(drive.b[k], drive.W[k], b[k + 1], buf)
                if k > 0:
                    a = _addmm(a, drive.WT[k - 1], b[k - 1], a)
            diff = target - (s[0] if ref is None else ref) if k == 0 and beta != 0 else None
            new.append(neurons.update(s[k], a, diff, beta))
        return new

    def _binary_step(self, s, drive, target, beta, ref):
        """The step of binary neurons: each layer sends its bits (``drive.events``), every
        product of bits is a count, brought up to date from the bits that changed or computed
        densely (``Events.product``; the same numbers either way)."""
        n, neurons, events = len(s), self.neurons, drive.events
        sent = [events.send(k, neurons.bits(v), 1) for k, v in enumerate(s)]

        def counts(key, matrix, rows, j):
            return events.product(key, sent[j], rows, drive.first[key], s[0].dtype, matrix)
        new = []
        for k in range(n):
            a = self._counted_input(drive, None, k, n, counts)
            diff = target - (s[0] if ref is None else ref) if k == 0 and beta != 0 else None
            new.append(neurons.update(s[k], a, diff, beta))
        return new

    @staticmethod
    def _counted_input(drive, b, k, n, counts=None):
        """The input of layer ``k`` from the bits ``b`` of its neighbours (floats), (n_k, B)::

            alpha_k count(sign(W[k]) b[k+1]) + b[k] + alpha_{k-1} count(sign(W[k-1])^T b[k-1])

        (the bottom hidden layer: the input drive ``W[-1] x + b[-1]`` for the first two terms);
        each count is an exact integer, each term added as ``addcmul`` adds it.  ``counts(key,
        matrix, rows, j)`` gives the count of layer ``j``'s bits through ``matrix`` (``rows``: its
        transpose), read only; by default the dense product of ``b[j]``."""
        if counts is None:
            def counts(key, matrix, rows, j):
                return count(matrix, b[j])
        if k == n - 1:
            a = drive.x if n > 1 else drive.x.clone()
        else:
            a = torch.addcmul(drive.b[k], counts(("down", k), drive.W[k], drive.WT[k], k + 1), drive.alpha[k])
        if k > 0:
            up = counts(("up", k), drive.WT[k - 1], drive.W[k - 1], k - 1)
            a = torch.addcmul(a, up, drive.alpha[k - 1]) if k == n - 1 else a.addcmul_(up, drive.alpha[k - 1])
        return a

    def computeGradient(self, x, plus, minus, beta_span, batch=None):
        """Write the EP estimate of ``dL/dW = -dW`` of every layer for ``updateWeights``::

            dW[k] = (s_+[k] s_+[k+1]^T - s_-[k] s_-[k+1]^T) / (beta_span B)
            db[k] = sum_batch(s_+[k] - s_-[k]) / (beta_span B)

        with ``plus``/``minus`` the ``Phase`` of the nudged/free states (one-sided, ``beta_span =
        beta``) or of the +beta and -beta nudged states (symmetric, ``beta_span = 2 beta``), and
        for binary neurons their bits ``H(s - rho_threshold)`` in place of ``s`` (the difference
        of products then one exact integer product, ``neurons.outer_count``); ``x``
        is (b, n_input), the samples of this process; B is ``batch`` (the global mini-batch of a
        data-parallel run, whose ranks add up their sums; default b).  The input layer's is
        ``(s_+[L-2] - s_-[L-2]) x``, one product, handed to the flip optimizer as its two factors
        (``set_outer_grad``: (n, b) and (b, n_input)), which forms it block by block.
        """
        send = self.neurons.send  # rate neurons: the states; binary neurons: their bits
        s_plus, s_minus = [send(v) for v in plus.states], [send(v) for v in minus.states]
        c = 1.0 / (beta_span * (x.shape[0] if batch is None else batch))
        n = len(s_plus)
        for k, layer in enumerate(self.W):
            w, b = layer.weight, layer.bias
            if b.grad is None:
                b.grad = torch.empty_like(b)
            diff = s_plus[k] - s_minus[k]
            if k == n - 1:
                self.optW.set_outer_grad(w, diff, x, -c)
            else:
                if w.grad is None:
                    w.grad = torch.empty_like(w)
                if self.neurons.binary:  # products of bits: one integer product
                    outer_count(s_plus[k], s_minus[k], s_plus[k + 1], s_minus[k + 1], -c, w.grad)
                else:
                    torch.addmm(w.grad, s_plus[k], s_plus[k + 1].t(), beta=0, alpha=-c, out=w.grad)
                    w.grad.addmm_(s_minus[k], s_minus[k + 1].t(), alpha=c)
            torch.sum(diff, 1, out=b.grad).mul_(-c)
