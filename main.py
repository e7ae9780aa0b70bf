"""Binary-weight Equilibrium Propagation: command line entry point (the seed's ``main.py``).

Parses every seed argument, validates it before anything touches the disk, loads the data set,
builds the fc or conv network, trains and tests it epoch by epoch and writes the run folder
(``Hyperparameters.txt``, ``results.csv``, ``checkpoint.pt``, plots).  ``python main.py --help``.
"""

import argparse
import importlib
import os
import random
import shlex
import sys

from binary_ep import signals  # the signal module only: imports nothing heavy

# OpenMP threads that spin after each parallel region steal the core a relaxation stream needs
# (measured: fc-1h 1130 -> 1520 samples/s on 2 cores); must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEFAULT_LISTS_FC = {"layersList": [784, 4096, 10], "gamma": [1e-5, 1e-4],
                    "gradThreshold": [5e-7, 5e-7], "lrBias": [0.025, 0.05]}
DEFAULT_LISTS_CONV = {"layersList": [10], "convList": [64, 32, 1], "gamma": [5e-8, 5e-8, 5e-8],
                      "gradThreshold": [1e-8, 1e-8, 1e-8], "lrBias": [0.025, 0.05, 0.1]}
# flags whose value may change when a run is resumed (--check gdu: check the saved network)
RESUME_FREE = {"resume", "epochs", "device", "dataDir", "check", "workers", "export", "tf32"}
ORDER = "output layer first"


def build_parser():
    from binary_ep.limits import MAX_EXPAND
    from binary_ep.vocabulary import ACTIVATIONS, BINARY_SETTINGS, DATASETS, Parser
    p = Parser(
        prog="main.py", description="Binary-weight Equilibrium Propagation (fc or conv networks). "
        "Per-layer lists (--gamma, --gradThreshold, --lrBias, --lrAlpha, ...) are ordered from the "
        "OUTPUT layer down; --layersList is written input first, --convList top first.")
    a = p.add_argument_group("hardware")
    a.add_argument("--device", type=int, default=0, help="GPU index (0..127), -1 for the CPU "
                   "(default 0; falls back to the CPU with a warning when CUDA is unavailable)")
    a.add_argument("--tf32", type=int, choices=(0, 1), default=0, help="1: a GPU computes float32 "
                   "convolutions and matmuls in TF32, faster on Ampere and later but with a 1e-3 relative "
                   "error where flips act on gradients near 1e-8 (no effect on the CPU; may change on "
                   "--resume) (default 0: float32)")
    a = p.add_argument_group("architecture")
    a.add_argument("--archi", choices=("fc", "conv"), default="fc", help="fc or conv (default fc)")
    a.add_argument("--layersList", type=int, nargs="+", help="fully connected layer sizes, input "
                   "first (default 784 4096 10); for conv: the classifier layers (default 10)")
    a.add_argument("--convList", type=int, nargs="+", help="conv channels, top first, input "
                   "channels last (default 64 32 1)")
    a.add_argument("--padding", type=int, default=0, help="padding of the convolutions (default 0)")
    a.add_argument("--kernelSize", type=int, default=5, help="convolution kernel size (default 5)")
    a.add_argument("--Fpool", type=int, default=2, help="max-pooling size and stride (default 2)")
    a = p.add_argument_group("EqProp")
    a.add_argument("--activationFun", choices=ACTIVATIONS, default="hardsigm",
                   help="activation (default hardsigm = clamp(x, 0, 1))")
    a.add_argument("--T", type=int, default=50, help="free phase steps, at most 1000000 (default 50)")
    a.add_argument("--Kmax", type=int, default=10, help="nudged phase steps, at most 1000000 (default 10)")
    a.add_argument("--beta", type=float, default=0.3, help="nudging strength, either sign; beta and "
                   "1/(beta B) for every batch size B must be normal float32 numbers (default 0.3)")
    a.add_argument("--random_beta", type=int, choices=(0, 1), default=0,
                   help="1: draw the sign of beta per mini-batch (default 0)")
    a.add_argument("--nudging", choices=("one-sided", "symmetric"), default="one-sided",
                   help="symmetric: +beta and -beta nudged phases (default one-sided)")
    a.add_argument("--optim", choices=("ep", "bptt"), default="ep",
                   help="gradient estimator fed to the binary optimizer (default ep)")
    a.add_argument("--check", choices=("none", "gdu"), default="none",
                   help="gdu: compare EP updates with BPTT gradients on one batch, then exit")
    a.add_argument("--export", action="store_true", help="with --resume S-<n>: write the trained "
                   "network as S-<n>/binary_model.npz (sign bits, alpha, biases; see README), then exit")
    a = p.add_argument_group("binary optimization (lists: " + ORDER + ")")
    a.add_argument("--gamma", type=float, nargs="+", help="low-pass filter constant per layer")
    a.add_argument("--gamma_classi", "--classi_gamma", dest="gamma_classi", type=float, nargs="+",
                   help="conv: gamma of the classifier layers")
    a.add_argument("--gamma_conv", "--conv_gamma", dest="gamma_conv", type=float, nargs="+",
                   help="conv: gamma of the conv layers (top first)")
    a.add_argument("--gradThreshold", type=float, nargs="+", help="flip threshold per layer")
    a.add_argument("--classi_threshold", type=float, nargs="+", help="conv: thresholds of the classifier")
    a.add_argument("--conv_threshold", type=float, nargs="+", help="conv: thresholds of the conv layers")
    a = p.add_argument_group("training")
    a.add_argument("--dataset", choices=DATASETS, default="mnist", help="data set (default mnist)")
    a.add_argument("--lrBias", type=float, nargs="+", help="SGD learning rate of the biases, per layer")
    a.add_argument("--batchSize", type=int, default=64, help="training mini-batch size (default 64)")
    a.add_argument("--test_batchSize", type=int, default=512, help="test mini-batch size (default 512)")
    a.add_argument("--epochs", type=int, default=50, help="number of epochs (default 50)")
    a.add_argument("--dataDir", default="./data", help="torchvision data root (default ./data)")
    a.add_argument("--outDir", default=".", help="where DATA-0-... folders go (default .)")
    a.add_argument("--seed", type=int, help="random seed, 0..4294967295 (torch keeps 32 bits); the "
                   "sign of beta is drawn from (seed + 1) mod 2^32 (default: drawn and recorded)")
    a.add_argument("--trainSubset", type=int, help="use only the first N training samples (the "
                   "number used is recorded)")
    a.add_argument("--testSubset", type=int, help="use only the first N test samples (idem)")
    a.add_argument("--resume", metavar="PATH", help="continue the run in this S-X folder")
    a.add_argument("--workers", type=int, default=2, help="data-loading worker processes for "
                   "CIFAR-10's augmentation (default 2; 0: in the main process; may change on resume)")
    a = p.add_argument_group("scaling factors")
    a.add_argument("--learnAlpha", type=int, choices=(0, 1), default=0, help="1: learn alpha (default 0)")
    a.add_argument("--lrAlpha", type=float, nargs="*", help="learning rate of each alpha (" + ORDER + ")")
    a.add_argument("--decayLrAlpha", type=float, default=1.0, help="divide lrAlpha by this ...")
    a.add_argument("--epochDecayLrAlpha", type=int, default=1, help="... from this epoch on (1-based)")
    a = p.add_argument_group("neurons (the paper's Section 4: binary neurons)")
    a.add_argument("--binary_settings", choices=BINARY_SETTINGS, default="bin_W", help="bin_W: binary "
                   "weights, full-precision neurons; bin_W_N: binary weights and binary neurons "
                   "(with --activationFun heaviside) (default bin_W)")
    a.add_argument("--rho_threshold", type=float, default=0.5, help="bin_W_N: a neuron sends 1 where "
                   "its state is >= this, in [0, 1] (default 0.5)")
    a.add_argument("--gamma_neur", type=float, default=0.5, help="bin_W_N: the filter constant of "
                   "the neurons' states, in (0, 1] (default 0.5)")
    a.add_argument("--expand_output", type=int, default=1, help=f"output neurons per class, "
                   f"1..{MAX_EXPAND}: the output layer has 10 times this many (default 1)")
    return p


def explicit_flags(argv):
    """The flags given in ``argv`` and their values as typed: ``{dest: value}``, abbreviations
    and ``--flag=value`` resolved (a repeated flag: its last value)."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return vars(quiet.parse_args(argv))


def _n_layers(args):
    if args.archi == "fc":
        return len(args.layersList) - 1, 0
    return len(args.layersList), len(args.convList) - 1


def normalise(parser, args, given):
    """Fill architecture-dependent defaults, merge the conv split spellings, check list lengths,
    cap ``--trainSubset``/``--testSubset`` at the data set's size (so a resumed run's re-typed
    value compares equal with the number it used)."""
    from binary_ep.limits import MAX_COUNT
    from binary_ep.vocabulary import N_SAMPLES
    defaults = DEFAULT_LISTS_FC if args.archi == "fc" else DEFAULT_LISTS_CONV
    for name in ("layersList", "convList"):
        if getattr(args, name) is None:
            setattr(args, name, defaults.get(name, DEFAULT_LISTS_CONV["convList"]))
    n_fc, n_conv = _n_layers(args)
    n = n_fc + n_conv
    for whole, classi, conv in (("gamma", "gamma_classi", "gamma_conv"),
                                ("gradThreshold", "classi_threshold", "conv_threshold")):
        split = [f for f in (classi, conv) if f in given]
        if split and args.archi != "conv":
            parser.error(f"--{split[0]} is for --archi conv; use --{whole} with the fc architecture")
        if split:
            if whole in given:
                parser.error(f"give either --{whole} or --{classi}/--{conv}, not both")
            if len(split) != 2:
                parser.error(f"--{classi} and --{conv} go together; give both (or --{whole} alone)")
            for flag, count, what in ((classi, n_fc, "classifier"), (conv, n_conv, "convolution")):
                if len(getattr(args, flag)) != count:
                    parser.error(f"--{flag} needs {count} value(s), one per {what} layer "
                                 f"({ORDER}), got {len(getattr(args, flag))}")
            setattr(args, whole, getattr(args, classi) + getattr(args, conv))
    if n < 1:
        parser.error("--layersList needs at least 2 sizes (input and output) for --archi fc")
    for name in ("gamma", "gradThreshold", "lrBias"):
        if getattr(args, name) is None:
            default = defaults[name]
            if len(default) != n:
                parser.error(f"--{name} is required for this architecture: give {n} values ({ORDER})")
            setattr(args, name, list(default))
    layout = (f"{n} weight layers ({ORDER})" if args.archi == "fc" else
              f"{n} layers: {n_fc} classifier ({ORDER}) then {n_conv} convolution (top first)")
    for name in ("gamma", "gradThreshold", "lrBias"):
        if len(getattr(args, name)) != n:
            parser.error(f"--{name} needs {n} values for {layout}, got {len(getattr(args, name))}")
    if args.learnAlpha and not args.lrAlpha:
        parser.error(f"--learnAlpha 1 needs --lrAlpha with {n} values for {layout}")
    if args.learnAlpha and len(args.lrAlpha) < n:
        # The seed's fc-2h learnt-alpha line gives 2 values for 3 layers and must run as
        # printed: the last value serves the remaining (input-side) layers, said aloud.
        print(f"warning: --lrAlpha has {len(args.lrAlpha)} value(s) for {layout}; the last "
              f"value is used for the remaining input-side layer(s)", file=sys.stderr)
        args.lrAlpha = list(args.lrAlpha) + [args.lrAlpha[-1]] * (n - len(args.lrAlpha))
    args.lrAlpha = list(args.lrAlpha) if args.lrAlpha else [0.0] * n
    if len(args.lrAlpha) != n:
        parser.error(f"--lrAlpha needs {n} values for {layout}, got {len(args.lrAlpha)}")
    for k, name in enumerate(("trainSubset", "testSubset")):  # more than the data set has: all
        if N_SAMPLES[args.dataset][k] < (getattr(args, name) or 0) <= MAX_COUNT:  # (more: validate)
            setattr(args, name, N_SAMPLES[args.dataset][k])


def check_neurons(parser, args, given):
    """The neuron flags that go together (DESIGN.md section 10), ``given`` being the flags typed;
    a ``bin_W`` run then drops ``rho_threshold`` and ``gamma_neur`` (binary neurons' alone)."""
    binary, act = args.binary_settings == "bin_W_N", args.activationFun
    default = {f: "" if f in given else " (the default)" for f in ("binary_settings", "activationFun")}
    if binary and act != "heaviside":
        parser.error(f"--binary_settings bin_W_N (binary neurons) needs --activationFun heaviside, "
                     f"got {act}{default['activationFun']}; add --activationFun heaviside")
    if act == "heaviside" and not binary:
        parser.error(f"--activationFun heaviside is the binary neurons' activation: it needs "
                     f"--binary_settings bin_W_N, got {args.binary_settings}{default['binary_settings']}; "
                     f"add --binary_settings bin_W_N, or choose hardsigm, sigm or tanh")
    for flag, value, fix in (("optim", "bptt", "use --optim ep"), ("check", "gdu", "leave --check out")):
        if binary and getattr(args, flag) == value:
            parser.error(f"--{flag} {value} differentiates through the neurons, and binary neurons "
                         f"(--binary_settings bin_W_N) send H(s - rho_threshold), through which no "
                         f"gradient flows; {fix}")
    for name in ("gamma_neur", "rho_threshold"):
        if not binary and name in given:
            parser.error(f"--{name} is a setting of binary neurons and would be ignored with "
                         f"--binary_settings {args.binary_settings}{default['binary_settings']}; "
                         f"leave it out, or add --binary_settings bin_W_N --activationFun heaviside")
        if not binary and hasattr(args, name):
            delattr(args, name)


def validate(parser, args):
    """Every value check; runs before anything is created on disk (the range of every numeric
    flag: ``binary_ep.limits``)."""
    from binary_ep.vocabulary import INPUT_SHAPE, N_CLASSES, UserError, conv_geometry
    checked(parser, args)
    last, units = args.layersList[-1], N_CLASSES * args.expand_output
    if last != units:
        other = f", or give --expand_output {last // N_CLASSES}" if last % N_CLASSES == 0 else ""
        parser.error(f"--layersList must end with {units} output units ({N_CLASSES} classes x "
                     f"--expand_output {args.expand_output}), got {last}: end it with {units}{other}")
    shape = INPUT_SHAPE[args.dataset]
    if args.archi == "fc" and args.layersList[0] != shape[0] * shape[1] * shape[2]:
        parser.error(f"--layersList must start with {shape[0] * shape[1] * shape[2]} inputs for "
                     f"{args.dataset} ({'x'.join(map(str, shape))} images), got {args.layersList[0]}")
    if args.archi == "conv":
        if args.convList[-1] != shape[0]:
            parser.error(f"--convList must end with {shape[0]} input channel(s) for {args.dataset}, "
                         f"got {args.convList[-1]}")
        if len(args.convList) < 2:
            parser.error("--convList needs at least 2 values (output channels ... input channels)")
        try:
            conv_geometry(args, shape)
        except UserError as e:
            parser.error(str(e))
    if (args.optim == "bptt" or args.check == "gdu") and args.Kmax > args.T:
        what = "--optim bptt" if args.optim == "bptt" else "--check gdu"
        parser.error(f"{what} differentiates through the last Kmax free steps: --Kmax "
                     f"({args.Kmax}) must not exceed --T ({args.T})")
    check_out_dir(parser, args.outDir)


def checked(parser, args, names=None):
    """``binary_ep.limits.check_arguments(args, names)``, its ``UserError`` as the parser's error."""
    from binary_ep.limits import check_arguments
    from binary_ep.vocabulary import UserError
    try:
        check_arguments(args, names)
    except UserError as e:
        parser.error(str(e))


def check_out_dir(parser, out_dir):
    probe = os.path.abspath(out_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        parser.error(f"--outDir {out_dir} is not a folder ({probe} is a file); choose a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        parser.error(f"--outDir {out_dir} is not writable ({probe}); choose a folder you can write to")


def parse(argv):
    """argv -> (parser, args, normalised argv); exits with a one-line error on bad input."""
    from binary_ep.vocabulary import fix_seed_spelling
    parser = build_parser()
    argv = fix_seed_spelling(list(argv), parser)
    args = parser.parse_args(argv)
    given = explicit_flags(argv)
    if args.export and not args.resume:
        parser.error("--export writes the network of a finished epoch: give the run with --resume S-<n>")
    if args.resume:
        from binary_ep.resume import resumed_args
        args = resumed_args(parser, args, given, RESUME_FREE, normalise)
        check_neurons(parser, args, given)  # (--check may change)
        checked(parser, args, ("epochs", "workers", "device"))  # the numbers that may change
        return parser, args, argv
    normalise(parser, args, given)
    check_neurons(parser, args, given)
    validate(parser, args)
    args.given = given
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2 ** 31)
    return parser, args, argv


def architecture(archi):
    """The seed's modules of an architecture: ``(Network_<archi> module, Tools_<archi> module)``."""
    return importlib.import_module(f"Network_{archi}"), importlib.import_module(f"Tools_{archi}")


def build_network(args, device="cpu"):
    """``Network_<archi>.Network_<archi>(args)``, the network ``--archi`` names, on ``device``,
    once ``binary_ep.memory`` found that it fits there (else one ``UserError`` sentence)."""
    import torch

    from binary_ep import distributed, memory
    device = torch.device(device)
    memory.check_memory(args, device, distributed.current().world)
    network, _ = architecture(args.archi)
    return getattr(network, f"Network_{args.archi}")(args).to(device)


def plot_run(path):
    """Draw the run's PNG figures with the plotting script kept beside the code (a signal
    while drawing only skips the figures)."""
    try:
        import plotFunctions
        df = plotFunctions.read_run(path)
        if df is not None:
            plotFunctions.plot_one(path, df)
    except Exception as e:  # noqa: BLE001 - a plotting problem must never lose a finished run
        print(f"warning: could not draw the plots of {path} ({e})", file=sys.stderr)
    except signals.Interrupted:
        signals.delivered()
        print(f"warning: plots of {path} skipped (interrupted); draw them later with the "
              f"plotFunctions.py of its date folder", file=sys.stderr)


def run(args, argv, parser, state):
    """Train (or check, or export) the run ``args`` describes, alone or as one rank of a
    data-parallel run (``torchrun``: rank 0 owns the run folder), keeping ``state`` (``Progress``)
    up to date; returns the exit code."""
    import numpy as np
    import torch

    from binary_ep import checkpoint, distributed
    from binary_ep.datasets import load_data
    from binary_ep.estimators import make_estimator
    from binary_ep.limits import derived_seeds
    from binary_ep.run_folder import open_run
    _, tools = architecture(args.archi)
    signals.check()  # a signal whose exception an import dropped
    replicas = distributed.start(parser, args, state)  # None: a rank with nothing to do (--check, --export)
    if replicas is None:
        return 0
    if args.export:
        from binary_ep.export import export_run
        return export_run(args.resume, build_network(args, replicas.device))
    device, root = replicas.device, replicas.rank == 0
    seeds = derived_seeds(args.seed)  # all distinct from the beta one, all in 0..2^32 - 1
    torch.manual_seed(seeds["torch"])
    np.random.seed(seeds["numpy"])
    generators = {"data": torch.Generator().manual_seed(seeds["data"]),
                  "beta": torch.Generator().manual_seed(seeds["beta"])}
    train_loader, test_loader = replicas.root_first(lambda: load_data(
        args, generators["data"], pin_memory=device.type == "cuda", share=replicas.share))
    net = build_network(args, device)
    if args.check == "gdu":
        from binary_ep.gdu_check import check_command
        return check_command(args, argv, net, tools, train_loader)
    estimator = make_estimator(args, generators["beta"])
    state.root = root
    state.path, state.done, df = replicas.on_root(
        lambda: open_run(args, argv, net, tools, generators, made=lambda p: setattr(state, "path", p)))
    state.start = state.done
    if args.resume and not root:
        checkpoint.load_checkpoint(state.path, net, generators)
    if state.done < args.epochs:
        train_epochs(args, net, tools, (train_loader, test_loader), estimator, generators, state, df)
    if root and state.done > state.start:
        plot_run(state.path)
    return 0


def train_epochs(args, net, tools, loaders, estimator, generators, state, df):
    """Epochs ``state.done + 1`` .. ``--epochs``: train, test, compare the replicas, then write the
    epoch's ``results.csv`` and ``checkpoint.pt`` (with a resume's staged note) together;
    ``state.done`` counts the epoch as soon as they are in place, even if a signal came meanwhile."""
    import time

    from tqdm import tqdm

    from binary_ep import checkpoint, distributed, files
    from binary_ep.loops import quiet
    replicas = distributed.current()
    bar = tqdm(range(state.done + 1, args.epochs + 1), desc="epochs", initial=state.done,
               total=args.epochs, disable=quiet())
    for epoch in bar:
        state.epoch, start = epoch, time.perf_counter()
        train = tools.train_bin(net, loaders[0], epoch, estimator)
        test = tools.test_bin(net, loaders[1], epoch)
        replicas.check_replicas(net, epoch)
        seconds = time.perf_counter() - start

        def save():
            nonlocal df
            with signals.critical():  # a signal that comes now is raised once the epoch is counted
                with files.all_or_nothing():
                    df = tools.updateDataframe(state.path, df.copy(), epoch, train, test, net, seconds)
                    checkpoint.save_checkpoint(state.path, net, epoch, args, generators)
                state.done = epoch
            files.remove_stale_temporaries(state.path)  # what a killed process left
        replicas.on_root(save, send=False, live=False)
        state.done = epoch
        if state.root:
            tqdm.write(f"epoch {epoch}/{args.epochs}: train error {train['train_error']:.2f}% "
                       f"test error {test['test_error']:.2f}% train loss {train['train_loss']:.4f} "
                       f"test loss {test['test_loss']:.4f} flips {sum(train['flips']):.0f} "
                       f"({seconds:.1f} s)", file=sys.stderr)


def main(argv=None):
    """Exit codes: 0 done, 2 bad arguments or data, 3 diverged, 4 a run file could not be written
    (full disk, quota, I/O error), 5 the run folder is in use by another process, 6 (data-parallel)
    stopped because another rank failed or was lost, 130/143 interrupted (SIGINT/SIGTERM)."""
    from binary_ep.log_stream import guarded_streams  # imports nothing heavy
    argv = sys.argv[1:] if argv is None else argv
    with guarded_streams():  # a log nobody reads any more (| head -1) goes silent, the run goes on
        previous = signals.install_signal_handlers()  # first: the imports below take seconds
        try:
            return _start(argv)
        finally:  # also after an argument error (SystemExit)
            signals.restore_signal_handlers(previous)


def _start(argv):
    """Parse ``argv``, load the libraries and ``run``; every expected failure becomes one line
    and an exit code (``ending``)."""
    try:  # Ctrl-C while the libraries load: still one line, no traceback
        parser, args, argv = parse(argv)
        from binary_ep import distributed, files
        from binary_ep.outcome import Progress, ending, expected_errors
        expected = tuple(expected_errors())
        signals.check()  # a signal whose exception an import dropped
    except signals.Interrupted as e:
        signals.delivered()
        print(f"interrupted ({e}) while starting; nothing was saved", file=sys.stderr)
        return 128 + e.signum
    state = Progress(args.resume)
    try:
        return run(args, argv, parser, state)
    except expected as e:
        line, code = ending(e, state)
        print(line, file=sys.stderr)
        if code == 3 and state.root and state.done > state.start:
            plot_run(state.path)  # the epochs saved before the divergence
        return code
    finally:
        distributed.stop()
        files.release_run_folders()


if __name__ == "__main__":
    code = main()
    signals.ignore_signals()  # a signal while Python shuts down: the run is finished, keep its code
    sys.exit(code)
