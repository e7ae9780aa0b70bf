"""Convolutional binary-weight EP network (DESIGN.md section 5).

Layers, named as the per-layer lists are ordered (output first):

* the classifier ``fc0 ... fc{F-1}`` (``nn.Linear``; ``fc0`` feeds the 10 output units,
  ``fc{F-1}`` reads the flattened top convolution state), from ``--layersList`` (input first);
* the convolutions ``conv0 ... conv{N-1}`` (``nn.Conv2d``, kernel ``--kernelSize``, stride 1,
  padding ``--padding``, each followed by a max-pool of size and stride ``--Fpool``), from
  ``--convList`` (top first, input channels last: ``64 32 1`` = conv1 1->32, conv0 32->64).

States, a list ordered like the layers: ``s[0..F-1]`` the classifier states (B, n_k), output
first, then ``s[F+i]`` the pooled state of convolution i, (B, C_i, H_i, W_i), top first.  The
input ``x`` (B, C, H, W) is clamped.  With P the pool, U the unpool and the indices of P taken
from the previous states at every step::

    s[F+i]   <- rho(P(conv_i(s[F+i+1])) + convT_{i-1}(U(s[F+i-1])))        (x below the bottom)
    s[F]     <- rho(P(conv_0(s[F+1])) + (s[F-1] W_{F-1}).view(B, C_0, H_0, W_0))
    s[k]     <- rho(s[k+1] W_k^T + b_k + s[k-1] W_{k-1})      (classifier, as in section 4)
    s[0]     <- rho(s[1] W_0^T + b_0)  (+ beta (y - s[0]) in the nudged phase)

Speed (the same arithmetic, arranged for the CPU): the bottom convolution of the clamped input,
``P(conv(x) + b)`` and its indices, does not change during relaxation, so ``input_drive`` computes
it once per batch (with the weights in the states' layout); convolution states are kept
channels-last, where convolutions, pooling and unpooling are fastest; the new states are written
into the previous step's buffers; on a multi-core CPU ``forward`` relaxes one share of the
batch per core, each single-threaded (samples never interact during relaxation); and on the CPU
the convolutions of states and the feedback through max-pools come from compiled kernels
(``cpu_kernels``) that skip the unpooled zeros and keep each term up to date from the values
that changed since the previous step (``Tracked``).
"""

from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from binary_ep import cpu_kernels
from binary_ep.activations import one_hot
from binary_ep.binary_optimizer import current_alpha
from binary_ep.events import Events, event_driven
from binary_ep.network import EPNetwork
from binary_ep.neurons import PerUpdate, count, count_signs, neuron_model
from binary_ep.vocabulary import INPUT_SHAPE, conv_geometry

ConvDrive = namedtuple("ConvDrive", "pooled indices conv_w fc_top tracked counted events")
ConvDrive.__doc__ = """What stays constant while one batch relaxes: ``pooled``, the bottom
convolution's term ``P(conv(x) + b)`` (B, C, H, W), and its max-pool ``indices``; ``conv_w``, the
convolution weights in the states' memory layout; ``fc_top``, the weight of the classifier layer
that reads the top convolution, its columns reordered to that state's (h, w, c) memory order;
``tracked``, a dict of the ``Tracked`` terms of the compiled CPU path (the drive of one stream
only: they change as the states relax); ``counted``: None for rate neurons, else ``Counted``;
``events``: binary neurons, the stream's ``events.Events`` (else None)."""

Counted = namedtuple("Counted", "fc fc_t fc_top fc_top_t conv fc_alpha conv_alpha flipped first")
Counted.__doc__ = """Binary neurons read bits, so their products are integer counts times alpha
(made once per weight update): ``fc``/``fc_t`` the +-1 sign matrices of the classifier and
their transposes (``fc_top``/``fc_top_t``: of ``ConvDrive.fc_top``), as ``neurons.count`` takes
them; ``conv`` those of the convolutions (states' layout, float); the alpha of each classifier
layer (1, 1) and of each convolution's output channels (1, C, 1, 1); ``flipped``: ``conv`` as
``cpu_kernels.conv_delta`` takes them; ``first``: the count of all-ones inputs of each product
(``("down", k)``: into classifier layer k from below, ``("up", k)``: from above, ``("top",)``:
into the top convolution, (n,); ``("conv", i)``: convolution i, (1, C, H, W))."""

# a tracked term is recomputed in full on its first step and after this many updates, and in a
# sample where more than this fraction of its input changed (there that is faster)
TRACKED_REFRESH = 25
TRACKED_MAX_CHANGED = 0.4


class Tracked:
    """A term of the step computed from a state, ``acc``, brought up to date at each step from
    the input values that changed since ``prev`` (and ``prev_idx``, pool indices): the
    convolution of a state (``cpu_kernels.conv_delta``, with ``wt`` its flipped weight) or the
    feedback through a max-pool (``cpu_kernels.unpool_conv_transpose_delta``).  In the MNIST
    line most values stay exactly equal from one step to the next once the relaxation settles
    (clamped at 0, or converged).  Recomputed in full every ``TRACKED_REFRESH`` updates, so that
    rounding cannot build up, and, sample by sample, where more than ``TRACKED_MAX_CHANGED`` of
    the input changed."""

    __slots__ = ("wt", "prev", "prev_idx", "acc", "updates")

    def __init__(self, acc, prev, prev_idx=None, wt=None):
        self.acc, self.prev, self.prev_idx, self.wt = acc, prev, prev_idx, wt
        self.updates = 0


class Network_conv(EPNetwork):
    def __init__(self, args):
        """Convolutions from ``args.convList`` (top first), classifier from ``args.layersList``
        (input first, ending with the 10 outputs); PyTorch's default initialisation, then
        binarised (alpha per output channel for convolutions, per layer for the classifier).
        Learnt alpha steps use the factor 1 of the original conv class (DESIGN.md section 5)."""
        super().__init__()
        self.geometry = conv_geometry(args, INPUT_SHAPE[args.dataset])
        self.neurons, self.expand_output = neuron_model(args), args.expand_output
        self.nudge_from_start = self.neurons.binary  # the free phase's output, as the original
        self.padding, self.fpool = args.padding, args.Fpool
        self.conv = nn.ModuleList(nn.Conv2d(g.input[0], g.conv[0], args.kernelSize, padding=args.padding)
                                  for g in self.geometry)
        top = self.geometry[0].pool
        self.sizes = list(reversed(args.layersList)) + [top[0] * top[1] * top[2]]  # [10, ..., flat]
        self.fc = nn.ModuleList(nn.Linear(self.sizes[k + 1], self.sizes[k])
                                for k in range(len(self.sizes) - 1))
        self.n_fc = len(self.fc)
        layers = list(self.fc) + list(self.conv)
        names = [f"fc{k}" for k in range(len(self.fc))] + [g.name for g in self.geometry]
        self._setup_optimizers(args, [l.weight for l in layers], [l.bias for l in layers], names,
                               [False] * len(self.fc) + [True] * len(self.conv), alpha_scale=1.0)
        self._counted_now = PerUpdate()  # binary neurons: ``Counted``, made once per weight update
        self.caches.append(self._counted_now)
        if self.neurons.binary:  # the original's conv bin_W_N: biases at 0, filters at 2 gamma N(0, 1)
            with torch.no_grad():
                for layer in layers:
                    layer.bias.zero_()
            self.optW.start_filters(lambda w, gamma: 2 * gamma * torch.randn(w.shape, dtype=w.dtype))

    # -- shapes --------------------------------------------------------------------------------
    # Convolution states live in the channels-last memory layout (shape (B, C, H, W) as usual,
    # channels contiguous in memory), where the convolutions and max-pools of this network run
    # fastest on the CPU; the classifier reads the top state in that (h, w, c) order.
    layout = torch.channels_last

    def target(self, labels):
        """One-hot targets in {0, 1}, each class's entry repeated ``expand_output`` (E) times,
        shape (B, 10 E)."""
        return one_hot(labels, self.expand_output).to(self.fc[0].weight.dtype)

    def output(self, s):
        """Output states, shape (B, 10 E)."""
        return s[0]

    def initHidden(self, batch):
        """Every state set to 1: classifier states (B, n_k) output first, then the pooled
        convolution states (B, C_i, H_i, W_i) top first."""
        w = self.fc[0].weight
        states = [torch.ones(batch, n, device=w.device, dtype=w.dtype) for n in self.sizes[:-1]]
        return states + [torch.ones((batch,) + g.pool, device=w.device, dtype=w.dtype)
                         .contiguous(memory_format=self.layout) for g in self.geometry]

    # -- dynamics ------------------------------------------------------------------------------
    def _pool(self, a):
        return F.max_pool2d(a, self.fpool, self.fpool, return_indices=True)

    def _unpool(self, s, indices, i):
        """Unpool the state of layer ``i`` to its convolution's output size."""
        return F.max_unpool2d(s, indices, self.fpool, self.fpool, output_size=self.geometry[i].conv[1:])

    @staticmethod
    def _flat(s):
        """(B, C, H, W) -> (B, H*W*C), the (h, w, c) order of ``ConvDrive.fc_top`` (a view for
        channels-last states)."""
        return s.permute(0, 2, 3, 1).flatten(1)

    def input_drive(self, x):
        """The batch's constants (``ConvDrive``): ``P(conv(x) + b)`` of the bottom convolution and
        its pool indices, the weights in the states' layout; made once per batch."""
        bottom = self.conv[-1]
        x = x.contiguous(memory_format=self.layout)
        conv_w = [l.weight.contiguous(memory_format=self.layout) for l in self.conv]
        fc_top = self._top_weight(self.fc[-1].weight)
        pooled, indices = self._pool(F.conv2d(x, conv_w[-1], bottom.bias, padding=self.padding))
        # (a one-channel input gives them the default layout)
        pooled, indices = (t.contiguous(memory_format=self.layout) for t in (pooled, indices))
        counted = events = None
        if self.neurons.binary:
            counted = self._counted_now.get([l.weight for l in list(self.fc) + list(self.conv)], self._counted)
            events = Events(event_driven(x.device))
        return ConvDrive(pooled, indices, conv_w, fc_top, {}, counted, events)

    def _top_weight(self, weight):
        """The classifier weight that reads the top convolution, its columns in that state's
        (h, w, c) memory order."""
        c, h, w = self.geometry[0].pool
        return weight.view(-1, c, h, w).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)

    def _counted(self):
        """``Counted`` of the current weights."""
        fc = [count_signs(l.weight.detach()) for l in self.fc]
        top = count_signs(self._top_weight(self.fc[-1].weight.detach()))
        fc_t, top_t = [w.t().contiguous() for w in fc], top.t().contiguous()
        conv = [torch.sign(l.weight.detach()).contiguous(memory_format=self.layout) for l in self.conv]
        dtype, nf, first = self.fc[0].weight.dtype, self.n_fc, {}
        for k in range(nf):
            rows = fc_t[k] if k + 1 < nf else top_t
            first[("down", k)] = count(rows.new_ones(1, rows.shape[0]), rows, dtype)[0]
            if k > 0:
                first[("up", k)] = count(fc[k - 1].new_ones(1, fc[k - 1].shape[0]), fc[k - 1], dtype)[0]
        first[("top",)] = count(top.new_ones(1, top.shape[0]), top, dtype)[0]
        for i in range(len(self.conv) - 1):
            ones = conv[i].new_ones((1,) + self.geometry[i + 1].pool).contiguous(memory_format=self.layout)
            first[("conv", i)] = F.conv2d(ones, conv[i], padding=self.padding).contiguous(memory_format=self.layout)
        return Counted(fc, fc_t, top, top_t, conv,
                       [current_alpha(l.weight, False) for l in self.fc],
                       [current_alpha(l.weight, True).view(1, -1, 1, 1) for l in self.conv],
                       [cpu_kernels.flipped_weight(w) for w in conv], first)

    def stepper(self, s, drive, target=None, beta=0.0, out=None, record=None, ref=None):
        """One synchronous step of every layer from the previous states ``s`` (see the module
        docstring); ``drive`` comes from ``input_drive``; ``out`` may receive the new states
        (scratch buffers the caller owns; ignored while autograd records); ``s`` is only read.
        Binary neurons read the bits of their neighbours (``drive.counted``: integer counts
        times alpha) and filter their input into their states; the nudge pulls towards
        ``target`` from ``ref`` (default the current ``s[0]``).  A ``record`` dict receives
        ``"indices"``: the max-pool indices this step used, one (B, C_i, H_i, W_i) tensor per
        convolution, top first (the gradient unpools with them)."""
        nf, nc, neurons = self.n_fc, len(self.conv), self.neurons
        if drive.counted is not None:
            return self._binary_step(s, drive, target, beta, record, ref)
        if torch.is_grad_enabled():
            out = None
        b = s  # rate neurons send their states
        new = []
        # the classifier step, as Network_fc's in the batch-first (B, n) layout: written twice on
        # purpose, the fc network's feature-major (n, B) layout keeps its large products free of a
        # transpose, and one shared layout would add a transpose per step to one of them (README)
        for k, layer in enumerate(self.fc):
            buf = None if out is None else out[k]
            below = b[k + 1] if k + 1 < nf else self._flat(b[nf])
            w = layer.weight if k + 1 < nf else drive.fc_top
            a = torch.addmm(layer.bias, below, w.t()) if buf is None else \
                torch.addmm(layer.bias, below, w.t(), out=buf)
            if k > 0:
                fb = self.fc[k - 1].weight
                a = a + b[k - 1] @ fb if buf is None else a.addmm_(b[k - 1], fb)
            diff = target - (s[0] if ref is None else ref) if k == 0 and beta != 0 else None
            new.append(neurons.update(s[k], a, diff, beta))
        indices = None
        for i, layer in enumerate(self.conv):
            buf = None if out is None else out[nf + i]
            if i + 1 < nc:
                pooled, next_indices = self._pool(self._conv_term(drive, i, b[nf + i + 1]))
            else:
                pooled, next_indices = drive.pooled, drive.indices
            if i > 0 and self._use_kernel(pooled):  # without the unpooled zeros
                feedback = self._tracked_feedback(drive, i, s[nf + i - 1],
                                                  indices.contiguous(memory_format=self.layout))
            elif i == 0:
                _, c, h, w = s[nf].shape
                feedback = (b[nf - 1] @ drive.fc_top).view(-1, h, w, c).permute(0, 3, 1, 2)
            else:
                feedback = F.conv_transpose2d(self._unpool(b[nf + i - 1], indices, i - 1),
                                              drive.conv_w[i - 1], padding=self.padding)
            a = pooled + feedback if buf is None else torch.add(pooled, feedback, out=buf)
            new.append(neurons.update(s[nf + i], a))
            indices = next_indices
            if record is not None:
                record.setdefault("indices", []).append(indices)
        return new

    def _binary_step(self, s, drive, target, beta, record, ref):
        """The step of binary neurons (``stepper``'s docstring): each layer sends its bits
        (``drive.events``); every product of bits is a count (``drive.counted``) brought up to
        date from the bits that changed or computed densely (the same numbers either way), but
        the feedback between two convolutions, whose terms carry the upper layer's channel
        alphas: it is computed in full at every step from the bits (``_bit_feedback``)."""
        nf, nc, neurons, c, events = self.n_fc, len(self.conv), self.neurons, drive.counted, drive.events
        # the classifier and the top convolution send through sign matrices (``Events.product``),
        # a lower convolution to the one above it (``Events.conv_counts``)
        sent = [events.send(k, neurons.bits(v), 0, k <= nf) for k, v in enumerate(s)]
        new = []
        dtype = s[0].dtype
        for k, layer in enumerate(self.fc):
            rows = c.fc_t[k] if k + 1 < nf else c.fc_top_t
            a = torch.addcmul(layer.bias, events.product(("down", k), sent[k + 1], rows, c.first[("down", k)], dtype),
                              c.fc_alpha[k])
            if k > 0:
                a.addcmul_(events.product(("up", k), sent[k - 1], c.fc[k - 1], c.first[("up", k)], dtype),
                           c.fc_alpha[k - 1])
            diff = target - (s[0] if ref is None else ref) if k == 0 and beta != 0 else None
            new.append(neurons.update(s[k], a, diff, beta))
        indices = None
        for i in range(nc):
            if i + 1 < nc:
                pooled, next_indices = self._pool(self._conv_term(drive, i, None, sent[nf + i + 1]))
            else:
                pooled, next_indices = drive.pooled, drive.indices
            if i == 0:
                flat = torch.mul(events.product(("top",), sent[nf - 1], c.fc_top, c.first[("top",)], dtype),
                                 c.fc_alpha[nf - 1])
                _, ch, h, w = s[nf].shape
                feedback = flat.view(-1, h, w, ch).permute(0, 3, 1, 2)
            else:
                feedback = self._bit_feedback(drive, i, sent[nf + i - 1].float(s[nf + i].dtype), indices)
            new.append(neurons.update(s[nf + i], pooled + feedback))
            indices = next_indices
            if record is not None:
                record.setdefault("indices", []).append(indices)
        return new

    def _bit_feedback(self, drive, i, above, indices):
        """``conv_transpose2d(max_unpool2d(above, indices), conv_w[i-1])``, the feedback layer ``i``
        receives from the bits ``above`` (floats) of the convolution above it: from the compiled
        kernel that skips the zeros where it applies (the unpooled ones and the silent neurons),
        else PyTorch's; the same at every step whatever ``EP_EVENT_DRIVEN`` says."""
        if self._use_kernel(above):
            return cpu_kernels.unpool_conv_transpose(above.contiguous(memory_format=self.layout),
                                                     indices.contiguous(memory_format=self.layout),
                                                     drive.conv_w[i - 1], self.geometry[i - 1].conv[1:],
                                                     self.padding, self.fpool)
        return F.conv_transpose2d(self._unpool(above, indices, i - 1), drive.conv_w[i - 1], padding=self.padding)

    def _conv_term(self, drive, i, below, sent=None):
        """``conv_i(below) + b_i`` of the state below convolution ``i``: for binary neurons a count
        times the channels' alpha, of the bits ``below`` (floats) or of those ``sent`` (kept up
        to date by ``drive.events``); else kept up to date by the compiled CPU kernels where
        they apply, or PyTorch's convolution."""
        bias, c = self.conv[i].bias, drive.counted
        if c is not None:
            def dense(bits):
                return F.conv2d(bits, c.conv[i], padding=self.padding).contiguous(memory_format=self.layout)
            counts = dense(below) if sent is None else drive.events.conv_counts(
                ("conv", i), self.n_fc + i + 1, sent, c.flipped[i], c.first[("conv", i)], self.padding, dense)
            return torch.mul(counts, c.conv_alpha[i]).add_(bias.view(1, -1, 1, 1))
        if self._use_kernel(below):
            return self._tracked_conv(drive, i, below)
        return F.conv2d(below, drive.conv_w[i], bias, padding=self.padding)

    def _tracked_conv(self, drive, i, below):
        """``conv_i(below) + b_i``, kept up to date in the drive (``Tracked``)."""
        t = drive.tracked.get(("conv", i))
        w, b, p = drive.conv_w[i], self.conv[i].bias, self.padding
        if t is None or t.updates >= TRACKED_REFRESH or t.prev.shape != below.shape:
            acc = F.conv2d(below, w, b, padding=p).contiguous(memory_format=self.layout)
            wt = cpu_kernels.flipped_weight(w) if t is None else t.wt
            drive.tracked[("conv", i)] = Tracked(acc, below.clone(memory_format=self.layout), wt=wt)
            return acc
        # (the schedule counts calls, not full recomputations, so that a sample's arithmetic
        # does not depend on the others in its batch)
        t.updates += 1
        skipped = cpu_kernels.conv_delta(below, t.prev, t.wt, t.acc, p, TRACKED_MAX_CHANGED)
        if skipped.all():
            t.acc = F.conv2d(below, w, b, padding=p).contiguous(memory_format=self.layout)
            t.prev.copy_(below)
        elif skipped.any():
            rows = skipped.nonzero().squeeze(1)
            part = below.index_select(0, rows)
            t.acc.index_copy_(0, rows, F.conv2d(part, w, b, padding=p))
            t.prev.index_copy_(0, rows, part)
        return t.acc

    def _tracked_feedback(self, drive, i, above, indices):
        """``conv_transpose2d(max_unpool2d(above, indices), conv_w[i-1])``, the feedback layer
        ``i`` receives, kept up to date in the drive (``Tracked``)."""
        t = drive.tracked.get(("feedback", i))
        w, size, p, f = drive.conv_w[i - 1], self.geometry[i - 1].conv[1:], self.padding, self.fpool
        if t is None or t.updates >= TRACKED_REFRESH or t.prev.shape != above.shape:
            acc = cpu_kernels.unpool_conv_transpose(above, indices, w, size, p, f)
            drive.tracked[("feedback", i)] = Tracked(acc, above.clone(memory_format=self.layout),
                                                     indices.clone(memory_format=self.layout))
            return acc
        t.updates += 1
        cpu_kernels.unpool_conv_transpose_delta(above, indices, t.prev, t.prev_idx, w, t.acc, p, f,
                                                TRACKED_MAX_CHANGED)
        return t.acc

    @staticmethod
    def _use_kernel(t):
        """Whether the compiled kernels apply: float32 on the CPU, autograd off."""
        return (t.device.type == "cpu" and t.dtype == torch.float32 and not torch.is_grad_enabled()
                and cpu_kernels.available())

    def split_drive(self, drive, n):
        events = drive.events
        return [drive._replace(pooled=p, indices=i, tracked={}, events=events and events.fresh()) for p, i in
                zip(drive.pooled.tensor_split(n), drive.indices.tensor_split(n))]

    # -- learning ------------------------------------------------------------------------------
    @staticmethod
    def _last_indices(phase, i):
        """The max-pool indices of convolution ``i`` in the last step of ``phase``."""
        if "indices" not in phase.last_step:
            raise ValueError("computeGradient needs the Phase of a relaxation of at least one step "
                             "(its last step's max-pool indices)")
        return phase.last_step["indices"][i]

    def computeGradient(self, x, plus, minus, beta_span, batch=None):
        """Write the EP estimate of ``-dL/dW`` (negated, as ``.grad``) of every layer::

            classifier:  dW_k = (s_+[k]^T s_+[k+1] - s_-[k]^T s_-[k+1]) / (beta_span B),
                         db_k = sum_batch(s_+[k] - s_-[k]) / (beta_span B)
            convolution: dW_i = (corr(in_+, U(s_+[F+i])) - corr(in_-, U(s_-[F+i]))) / (beta_span B),
                         db_i = sum_{batch, h, w}(s_+[F+i] - s_-[F+i]) / (beta_span B)

        with ``s_+``/``s_-`` the states of the ``Phase`` ``plus``/``minus`` (binary neurons: their
        bits): nudged/free (one-sided, ``beta_span = beta``) or +beta and -beta nudged
        (symmetric, ``beta_span = 2 beta``);
        ``x`` is (b, C, H, W), the samples of this process; B is ``batch`` (the global mini-batch
        of a data-parallel run, whose ranks add up their sums; default b); corr is the correlation of
        the layer's input (the state below, or ``x`` for the bottom layer, whose unpooled
        difference makes it one correlation) with the unpooled state (a convolution's weight
        gradient), U unpools each phase's final states with the max-pool indices its last step
        used (``Phase.last_step["indices"]``, computed from the states before that step, as the
        original code does: they differ from the final states' own indices until the phase
        converges); unpooling moves values without changing their sum, hence the bias sums.
        """
        send = self.neurons.send  # rate neurons: the states; binary neurons: their bits
        s_plus, s_minus = [send(v) for v in plus.states], [send(v) for v in minus.states]
        nf, nc = self.n_fc, len(self.conv)
        c = 1.0 / (beta_span * (x.shape[0] if batch is None else batch))
        for k, layer in enumerate(self.fc):
            if k + 1 < nf:
                dw = s_plus[k].t() @ s_plus[k + 1] - s_minus[k].t() @ s_minus[k + 1]
            else:  # the top convolution state, flattened in (c, h, w) order like the weight
                dw = s_plus[k].t() @ s_plus[nf].flatten(1) - s_minus[k].t() @ s_minus[nf].flatten(1)
            layer.weight.grad = dw.mul_(-c)
            layer.bias.grad = (s_plus[k] - s_minus[k]).sum(0).mul_(-c)
        for i, layer in enumerate(self.conv):
            w, p = layer.weight, self.padding
            if i + 1 < nc:
                dw = None
                for phase, states in ((plus, s_plus), (minus, s_minus)):
                    below = states[nf + i + 1]
                    unpooled = self._unpool(states[nf + i], self._last_indices(phase, i), i)
                    corr = torch.nn.grad.conv2d_weight(below, w.shape, unpooled, padding=p)
                    dw = corr if dw is None else dw.sub_(corr)
            else:  # the input's pool indices do not change: one correlation of the difference
                diff = self._unpool(s_plus[nf + i] - s_minus[nf + i], self._last_indices(plus, i), i)
                dw = torch.nn.grad.conv2d_weight(x, w.shape, diff, padding=p)
            layer.weight.grad = dw.contiguous().mul_(-c)
            layer.bias.grad = (s_plus[nf + i] - s_minus[nf + i]).sum((0, 2, 3)).mul_(-c)
