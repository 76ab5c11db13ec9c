"""The ``neuralign`` command: ``train``, ``compare``, ``plot``, ``rules``, ``fetch``, ``search``,
``transfer`` and ``robustness``.

Examples::

    neuralign train                                   # 1-D CNN, MNIST-1D, rule ia
    neuralign train --config configs/mnist_mlp.yaml rule.name=kp optim.lr=0.01
    neuralign train --resume runs/NAME               # continue from the last checkpoint
    neuralign compare --rules bp,fa,kp train.epochs=10
    neuralign plot runs/NAME
    neuralign rules

One parser per command, built from the shared parents in :mod:`neuralign.cli.common`; one
dispatch, :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import common, experiments, training

__all__ = ["main", "build_parser", "parse_args"]


class _CommandsHelp(argparse.HelpFormatter):
    """argparse's help, with the commands' help in one column: argparse measures the command
    names without the extra indent it then prints them with, so the longest one wraps."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if action.help is not argparse.SUPPRESS and action.nargs == argparse.PARSER:
            self._action_max_length += self._indent_increment


def build_parser() -> argparse.ArgumentParser:
    """The ``neuralign`` parser; ``parser.commands`` maps each command to its parser and
    ``parser.handlers`` to its handler."""
    parser = argparse.ArgumentParser(
        prog="neuralign",
        description="Train networks whose errors travel through learned feedback weights "
                    "instead of transposed forward weights.",
        formatter_class=_CommandsHelp,
        epilog="run `neuralign COMMAND --help` for each command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    run, folder = common.run_options(), common.folder_options()
    parser.handlers = {**training.add_parsers(sub, run, folder),
                       **experiments.add_parsers(sub, run)}
    parser.commands = dict(sub.choices)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``neuralign`` console script; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    missing = common.missing_dependencies()
    if missing and args.command != "rules":
        print(f"neuralign {args.command}: error: the command line needs the 'cli' extra "
              f"({', '.join(missing)} not installed): pip install 'neuralign[cli]'",
              file=sys.stderr)
        return 2
    common.setup_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))

    from ..train import distributed
    from ..train.config import ConfigError
    from ..train.trainer import DivergenceError

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
        status = parser.handlers[args.command](args)
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
