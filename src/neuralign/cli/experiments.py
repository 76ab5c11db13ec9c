"""The ``search``, ``transfer`` and ``robustness`` commands (the paper's evaluation)."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from . import common

log = logging.getLogger("neuralign.experiments")

__all__ = ["add_parsers"]

#: The experiments train many runs: no progress bars.
_FIRST = ("train.progress=false",)


def _seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    from ..io import split_list
    from ..train.config import ConfigError

    try:
        return [int(s) for s in split_list(text)]
    except ValueError:
        raise ConfigError(f"--seeds: expected integers such as 0,1,2, got {text!r}") from None


def _out(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--out", metavar="DIR",
                   help=f"output folder (default runs/{command}/<name>); a restarted command "
                        "skips what is already there")


def add_parsers(sub, run: argparse.ArgumentParser) -> dict:
    """Add ``search``, ``transfer`` and ``robustness``; returns their handlers."""
    p = sub.add_parser(
        "search", parents=[run], help="metaparameter search (Optuna TPE, median pruning)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search metaparameters with Optuna's TPE sampler on a validation split of "
                    "the training set (never the test set); a median pruner stops weak trials "
                    "on their per-epoch validation top-1. The study lives in a database: a "
                    "restart resumes it, several workers may share it. Writes best.yaml, "
                    "trials.csv, history.png, importances.png and curves.png to --out.",
        epilog="space file (YAML), e.g.:\n"
               "  rule.terms.amp:  {type: float, low: 1.0e-3, high: 10.0, log: true}\n"
               "  rule.noise_std:  {type: log_float, low: 0.1, high: 3.0}\n"
               "  data.batch_size: {type: int, low: 32, high: 256, log: true}\n"
               "  feedback_optim.rate: {type: log_float, low: 0.01, high: 1.0}\n"
               "storage: sqlite:///OUT/study.db by default; for many machines a PostgreSQL URL,\n"
               "  postgresql://USER:PASSWORD@HOST:5432/DB (pip install 'neuralign[postgres]'), and\n"
               "  the same command (--study, --storage) started on each machine: the workers\n"
               "  sample differently by themselves (each trial's sampler is seeded by --seed and\n"
               "  the trial's number).")
    p.add_argument("--config", "-c", metavar="BASE", required=True, help="base config YAML")
    p.add_argument("--space", "-s", metavar="SPACE", required=True, help="search space YAML")
    p.add_argument("--trials", "-n", type=int, default=20,
                   help="finished trials the study should hold (a restart runs the rest; "
                        "default 20)")
    p.add_argument("--study", help="study name (default: the space file's name)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage URL (default sqlite:///OUT/study.db)")
    p.add_argument("--seed", type=int, default=0,
                   help="TPE sampler seed, with each trial's number (default 0)")
    p.add_argument("--jobs", "-j", type=int, default=1,
                   help="worker processes on this machine sharing the study (default 1)")
    p.add_argument("--pruner", choices=("median", "none"), default="median",
                   help="median: stop a trial whose validation top-1 is below the median of "
                        "earlier trials at the same epoch (default)")
    p.add_argument("--prune-startup", type=int, default=3,
                   help="complete trials before pruning starts (default 3)")
    p.add_argument("--prune-warmup", type=int, default=1,
                   help="epochs a trial runs before it may be pruned (default 1)")
    p.add_argument("--startup-trials", type=int, default=5,
                   help="random trials before TPE models the space (default 5)")
    p.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    _out(p, "search")

    p = sub.add_parser(
        "transfer", parents=[run], help="fixed metaparameters on networks of growing depth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train each config (e.g. a search's best.yaml) and each --rules rule on "
                    "every model, with the metaparameters kept fixed; table and plot of final "
                    "test top-1 against depth. Finished runs are skipped on restart.",
        epilog="models: NAME or [LABEL=]NAME:KEY=VALUE[:KEY=VALUE], comma-separated; keys "
               "without a\ndot are model keys, e.g.\n"
               "  --models resnet20,resnet32,resnet56\n"
               "  --models 'mlp:widths=[100],mlp:widths=[100,100,100],mlp:widths=[100,100,"
               "100,100,100]'")
    p.add_argument("--config", "-c", metavar="FILE", action="append", default=[],
                   help="a config with a rule and its metaparameters (repeatable)")
    p.add_argument("--models", "-m", required=True, help="models, shallow to deep")
    p.add_argument("--rules", help="more rules, comma-separated, e.g. bp,sa,aa: the --base "
                                   "config with the rule's catalog defaults")
    p.add_argument("--base", metavar="FILE",
                   help="config for the --rules entries (default: the first --config)")
    p.add_argument("--seeds", help="training seeds, e.g. 0,1,2 (default: each config's)")
    p.add_argument("--name", dest="out_name",
                   help="name of the output folder under runs/transfer/")
    _out(p, "transfer")

    p = sub.add_parser(
        "robustness", parents=[run], help="top-1 against update-noise σ",
        description="Train each rule with update noise F <- F + lr_F*N(0, sigma^2) after every "
                    "feedback step (--noise-units weight: F <- F + sigma*rms(W)*N(0, 1)), for "
                    "each sigma; table and plot of final test top-1 against sigma. Finished "
                    "runs are skipped on restart.")
    p.add_argument("--config", "-c", metavar="BASE", help="base config YAML")
    p.add_argument("--rules", default="sa,aa,ia", help="comma-separated (default sa,aa,ia)")
    p.add_argument("--noise", default="0,1e-4,1e-3,1e-2",
                   help="update-noise standard deviations (default 0,1e-4,1e-3,1e-2)")
    p.add_argument("--noise-units", default="gradient", choices=("gradient", "weight"),
                   help="gradient: sigma scaled by each rule's step size (the paper's); weight: "
                        "sigma is the noise per step relative to rms(W), one axis for all rules")
    p.add_argument("--seeds", help="training seeds, e.g. 0,1,2 (default: the config's)")
    p.add_argument("--name", dest="out_name",
                   help="name of the output folder under runs/robustness/")
    _out(p, "robustness")
    return {"search": _cmd_search, "transfer": _cmd_transfer, "robustness": _cmd_robustness}


def _cmd_search(args) -> int:
    import optuna

    from ..experiments.search import _prepare_base, search
    from ..experiments.space import load_space
    from ..train.config import load_config

    base = load_config(args.config, common.overrides(args, *_FIRST))
    space = load_space(args.space, _prepare_base(base))  # checked before anything runs
    study = args.study or Path(args.space).stem
    out = Path(args.out) if args.out else Path(base.train.runs_dir) / "search" / study
    pruner = optuna.pruners.NopPruner() if args.pruner == "none" else None
    # the command owns the process: Optuna's per-trial lines and tracebacks off (the search
    # logs each trial's outcome in one line)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    res = search(base, space, args.trials, study, out=out, storage=args.storage,
                 seed=args.seed, jobs=args.jobs, pruner=pruner,
                 prune_startup=args.prune_startup, prune_warmup=args.prune_warmup,
                 startup_trials=args.startup_trials, timeout=args.timeout)
    if not common.main_rank():
        return 0
    rows = res["trials"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"] or r["state"].lower()] = counts.get(
            r["status"] or r["state"].lower(), 0) + 1
    print(f"study {study}: {len(rows)} trials (" +
          ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ")")
    ranked = sorted((r for r in rows if r["state"] == "COMPLETE"),
                    key=lambda r: -r["value"])[:5]
    if ranked:
        keys = space.keys()
        print("\n| trial | val top-1 (%) | " + " | ".join(keys) + " |")
        print("|" + "---|" * (2 + len(keys)))
        for r in ranked:
            vals = [f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
            print(f"| {r['number']} | {r['value']:.2f} | " + " | ".join(vals) + " |")
    if res["best"]:
        print(f"\nbest: trial {res['best']['number']}, validation top-1 "
              f"{res['best']['value']:.2f}%; config {out / 'best.yaml'}")
    print(f"written: {out}/trials.csv, history.png, importances.png, curves.png")
    return 0 if res["best"] else 1


def _cmd_transfer(args) -> int:
    from ..experiments.common import rule_variant
    from ..experiments.transfer import parse_models, transfer
    from ..io import split_list
    from ..train.config import ConfigError, check_run_name, load_config

    over = common.overrides(args, *_FIRST)
    if not args.config and not args.base:
        raise ConfigError("transfer needs --config FILE (repeatable) and/or --base FILE with "
                          "--rules")
    entries = []
    for path in args.config:
        cfg = load_config(path, over)
        label = cfg.rule.name
        if any(lab == label for lab, _ in entries):
            label = f"{cfg.rule.name}@{Path(path).stem}"
        entries.append((label, cfg))
    if args.rules:
        base = load_config(args.base, over) if args.base else entries[0][1]
        for rule in split_list(args.rules):
            if any(lab == rule for lab, _ in entries):
                continue
            entries.append((rule, rule_variant(base, rule)))
    models = parse_models(args.models)
    name = check_run_name(args.out_name or "-".join(lab for lab, _ in entries), "--name")
    out = Path(args.out) if args.out else Path(entries[0][1].train.runs_dir) / "transfer" / name
    res = transfer(entries, models, out, _seeds(args.seeds))
    if not common.main_rank():
        return 0
    print(res["table"])
    print(f"\n(final-epoch test top-1, %; written: {out}/transfer.csv, transfer_summary.csv, "
          f"transfer.png)")
    return 0


def _cmd_robustness(args) -> int:
    from ..experiments.common import parse_floats
    from ..experiments.robustness import robustness
    from ..io import split_list
    from ..train.config import check_run_name, load_config

    base = load_config(args.config, common.overrides(args, *_FIRST))
    rules = split_list(args.rules)
    noise = parse_floats(args.noise, "--noise")
    name = check_run_name(args.out_name or f"{base.data.name}-{base.model.name}", "--name")
    out = Path(args.out) if args.out else Path(base.train.runs_dir) / "robustness" / name
    res = robustness(base, rules, noise, out, _seeds(args.seeds), units=args.noise_units)
    if not common.main_rank():
        return 0
    print(res["table"])
    bad = sum(1 for r in res["runs"] if not math.isfinite(r["test_top1"]))
    print(f"\n(final-epoch test top-1, %; written: {out}/robustness.csv, "
          f"robustness_summary.csv, robustness.png)" + (f"; {bad} run(s) diverged" if bad
                                                          else ""))
    return 0
