"""The ``neuralign`` command: ``train``, ``compare``, ``plot`` and ``rules``.

Examples::

    neuralign train                                   # 1-D CNN, MNIST-1D, rule ia
    neuralign train --config configs/mnist_mlp.yaml rule.name=kp optim.lr=0.01
    neuralign train --resume runs/NAME               # continue from the last checkpoint
    neuralign compare --rules bp,fa,kp train.epochs=10
    neuralign plot runs/NAME
    neuralign rules
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap

__all__ = ["main", "build_parser", "parse_args"]

log = logging.getLogger("neuralign.cli")

_OVERRIDES_HELP = ("dotted config overrides key=value (values parsed as YAML), e.g. "
                   "optim.lr=0.01 rule.name=kp train.epochs=5 'rule.layers={fc: bp}'")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config file (see configs/)")
    p.add_argument("--name", help="run name (train.name); the run folder is RUNS_DIR/NAME")
    p.add_argument("--runs-dir", help="parent folder of run folders (train.runs_dir; "
                                      "default runs)")
    p.add_argument("--data-dir", help="folder holding the datasets (data.data_dir)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download missing datasets (data.download=true)")
    p.add_argument("--epochs", type=int, help="training epochs (train.epochs)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (train.device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="also log every layer swap")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    add_nproc(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=_OVERRIDES_HELP)


def add_nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, metavar="N",
                   help="run as N processes on this machine (DistributedDataParallel; the "
                        "same as `torchrun --standalone --nproc_per_node=N -m neuralign ...`; "
                        "data.batch_size is the global batch); see docs/distributed.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuralign",
        description="Train networks whose errors travel through learned feedback weights "
                    "instead of transposed forward weights.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            commands:
              train     train one model with one rule (default: 1-D CNN, MNIST-1D, rule ia)
              compare   train several rules under the same budget and seed, print a table
              plot      redraw a run folder's plots from its metrics.csv
              rules     list the learning rules with their terms and defaults
            run `neuralign COMMAND --help` for each command's options."""))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train one model with one rule",
                       description="Train one model with one rule. Without arguments: a small "
                                   "1-D CNN on MNIST-1D with rule ia, about a minute on 2 CPU "
                                   "cores. The run folder gets config.yaml, metrics.csv, "
                                   "TensorBoard events (tb/), checkpoints/last.pt and plots/.")
    _add_common(p)
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit")
    p.add_argument("--resume", metavar="RUN",
                   help="continue the run folder RUN (a path, or a name under --runs-dir) from "
                        "its last checkpoint; overrides may change e.g. train.epochs")
    p.add_argument("--allow-change", action="store_true",
                   help="with --resume: let overrides change keys that alter what the run "
                        "trains (rule, model, optimizer, data...); recorded in the checkpoint")

    p = sub.add_parser("compare", help="compare rules under the same budget and seed",
                       description="Train the same model once per rule, same data, budget and "
                                   "seed; print a table (final/best top-1, mean weight angle, "
                                   "time per epoch) and write compare.csv and compare.png to "
                                   "RUNS_DIR/NAME/.")
    p.add_argument("--rules", default=None,
                   help="comma-separated rules (default: bp,fa,wm,ia,sa,aa,kp,usf,frsf,brsf,dfa)")
    _add_common(p)

    p = sub.add_parser("plot", help="redraw a run's plots",
                       description="Redraw RUN/plots/*.png from RUN/metrics.csv.")
    p.add_argument("run", metavar="RUN", help="run folder (a path, or a name under --runs-dir)")
    p.add_argument("--runs-dir", default="runs", help="parent folder of run folders")

    p = sub.add_parser("rules", help="list the learning rules",
                       description="List the catalog of learning rules: description, terms "
                                   "and switches, and where the defaults come from.")
    p.add_argument("--names", action="store_true", help="names only, one per line")

    from .experiments import register_commands  # search, transfer, robustness

    register_commands(sub, _COMMANDS)
    parser.commands = dict(sub.choices)  # name -> its parser (see parse_args)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed with options and ``key=value`` overrides in any order after the command
    (argparse's intermixed parsing, per command: it does not go through subparsers)."""
    if argv and argv[0] in parser.commands:
        args = parser.commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)  # --help, --version, or an unknown command


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("neuralign")
    except Exception:  # not installed (e.g. run from a source tree)
        return "unknown"


def _setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    from .train import distributed

    root = logging.getLogger("neuralign")
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    rank = int(os.environ.get("RANK", "0"))
    handler.setFormatter(logging.Formatter(
        f"[rank {rank}] %(message)s" if distributed.requested() else "%(message)s"))
    root.addHandler(handler)
    # under torchrun only rank 0 logs progress; the others warnings and errors
    quiet = quiet or rank > 0
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    if not verbose:
        for name in ("neuralign.convert", "neuralign.layers"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _common_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.name:
        out.append(f"train.name={args.name}")
    if args.runs_dir:
        out.append(f"train.runs_dir={args.runs_dir}")
    if args.data_dir:
        out.append(f"data.data_dir={args.data_dir}")
    if args.download:
        out.append("data.download=true")
    if args.epochs is not None:
        out.append(f"train.epochs={args.epochs}")
    if args.device:
        out.append(f"train.device={args.device}")
    if args.no_progress:
        out.append("train.progress=false")
    # explicit key=value overrides win over the flags
    return out + list(args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.config import load_config
    from .train.trainer import Trainer

    overrides = _common_overrides(args)
    if args.resume:
        if args.config:
            raise ValueError("--resume continues a run with its own config.yaml; "
                             "--config cannot be combined with it (use key=value overrides)")
        trainer = Trainer.from_run(args.resume, overrides, runs_dir=args.runs_dir or "runs",
                                   allow_change=args.allow_change)
    elif args.allow_change:
        raise ValueError("--allow-change only applies with --resume")
    elif args.print_config:
        from .train.config import config_to_yaml

        print(config_to_yaml(load_config(args.config, overrides)), end="")
        return 0
    else:
        trainer = Trainer(load_config(args.config, overrides))
    log.info("run folder: %s", trainer.run_dir)
    history = trainer.fit()
    if history:
        last = history[-1]
        best = max(h["test_top1"] for h in history)
        log.info("done: test top-1 %.2f%% (best %.2f%%); run folder %s", last["test_top1"], best,
                 trainer.run_dir)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .train.compare import DEFAULT_RULES, compare, format_table
    from .train.config import load_config

    rules = ([r.strip() for r in args.rules.split(",") if r.strip()] if args.rules
             else list(DEFAULT_RULES))
    cfg = load_config(args.config, _common_overrides(args))
    name = cfg.train.name or None
    cfg.train.name = ""
    rows, out = compare(cfg, rules, name=name)
    from .train import distributed

    if not distributed.is_main():
        return 0
    print(format_table(rows))
    print(f"\nwritten: {out / 'compare.csv'}, {out / 'compare.png'}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .train.plots import plot_run
    from .train.trainer import resolve_run_dir

    for path in plot_run(resolve_run_dir(args.run, args.runs_dir)):
        print(path)
    return 0


def _cmd_rules(args: argparse.Namespace) -> int:
    import neuralign as na

    entries = na.rules.catalog()
    if args.names:
        print("\n".join(e.name for e in entries))
        return 0
    for e in entries:
        r = e.rule
        parts = []
        if r.terms:
            parts.append("terms: " + ", ".join(f"{k}={v:g}" for k, v in r.terms.items()))
        parts.append(f"feedback: {r.feedback}")
        if r.kp:
            parts.append("kp: F also gets W's task gradient")
        if r.noise is not None:
            parts.append(f"mirror noise: {r.noise.dist}, std {r.noise.std:g}")
        if r.update_noise:
            parts.append(f"update noise std {r.update_noise:g}")
        if r.normalize:
            parts.append(f"normalize: {r.normalize}")
        if r.init != "default":
            parts.append(f"init: {r.init}")
        if r.learns:
            parts.append(f"recipe rate {r.rate:g}")
        print(f"{e.name}")
        print(textwrap.fill(e.description, 96, initial_indent="    ",
                            subsequent_indent="    "))
        print(textwrap.fill("; ".join(parts), 96, initial_indent="    ",
                            subsequent_indent="    "))
        print(textwrap.fill(f"source: {e.source}", 96, initial_indent="    ",
                            subsequent_indent="    "))
    print("\nA custom rule: rule.name=custom 'rule.terms={amp: 1, null: 1, decay: 1}' "
          "rule.noise_std=1.0; override a named rule's coefficients with rule.terms.<term>=x.")
    return 0


_COMMANDS = {"train": _cmd_train, "compare": _cmd_compare, "plot": _cmd_plot,
             "rules": _cmd_rules}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``neuralign`` console script; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))

    from .train import distributed
    from .train.config import ConfigError
    from .train.trainer import DivergenceError

    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        print(f"neuralign {args.command}: error: --nproc must be >= 1, got {nproc}",
              file=sys.stderr)
        return 2
    if nproc and nproc > 1 and not distributed.requested() and not getattr(
            args, "print_config", False):
        return distributed.launch(distributed.strip_option(argv, "--nproc"), nproc)
    # under torchrun, say which rank failed (torchrun prints every rank's output)
    who = f" (rank {os.environ.get('RANK', '0')})" if distributed.requested() else ""
    try:
        status = _COMMANDS[args.command](args)
        distributed.cleanup(wait=True)
        return status
    except DivergenceError as e:
        print(f"neuralign{who}: {e}", file=sys.stderr)
        return 3
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"neuralign {args.command}{who}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `neuralign rules | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("neuralign: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
