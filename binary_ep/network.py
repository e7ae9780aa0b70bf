"""``EPNetwork``: what every binary-weight EP network shares, on top of its own ``stepper``.

The relaxation (``forward``/``relax``: ``T`` synchronous steps), the phases of one batch (free,
nudged), ``updateWeights`` and the bookkeeping the loops need.  A concrete network
(``Network_fc``, ``Network_conv``) defines the architecture: ``initHidden``, ``input_drive``,
``split_drive``, ``stepper``, ``computeGradient``, ``target``, ``output``.
"""

from collections import namedtuple

import torch
import torch.nn as nn

from binary_ep.binary_optimizer import BinaryFlip, binarize_, current_alpha
from binary_ep.activity import Activity
from binary_ep.signs import SignCache
from binary_ep import streams as cpu_streams

Phase = namedtuple("Phase", "states last_step activity", defaults=(None,))
Phase.__doc__ = """The result of one relaxation phase: ``states``, the final states (a list, the
network's layout, output layer first), and ``last_step``, what the stepper used in the phase's
last step that the gradient needs besides the states: a dict of lists of batch-first tensors
(``Network_conv``: ``{"indices": [max-pool indices of each convolution]}``; fc: empty);
``activity``: binary neurons, what the steps sent (``events.Activity``), else None."""


class EPNetwork(nn.Module):
    """Binary-weight EP network: the parts that do not depend on the architecture.

    A subclass defines ``initHidden(batch)``, ``input_drive(x)``, ``split_drive(drive, n)``,
    ``stepper(s, drive, target, beta, out, record)``, ``computeGradient(x, plus, minus,
    beta_span)``, ``target(labels)``, ``output(s)``, ``batch_dim`` if its states are not
    batch-first, and calls ``_setup_optimizers`` at the end of ``__init__``.

    The gradient contract: an estimator (``binary_ep.estimators``) leaves the estimate of
    ``dL/dtheta`` of every binary weight and bias in ``.grad`` (or, for a weight whose gradient is
    a product of two thin factors, in ``optW.set_outer_grad``), then ``updateWeights`` applies it.
    """

    def _setup_optimizers(self, args, weights, biases, names, per_channel, alpha_scale):
        """Binarise ``weights`` and build the flip optimizer and the bias SGD.

        ``weights``/``biases``/``names``/``per_channel`` are ordered output layer first, like every
        per-layer list of the command line; ``alpha_scale`` is the factor ``c`` of the learnt
        alpha step (DESIGN.md section 4).
        """
        self.args = args
        self.activation = args.activationFun
        self.layer_names = list(names)
        self.n_weights = [w.numel() for w in weights]
        self.learn_alpha = bool(args.learnAlpha)
        groups = []
        for k, (w, name, pc) in enumerate(zip(weights, names, per_channel)):
            binarize_(w, pc)
            groups.append({"params": [w], "gamma": args.gamma[k], "threshold": args.gradThreshold[k],
                           "lr_alpha": args.lrAlpha[k] if self.learn_alpha else 0.0,
                           "base_lr_alpha": args.lrAlpha[k] if self.learn_alpha else 0.0,
                           "alpha_scale": alpha_scale, "per_channel": pc, "name": name})
        self.optW = BinaryFlip(groups)
        self.optB = torch.optim.SGD([{"params": [b], "lr": args.lrBias[k]}
                                     for k, b in enumerate(biases)], lr=args.lrBias[0])
        self.signs = SignCache()  # binary neurons: the sign matrices their counts multiply
        self.caches = [self.signs]  # what is made from the weights, forgotten when they move

    batch_dim = 0  # the batch dimension of the states and targets (fc: 1, its column layout)
    nudge_from_start = False  # the nudge's reference: the current output (else the phase's start)
    activity_log = None  # an ``ActivityLog`` while training records what the phases sent

    def split_drive(self, drive, n):
        """``input_drive``'s constants for ``n`` consecutive shares of the batch (subclasses)."""
        raise NotImplementedError

    # -- seed method names ---------------------------------------------------------------------
    def forward(self, s, drive, T, target=None, beta=0.0):
        """Run ``T`` synchronous steps of ``stepper`` from the states ``s`` (read, never changed)
        and return the final states, a new list (``relax`` also returns what the last step used)."""
        return self.relax(s, drive, T, target, beta).states

    def relax(self, s, drive, T, target=None, beta=0.0):
        """``T`` synchronous steps of ``stepper`` from the states ``s`` (read, never changed), in
        CPU streams (see ``phases``); returns a ``Phase``."""
        streams = self._streams(s[0].shape[self.batch_dim], s[0].device)
        if streams == 1:
            return self._relax(s, drive, T, target, beta)
        shares = list(zip(*(self._cut(v, streams) for v in s)))
        drives = self.split_drive(drive, streams)
        targets = self._cut(target, streams)
        results = cpu_streams.in_streams(streams, lambda n: self._relax(list(shares[n]), drives[n], T, targets[n], beta))
        return self._join(results)

    def phases(self, x, target=None, betas=()):
        """The relaxation of a batch ``x`` (the network's input layout): the free phase (``T``
        steps from ``initHidden``) and, with a ``target``, one nudged phase (``Kmax`` steps from
        the free fixed point) per beta of ``betas`` (the estimator's variant decides them:
        ``estimators.nudged_betas``).  Returns a tuple of ``Phase``: the free one, then one per
        beta.

        On a CPU with several threads and autograd off, the batch is cut into one share per
        thread and each share runs all its phases in a single-threaded stream, side by side: the
        samples of a batch never interact, so this computes the same states (to float32
        rounding), and the relaxation's small products keep a core far busier this way than
        split across cores."""
        streams = self._streams(x.shape[0], x.device)
        if streams == 1:
            result = self._phases(x, target, betas)
        else:
            xs = x.tensor_split(streams)
            targets = self._cut(target, streams)
            results = cpu_streams.in_streams(streams, lambda n: self._phases(xs[n], targets[n], betas))
            result = tuple(self._join(phase) for phase in zip(*results))
        if self.activity_log is not None and result[0].activity is not None:
            self.activity_log.add(result[0].activity, [p.activity for p in result[1:]])
        return result

    def _phases(self, x, target, betas):
        drive = self.input_drive(x)
        free = self._relax(self.initHidden(x.shape[0]), drive, self.args.T)
        if target is None:
            return (free,)
        return (free,) + tuple(self._relax(free.states, drive, self.args.Kmax, target, beta) for beta in betas)

    def _join(self, phases):
        """One ``Phase`` from the phases of consecutive shares of a batch."""
        states = [torch.cat(parts, self.batch_dim) for parts in zip(*(p.states for p in phases))]
        last = {key: [torch.cat(parts, 0) for parts in zip(*(p.last_step[key] for p in phases))]
                for key in phases[0].last_step}
        return Phase(states, last, Activity.join([p.activity for p in phases]))

    def _cut(self, v, streams):
        if v is None:
            return [None] * streams
        parts = v.tensor_split(streams, self.batch_dim)  # batch-first shares stay dense (channels_last too)
        return list(parts) if self.batch_dim == 0 else [part.contiguous() for part in parts]

    @staticmethod
    def _streams(batch, device):
        if torch.is_grad_enabled() or device.type != "cpu":
            return 1
        return max(1, min(torch.get_num_threads(), batch // cpu_streams.MIN_STREAM_BATCH))

    def _relax(self, s, drive, T, target=None, beta=0.0):
        """``T`` steps of ``stepper`` in this thread, from copies of ``s`` (with autograd off the
        copies and one spare set are the scratch space the steps alternate between).  A nudged
        phase pulls the output from its current state, or, where ``nudge_from_start`` (the conv
        network of binary neurons), from the state it started from: the free phase's output."""
        s = [v.clone() for v in s]
        spare = None if torch.is_grad_enabled() else [torch.empty_like(v) for v in s]
        record = {}
        ref = s[0].clone() if beta != 0 and self.nudge_from_start else None
        events = getattr(drive, "events", None)  # binary neurons: what each step sends
        activity = None if events is None else events.begin()
        for t in range(T):
            new = self.stepper(s, drive, target, beta, out=spare, record=record if t == T - 1 else None,
                               ref=ref)
            if spare is not None:
                spare = s
            s = new
        return Phase(s, record, activity)

    def _apply(self, fn, *args, **kwargs):
        """``Module.to`` and its kin give the weights new storage: the values made from them
        (``caches``) are made again."""
        for cache in getattr(self, "caches", []):
            cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def updateWeights(self):
        """Flip/rescale the binary weights and take an SGD step on the biases from ``.grad``.
        Returns the number of flips per layer (tensors)."""
        weights = self.binary_weights()
        before = [w._version for w in weights]
        flips = self.optW.step()
        self.optB.step()
        self.signs.stepped(weights, before, flips)  # the sign matrices in use follow the flips
        return flips

    # -- helpers shared by the estimators and the loops ----------------------------------------
    def binary_weights(self):
        """The binary weights, output layer first."""
        return [g["params"][0] for g in self.optW.param_groups]

    def biases(self):
        """The biases, output layer first."""
        return [g["params"][0] for g in self.optB.param_groups]

    def weight_grads(self):
        """The weight gradients the next ``updateWeights`` will use (formed in full)."""
        return [self.optW.pending_grad(w) for w in self.binary_weights()]

    def alphas(self):
        """alpha of each layer (mean over channels for per-channel factors), as floats."""
        return [float(current_alpha(g["params"][0], g["per_channel"]).mean())
                for g in self.optW.param_groups]

    def set_epoch(self, epoch):
        """Apply the ``--decayLrAlpha D --epochDecayLrAlpha E`` schedule: lrAlpha / D from epoch E."""
        decay = epoch >= self.args.epochDecayLrAlpha and self.args.decayLrAlpha != 1
        for g in self.optW.param_groups:
            g["lr_alpha"] = g["base_lr_alpha"] / (self.args.decayLrAlpha if decay else 1.0)

    def free_phase(self, x):
        """Free relaxation of ``x`` (the network's input layout) from ``initHidden``; returns
        (final states, drive)."""
        drive = self.input_drive(x)
        return self.forward(self.initHidden(x.shape[0]), drive, self.args.T), drive

    def output(self, s):
        """Output states as (batch, 10)."""
        return s[0]

    def health(self, s):
        """Flags (a bool tensor on the network's device, read by the caller once per batch) of
        every check ``problem`` names: the states of each layer finite, then per layer its biases
        finite, its alpha finite, its alpha (and a learnt alpha of the last step) positive."""
        flags = [torch.isfinite(v).all() for v in s]
        for i, (g, b) in enumerate(zip(self.optW.param_groups, self.biases())):
            a = current_alpha(g["params"][0], g["per_channel"])
            positive = (a > 0).all()
            learnt = self.optW.learnt_alpha.get(i)
            if learnt is not None:
                positive = positive & (learnt > 0).all()
            flags += [torch.isfinite(b).all(), torch.isfinite(a).all(), positive]
        return torch.stack(flags)

    def problem(self, flags, n_states):
        """The first failed check of ``health``'s ``flags`` (a list of bools) in words, or None."""
        for k in range(n_states):
            if not flags[k]:
                return f"a NaN or infinity appeared in the states of layer {k} (0 = output)"
        for i, g in enumerate(self.optW.param_groups):
            bias_ok, alpha_ok, positive = flags[n_states + 3 * i:n_states + 3 * i + 3]
            if not bias_ok:
                return f"a NaN or infinity appeared in the biases of layer {g['name']}"
            if not alpha_ok:
                return f"a NaN or infinity appeared in alpha of layer {g['name']}"
            if not positive:
                return f"alpha of layer {g['name']} reached zero or below"
        return None
