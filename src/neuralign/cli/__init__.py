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
import signal
import sys
import threading

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


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch system's time limit): raised where the process is, so that
    it stops as Ctrl-C does (checkpoints intact, writers closed), with exit status 143."""


def _on_sigterm(signum, frame):
    raise Terminated


def _notes(e: BaseException) -> str:
    """The notes an exception picked up on its way (the trainer's: where the checkpoint
    stands), as a sentence to append."""
    notes = getattr(e, "__notes__", None)
    return "; " + "; ".join(notes) if notes else ""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``neuralign`` console script; returns the exit status: 0 done, 2 an
    error told in one line (the configuration, files, the system), 3 diverged, 130 Ctrl-C,
    143 SIGTERM (docs/cli.md, "Errors")."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    missing = common.missing_dependencies()
    if missing:
        print(f"neuralign {args.command}: error: the command line needs the 'cli' extra "
              f"({', '.join(missing)} not installed): pip install 'neuralign[cli]'",
              file=sys.stderr)
        return 2
    # under torchrun, say which rank failed (torchrun prints every rank's output)
    who = (f" (rank {os.environ.get('RANK', '0')})"
           if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
    error = f"neuralign {args.command}{who}: error:"
    # SIGTERM stops like Ctrl-C (Python runs signal handlers in the main thread only)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return _run(parser, args, argv, who)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        note = _notes(e)[2:] or "the last checkpoint is intact"
        print(f"neuralign{who}: {what}; {note}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except ImportError as e:  # a package of the cli extra that is there but broken
        print(f"{error} {e}: the command line needs the 'cli' extra: pip install "
              f"'neuralign[cli]'", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `neuralign rules | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as e:  # a full disk, permissions, a file in the way, a folder in use, ...
        from ..io import os_error_message

        print(f"{error} {os_error_message(e)}{_notes(e)}", file=sys.stderr)
        return 2
    except MemoryError as e:
        print(f"{error} out of memory{_notes(e)}: lower data.batch_size or "
              f"data.eval_batch_size, or train a smaller model", file=sys.stderr)
        return 2
    except RuntimeError as e:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            print(f"{error} the device is out of memory ({str(e).split('. ')[0]}){_notes(e)}: "
                  f"lower data.batch_size or data.eval_batch_size, or train a smaller model",
                  file=sys.stderr)
        elif "without overflow" in str(e):  # a config value torch's float32 cannot hold
            print(f"{error} a value is beyond torch's float32 ({str(e).splitlines()[0]})"
                  f"{_notes(e)}: lower the config's values above 3.4e38 (a rule's "
                  f"coefficients, rates, noise)", file=sys.stderr)
        else:
            raise  # (a bug: its traceback helps)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str],
         who: str) -> int:
    """The command; the errors of the configuration and of training told in one line (the
    others, :func:`main`'s)."""
    error = f"neuralign {args.command}{who}: error:"
    common.setup_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))

    from ..train import distributed
    from ..train.config import ConfigError
    from ..train.trainer import DivergenceError

    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        print(f"{error} --nproc must be >= 1, got {nproc}", file=sys.stderr)
        return 2
    if nproc and nproc > 1 and not distributed.requested() and not getattr(
            args, "print_config", False):
        return distributed.launch(distributed.strip_option(argv, "--nproc"), nproc)
    try:
        status = parser.handlers[args.command](args)
        distributed.cleanup(wait=True)
        return status
    except DivergenceError as e:
        print(f"neuralign{who}: {e}", file=sys.stderr)
        return 3
    except (ConfigError, ValueError) as e:
        print(f"{error} {e}{_notes(e)}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
