"""What every ``neuralign`` command shares: the parent parsers of the common flags, the one
mapping from flags to config overrides, logging, and which rank prints. The command-line
interface owns the process: it alone sets logger levels, Optuna's verbosity and torch's
thread count."""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["OVERRIDES_HELP", "run_options", "folder_options", "overrides", "setup_logging",
           "main_rank", "missing_dependencies"]

#: What the commands need beyond torch (the ``cli`` extra), by import name.
CLI_DEPENDENCIES = ("yaml", "numpy", "tqdm", "matplotlib", "torchvision", "mnist1d", "optuna",
                    "tensorboard")


def missing_dependencies() -> list[str]:
    """The ``cli`` extra's packages that cannot be imported here."""
    import importlib.util

    return [m for m in CLI_DEPENDENCIES if importlib.util.find_spec(m) is None]

OVERRIDES_HELP = ("dotted config overrides key=value (values parsed as YAML), e.g. "
                  "optim.lr=0.01 rule.name=kp train.epochs=5 'rule.layers={fc: bp}'")


def run_options() -> argparse.ArgumentParser:
    """Flags of every command that trains: budget, device, threads, verbosity, processes, and
    the ``key=value`` overrides."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--epochs", type=int, help="training epochs (train.epochs)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (train.device)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (torch.set_num_threads); 1 is often much faster "
                        "for small models on a busy machine")
    p.add_argument("-v", "--verbose", action="store_true", help="also log every layer swap")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="run as N processes on this machine (DistributedDataParallel; the "
                        "same as `torchrun --standalone --nproc_per_node=N -m neuralign ...`; "
                        "data.batch_size is the global batch); see docs/distributed.md")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    return p


def folder_options() -> argparse.ArgumentParser:
    """Flags of ``train`` and ``compare``: the config file, the run folder, the data."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config file (see configs/)")
    p.add_argument("--name", help="run name (train.name); the run folder is RUNS_DIR/NAME")
    p.add_argument("--runs-dir", help="parent folder of run folders (train.runs_dir; "
                                      "default runs)")
    p.add_argument("--data-dir", help="folder holding the datasets (data.data_dir)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download missing datasets (data.download=true)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


#: flag attribute -> config key (a value of None, or False, means "not given")
_FLAG_KEYS = (("name", "train.name"), ("runs_dir", "train.runs_dir"),
              ("data_dir", "data.data_dir"), ("epochs", "train.epochs"),
              ("device", "train.device"))


def overrides(args: argparse.Namespace, *first: str) -> list[str]:
    """The config overrides a command line means: ``first``, then the flags', then the
    explicit ``key=value`` pairs (which win). ``--threads`` sets torch's thread count."""
    out = list(first)
    for attr, key in _FLAG_KEYS:
        value = getattr(args, attr, None)
        if attr == "name" and value == "":
            from ..train.config import ConfigError

            raise ConfigError("--name is empty: give a folder name, or leave --name out for "
                              "one made of the data, model, rule and time")
        if value is not None:
            out.append(f"{key}={value}")  # (a text key takes the text, not YAML's reading)
    if getattr(args, "download", False):
        out.append("data.download=true")
    if getattr(args, "no_progress", False):
        out.append("train.progress=false")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return out + list(getattr(args, "overrides", []))


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """The package logger to stderr (INFO; DEBUG with ``verbose``; WARNING with ``quiet`` and
    on every rank but 0 under torchrun)."""
    from ..train import distributed

    root = logging.getLogger("neuralign")
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    rank = int(os.environ.get("RANK", "0"))
    handler.setFormatter(logging.Formatter(
        f"[rank {rank}] %(message)s" if distributed.requested() else "%(message)s"))
    root.addHandler(handler)
    quiet = quiet or rank > 0
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    # layer swaps, and each run of a sweep, only with -v
    for name in ("neuralign.convert", "neuralign.layers"):
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)


def main_rank() -> bool:
    """Under torchrun every rank runs the command; rank 0 prints."""
    from ..train import distributed

    return distributed.is_main()
