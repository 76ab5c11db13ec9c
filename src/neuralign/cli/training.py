"""The ``train``, ``compare``, ``plot``, ``rules`` and ``fetch`` commands."""

from __future__ import annotations

import argparse
import logging
import textwrap

from . import common

log = logging.getLogger("neuralign.cli")

__all__ = ["add_parsers"]


def _cmd_train(args: argparse.Namespace) -> int:
    from ..train.config import load_config
    from ..train.trainer import Trainer

    overrides = common.overrides(args)
    if args.resume:
        if args.config:
            raise ValueError("--resume continues a run with its own config.yaml; "
                             "--config cannot be combined with it (use key=value overrides)")
        trainer = Trainer.from_run(args.resume, overrides, runs_dir=args.runs_dir or "runs",
                                   allow_change=args.allow_change)
    elif args.allow_change:
        raise ValueError("--allow-change only applies with --resume")
    elif args.print_config:
        from ..train.config import config_to_yaml

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
    from ..experiments.compare import DEFAULT_RULES, compare, format_table
    from ..train.config import load_config

    rules = ([r.strip() for r in args.rules.split(",") if r.strip()] if args.rules
             else list(DEFAULT_RULES))
    cfg = load_config(args.config, common.overrides(args))
    name = cfg.train.name or None
    cfg.train.name = ""
    rows, out = compare(cfg, rules, name=name)
    if not common.main_rank():
        return 0
    print(format_table(rows))
    print(f"\nwritten: {out / 'compare.csv'}, {out / 'compare.png'}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from ..train.plots import plot_run
    from ..train.trainer import resolve_run_dir

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
        parts.append(f"kind: {r.kind}")
        if r.kp:
            parts.append("kp: F also gets W's task gradient")
        if r.noise is not None:
            parts.append(f"mirror noise: {r.noise.dist}, std {r.noise.std:g}")
        if r.update_noise:
            parts.append(f"update noise std {r.update_noise:g}"
                         + (" x rms(W)" if r.update_noise_units == "weight" else ""))
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


def _cmd_fetch(args: argparse.Namespace) -> int:
    from ..data import fetch

    for name in args.datasets:
        files = fetch(name, args.data_dir)
        print(f"{name}: {len(files)} files in {files[0].parent}")
    print(f"train with --data-dir {args.data_dir}")
    return 0


def add_parsers(sub, run: argparse.ArgumentParser, folder: argparse.ArgumentParser) -> dict:
    """Add ``train``, ``compare``, ``plot``, ``rules`` and ``fetch``; returns their handlers."""
    p = sub.add_parser("train", help="train one model with one rule (default: ia, MNIST-1D)",
                       parents=[folder, run],
                       description="Train one model with one rule. Without arguments: a small "
                                   "1-D CNN on MNIST-1D with rule ia, about a minute on 2 CPU "
                                   "cores. The run folder gets config.yaml, metrics.csv, "
                                   "TensorBoard events (tb/), checkpoints/last.pt and plots/.")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit")
    p.add_argument("--resume", metavar="RUN",
                   help="continue the run folder RUN (a path, or a name under --runs-dir) from "
                        "its last checkpoint; overrides may change e.g. train.epochs")
    p.add_argument("--allow-change", action="store_true",
                   help="with --resume: let overrides change keys that alter what the run "
                        "trains (rule, model, optimizer, data...); recorded in the checkpoint")

    p = sub.add_parser("compare", help="train several rules on one budget and seed; a table",
                       parents=[folder, run],
                       description="Train the same model once per rule, same data, budget and "
                                   "seed; print a table (final/best top-1, mean weight angle, "
                                   "end-to-end angle, lag, time per epoch) and write "
                                   "compare.csv and compare.png to RUNS_DIR/NAME/.")
    p.add_argument("--rules", default=None,
                   help="comma-separated rules (default: bp,fa,wm,ia,sa,aa,kp,usf,frsf,brsf,dfa)")

    p = sub.add_parser("plot", help="redraw a run folder's plots from its metrics.csv",
                       description="Redraw RUN/plots/*.png from RUN/metrics.csv.")
    p.add_argument("run", metavar="RUN", help="run folder (a path, or a name under --runs-dir)")
    p.add_argument("--runs-dir", default="runs", help="parent folder of run folders")

    p = sub.add_parser("rules", help="list the learning rules, their terms and defaults",
                       description="List the catalog of learning rules: description, terms "
                                   "and switches, and where the defaults come from.")
    p.add_argument("--names", action="store_true", help="names only, one per line")

    p = sub.add_parser("fetch", help="download MNIST, Fashion-MNIST or CIFAR into --data-dir",
                       description="Download datasets with torchvision into DIR, in the layout "
                                   "`neuralign train --data-dir DIR` reads (files already there "
                                   "are kept). Offline, put the files in that layout yourself: "
                                   "see docs/cli.md, Data. MNIST-1D needs nothing: it is "
                                   "generated locally.")
    p.add_argument("datasets", nargs="+", metavar="DATASET",
                   help="mnist, fashion-mnist, cifar10, cifar100")
    p.add_argument("--data-dir", default="data", metavar="DIR",
                   help="the folder to download into (default data)")
    return {"train": _cmd_train, "compare": _cmd_compare, "plot": _cmd_plot,
            "rules": _cmd_rules, "fetch": _cmd_fetch}
