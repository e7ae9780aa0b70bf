"""The learning-rule check behind ``--check gdu``: EP's updates against BPTT's gradients.

The "gradient descent updates" property of Ernoult et al. 2019 ("Updates of Equilibrium Prop
match gradients of Backprop Through Time in an RNN with static input"): on one batch, for
k = 1..Kmax, the EP update after k nudged steps (from the free fixed point) is compared with
the BPTT gradient of ``L`` truncated to the last k free steps, per layer, for weights and
biases: cosine similarity and relative error ``||ep - bptt|| / ||bptt||``.  Written to
``gdu.csv`` and ``gdu.png`` in a new run folder.  A diagnostic pair of columns repeats the
comparison with the nudge passed through the slope of the output activation
(``slope_target``): the seed's nudge ``beta (y - s[0])`` is added after the activation, so it
also moves saturated output units, whose true gradient is zero; that is the one place where
the seed's EP departs from EP's theory.

It works for any ``EPNetwork`` through documented methods only: ``initHidden``,
``input_drive``, ``relax``/``forward``, ``computeGradient``, ``weight_grads``, ``biases``,
``output``.  Sign convention: both sides are compared as loss gradients, i.e. as what the
estimators leave for ``updateWeights`` (EP's ``-dW``, the estimate of ``dL/dW``).
"""

import math
import os
import sys

import torch

from binary_ep.activations import output_slope
from binary_ep.estimators import ep_gradient, nudged_betas, truncated_gradient
from binary_ep.files import atomic_write
from binary_ep.vocabulary import UserError

GDU_COLUMNS = ["k", "layer", "quantity", "cosine", "rel_error", "cosine_slope_nudge",
               "rel_error_slope_nudge", "ep_norm", "bptt_norm", "beta", "nudging"]


def slope_target(net, s_free, target):
    """The target that makes the seed's nudge ``beta (y - s[0])`` (added after the activation)
    act, to first order in beta, like the nudge of EP's theory, ``rho(a + beta (y - s[0]))``
    (inside the activation): ``y' = s* - rho'(a*) (s* - y)`` at the free fixed point ``s*``.
    For hardsigm: saturated output units are not nudged (``y' = s*`` there), the others as before.
    BPTT's gradient is the same for ``y`` and ``y'`` (the loss gradient reaches the network
    through ``rho'`` anyway), so EP with ``y'`` isolates the effect of where the nudge enters."""
    s0 = s_free[0]
    return s0 - output_slope(s0, net.activation) * (s0 - target)


def _grads_of(net):
    """The gradients the next ``updateWeights`` would use: weights (formed in full), then biases."""
    return [g.detach().clone() for g in net.weight_grads()] + [b.grad.detach().clone() for b in net.biases()]


def _compare(ep, bptt):
    """(cosine, relative error, ||ep||, ||bptt||) of two gradient tensors, in float64.
    Cosine and relative error are NaN when the BPTT gradient is exactly zero (nothing to match:
    e.g. the input layer of a deep net cannot reach the output in k = 1 step)."""
    e, b = ep.detach().double().flatten(), bptt.detach().double().flatten()
    ne, nb = float(e.norm()), float(b.norm())
    if nb == 0.0:
        return math.nan, math.nan, ne, nb
    cos = float(e @ b) / (ne * nb) if ne > 0 else 0.0
    return cos, float((e - b).norm()) / nb, ne, nb


def free_trajectory_tail(net, x, Kmax):
    """Free phase of ``T`` steps; returns (drive, states at steps T-Kmax, ..., T (Kmax + 1 lists,
    the last one is the free fixed point), the ``Phase`` of the last step)."""
    T = net.args.T
    with torch.no_grad():
        drive = net.input_drive(x)
        last = net.relax(net.initHidden(x.shape[0]), drive, T - Kmax)
        tail = [last.states]
        for _ in range(Kmax):
            last = net.relax(tail[-1], drive, 1)
            tail.append(last.states)
    return drive, tail, last


def ep_updates(net, x, drive, free, target, beta, Kmax, nudging="one-sided"):
    """EP's estimate of ``dL/dtheta`` after k = 1..Kmax nudged steps from the free fixed point
    (``free``, a ``Phase``), for the EP variant ``nudging`` (its betas: ``nudged_betas``).
    Returns a list (over k) of lists (weights then biases, output layer first)."""
    betas = nudged_betas(nudging, beta)
    out = []
    with torch.no_grad():
        nudged = [free] * len(betas)
        for _ in range(Kmax):
            nudged = [net.relax(p.states, drive, 1, target, b) for p, b in zip(nudged, betas)]
            ep_gradient(net, x, free, nudged, betas)
            out.append(_grads_of(net))
        net.optW.zero_grad()  # no factor pair of the check stays pending
    return out


def gdu_rows(net, x, target, beta, Kmax, nudging="one-sided"):
    """The gradient-matching table on one batch, as a list of dicts with the ``GDU_COLUMNS``.

    For k = 1..Kmax: EP's ``.grad`` after k nudged steps from the free fixed point against the
    BPTT gradient of ``L`` truncated to the last k free steps (``cosine``, ``rel_error``), and
    the same with the nudge passed through the output activation's slope (``slope_target``;
    ``cosine_slope_nudge``, ``rel_error_slope_nudge``).  Leaves the network's ``.grad`` holding
    an EP estimate; the weights are not changed."""
    T = net.args.T
    if Kmax > T:
        raise UserError(f"the gradient check needs --Kmax ({Kmax}) <= --T ({T})")
    drive, tail, free = free_trajectory_tail(net, x, Kmax)
    ep = ep_updates(net, x, drive, free, target, beta, Kmax, nudging)
    ep_slope = ep_updates(net, x, drive, free, slope_target(net, free.states, target), beta, Kmax,
                          nudging)
    n = len(net.layer_names)
    rows = []
    for k in range(1, Kmax + 1):
        bptt, _ = truncated_gradient(net, x, tail[Kmax - k], target, k)
        for i, (e, e_slope, b) in enumerate(zip(ep[k - 1], ep_slope[k - 1], bptt)):
            cos, rel, ne, nb = _compare(e, b)
            cos_s, rel_s, _, _ = _compare(e_slope, b)
            rows.append({"k": k, "layer": net.layer_names[i % n],
                         "quantity": "weight" if i < n else "bias", "cosine": cos,
                         "rel_error": rel, "cosine_slope_nudge": cos_s,
                         "rel_error_slope_nudge": rel_s, "ep_norm": ne, "bptt_norm": nb,
                         "beta": beta, "nudging": nudging})
    return rows


def last_step_change(tail):
    """Largest change of any state in the last step of ``free_trajectory_tail``'s ``tail`` (0 at
    an exact fixed point)."""
    return max(float((a - b).abs().max()) for a, b in zip(tail[-1], tail[-2]))


def plot_gdu(df, png, title=""):
    """Cosine similarity and relative error vs k, one line per layer (weights solid, biases
    dashed): the figure of Ernoult et al. 2019.  Top row: EP as it trains the network; bottom
    row: EP with the nudge passed through the output activation's slope."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rows = (("", "EP as trained: nudge beta (y - s[0]) added after the activation"),
            ("_slope_nudge", "diagnostic: nudge through the output activation's slope"))
    for (suffix, label), (ax_c, ax_e) in zip(rows, axes):
        cos, rel = df["cosine" + suffix], df["rel_error" + suffix]
        for i, layer in enumerate(dict.fromkeys(df["layer"])):
            for quantity, style in (("weight", "-o"), ("bias", "--s")):
                sel = ((df["layer"] == layer) & (df["quantity"] == quantity)).to_numpy()
                kw = {"color": colors[i % len(colors)], "markersize": 4, "label": f"{layer} {quantity}"}
                ax_c.plot(df["k"][sel], cos[sel], style, **kw)
                ax_e.plot(df["k"][sel], rel[sel], style, **kw)
        low = float(cos.min()) if cos.notna().any() else 0.0
        ax_c.set_ylim(min(0.0, low - 0.05), 1.05)
        ax_c.axhline(1.0, color="gray", lw=0.8)
        ax_c.set_ylabel("cosine(EP update, BPTT gradient)")
        ax_c.set_title(label, fontsize=9)
        ax_e.set_ylabel("||EP - BPTT|| / ||BPTT||")
        ax_e.set_title(label, fontsize=9)
        positive = rel[rel > 0]
        if len(positive) and float(positive.max()) > 20 * float(positive.min()):
            ax_e.set_yscale("log")
        for ax in (ax_c, ax_e):
            ax.grid(alpha=0.3)
        ax_c.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("k = nudged steps of EP = last free steps BPTT goes through")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, dpi=110, format="png")
    atomic_write(png, write)
    plt.close(fig)


def run_gdu_check(args, net, loader, prepare, new_run_folder, trained=""):
    """``--check gdu``: the table of ``gdu_rows`` on the first batch of ``loader`` (``prepare(net,
    x)`` gives the network's input layout), written as ``gdu.csv`` and ``gdu.png`` in the folder
    ``new_run_folder()`` makes once everything is computed; prints the final-step rows and the
    folder.  ``trained`` says in the title and the summary which network this is (empty: the
    freshly initialised one).  Returns 0."""
    import pandas as pd

    from binary_ep.run_folder import discard_unfinished
    device = next(net.parameters()).device
    x, labels = next(iter(loader))
    x = prepare(net, x.to(device))
    target = net.target(labels.to(device))
    with torch.no_grad():
        _, tail, _ = free_trajectory_tail(net, x, 1)
        residual = last_step_change(tail)
        s0 = tail[-1][0]
        flat = output_slope(s0, net.activation) == 0
        saturated = float(flat.to(torch.float64).mean())
        # (B, 10) whatever the state layout: samples with an output unit stuck away from its target
        stuck = net.output([(flat & (s0 != target)).to(torch.float64)]).amax(1)
        saturated_err = float(stuck.mean())
    rows = gdu_rows(net, x, target, args.beta, args.Kmax, args.nudging)
    df = pd.DataFrame(rows, columns=GDU_COLUMNS)
    df["free_residual"] = residual
    df["saturated_outputs"] = saturated
    df["samples_with_saturated_error"] = saturated_err
    archi = "fc " + "-".join(map(str, args.layersList))
    if args.archi == "conv":
        archi = (f"conv {'-'.join(map(str, reversed(args.convList)))} (kernel {args.kernelSize}, "
                 f"pool {args.Fpool}) + {archi}")
    title = (f"{archi} on {args.dataset}: EP "
             f"({args.nudging}, beta={args.beta}) vs BPTT, T={args.T}, one batch of {x.shape[0]}{trained}\n"
             f"last free step moved states by <= {residual:.1e}; output units saturated: "
             f"{100 * saturated:.0f}%; samples with an output saturated away from its target: "
             f"{100 * saturated_err:.0f}%")
    # everything is computed: only now touch the disk; a failure there leaves no half-made folder
    path = new_run_folder()
    try:
        atomic_write(os.path.join(path, "gdu.csv"), lambda tmp: df.to_csv(tmp, index=False))
        plot_gdu(df, os.path.join(path, "gdu.png"), title)
    except BaseException:
        discard_unfinished(path)
        raise
    last = df[df["k"] == args.Kmax]
    print(f"gradient check on one batch{trained}: EP after k nudged steps vs BPTT through the last k free "
          f"steps, k = {args.Kmax}; free-phase residual {residual:.2e}; saturated output units "
          f"{100 * saturated:.1f}%; samples with an output saturated away from its target "
          f"{100 * saturated_err:.1f}%")
    print(last[["layer", "quantity", "cosine", "rel_error", "cosine_slope_nudge",
                "rel_error_slope_nudge"]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"gdu.csv and gdu.png in: {path}")
    sys.stdout.flush()
    return 0


def check_command(args, argv, net, tools, loader):
    """``--check gdu`` as ``main.py`` runs it: on the first batch of ``loader``, the network of
    the run ``--resume`` names (trained; read, never written) or a fresh one; the check's own
    run folder is started by ``run_folder.new_run_folder`` with the architecture's ``tools``
    (beside the checked run, for ``--resume``).  Returns 0."""
    from binary_ep.checkpoint import load_checkpoint
    from binary_ep.run_folder import new_run_folder
    trained = ""
    if args.resume:
        epoch = load_checkpoint(args.resume, net, {})
        trained = f", network of run {os.path.basename(os.path.normpath(args.resume))} after epoch {epoch}"
    return run_gdu_check(args, net, loader, tools.prepare_images,
                         lambda: new_run_folder(args, argv, tools), trained)
