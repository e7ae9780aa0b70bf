"""What the binary neurons of a relaxation sent (README "What a run leaves behind"): per layer
the active outputs, the changed ones (per sample, and the union over the batch) and the share
of the steps computed from the changes (``events``), per relaxation (``Activity``) and summed
over an epoch's training phases, free and nudged apart (``ActivityLog``), for ``results.csv``.

Everything is summed as tensors on the states' device; an epoch's sums are read once.
"""

import torch

PHASES = ("free", "nudged")
STATS = ("active", "changed", "changed_union", "incremental")


def activity_columns(layer_names):
    """The ``results.csv`` columns of binary neurons' activity: ``<stat>_<phase>_<layer>`` for
    each of ``STATS``, ``PHASES`` and the layers (named by the weights that feed them)."""
    return [f"{stat}_{phase}_{name}" for stat in STATS for phase in PHASES for name in layer_names]


class Activity:
    """What the steps of one relaxation sent, per layer: summed over its steps and samples, the
    active outputs (``active``) and the changed ones (``changed``), tensors on the states'
    device; each step's (n,) mask of the outputs that changed in some sample (``union``);
    host counts of the sample-steps (``samples``), of those computed from the changes
    (``event``), of the steps (``steps``) and each layer's outputs per sample (``units``)."""

    def __init__(self):
        self.active, self.changed, self.union = {}, {}, {}
        self.samples, self.event, self.steps, self.units = {}, {}, {}, {}

    def add(self, k, sent):
        """Add what layer ``k`` sent at one step (an ``events.Sent``)."""
        if k not in self.active:
            self.active[k] = self.changed[k] = 0
            self.union[k], self.samples[k], self.event[k], self.steps[k] = [], 0, 0, 0
            self.units[k] = sent.flat.shape[1 - sent.batch_dim]
        self.active[k] = self.active[k] + sent.n_active
        self.changed[k] = self.changed[k] + sent.n_changed
        self.union[k].append(sent.union)
        self.samples[k] += sent.batch
        self.steps[k] += 1

    @staticmethod
    def join(parts):
        """One ``Activity`` of consecutive shares of a batch relaxed side by side (the same
        steps): sums, and the union of each step's masks over the shares."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        out = Activity()
        for k in parts[0].active:
            out.active[k] = sum(p.active[k] for p in parts)
            out.changed[k] = sum(p.changed[k] for p in parts)
            out.union[k] = [torch.stack(masks).any(0) for masks in zip(*(p.union[k] for p in parts))]
            for name in ("samples", "event"):
                getattr(out, name)[k] = sum(getattr(p, name)[k] for p in parts)
            out.steps[k], out.units[k] = parts[0].steps[k], parts[0].units[k]
        return out


class ActivityLog:
    """The ``Activity`` of an epoch's training phases, added up batch after batch (tensors: no
    host read), per phase (``PHASES``) and layer; ``columns`` reads them once."""

    def __init__(self):
        self.sums, self.counts = {}, {}  # (phase, layer) -> [active, changed, union]; [samples, event, steps, units]

    def add(self, free, nudged):
        """Add the ``Activity`` of a batch's free phase and those of its nudged phases."""
        for phase, parts in (("free", [free]), ("nudged", nudged)):
            for part in parts:
                for k in part.active:
                    union = torch.stack(part.union[k]).sum() if part.union[k] else 0
                    new = [part.active[k], part.changed[k], union]
                    old = self.sums.get((phase, k))
                    self.sums[(phase, k)] = new if old is None else [a + b for a, b in zip(old, new)]
                    c = self.counts.setdefault((phase, k), [0, 0, 0, part.units[k]])
                    c[0] += part.samples[k]
                    c[1] += part.event[k]
                    c[2] += part.steps[k]

    def columns(self, layer_names):
        """``{column: value}`` of ``activity_columns(layer_names)``, in percent: the mean share
        of each layer's outputs that were active, that changed (per sample; as the union over
        the batch), and the share of its sample-steps computed from the changes."""
        keys = sorted(self.sums)
        sums = [v for key in keys for v in self.sums[key]]
        device = next((v.device for v in sums if torch.is_tensor(v)), None)
        flat = [torch.as_tensor(v, device=device).reshape(()) for v in sums]
        values = torch.stack(flat).tolist() if flat else []  # the one read
        out = {c: 0.0 for c in activity_columns(layer_names)}
        for i, (phase, k) in enumerate(keys):
            active, changed, union = values[3 * i:3 * i + 3]
            samples, event, steps, units = self.counts[(phase, k)]
            name = layer_names[k]
            out[f"active_{phase}_{name}"] = 100.0 * active / max(units * samples, 1)
            out[f"changed_{phase}_{name}"] = 100.0 * changed / max(units * samples, 1)
            out[f"changed_union_{phase}_{name}"] = 100.0 * union / max(units * steps, 1)
            out[f"incremental_{phase}_{name}"] = 100.0 * event / max(samples, 1)
        return out
