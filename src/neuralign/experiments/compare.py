"""Train several rules under the same budget and seed, and tabulate them: an experiment on
the same :func:`~neuralign.experiments.common.run_once` as transfer and robustness, so a
restarted comparison trains only the rules that have not finished."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import neuralign as na

from ..data import build_data
from ..io import markdown_table, read_csv, write_csv
from ..models import check_model_name
from ..train import distributed
from ..train.config import Config, ConfigError, check_run_name, save_config
from ..train.events import Callback
from ..train.plots import plot_compare
from .common import run_once

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_RULES", "compare", "format_table"]

#: The rules ``neuralign compare`` runs by default: the whole catalog, backprop first.
DEFAULT_RULES = ("bp", "fa", "wm", "ia", "sa", "aa", "kp", "usf", "frsf", "brsf", "dfa")

COLUMNS = ("rule", "final_top1", "best_top1", "best_epoch", "weight_angle", "backprop_angle",
           "feedback_lag", "epoch_time_s", "epochs", "status")


def compare(cfg: Config, rules: list[str] | tuple[str, ...] = DEFAULT_RULES,
            name: str | None = None, callbacks: list[Callback] | None = None
            ) -> tuple[list[dict], Path]:
    """Train ``cfg`` once per rule (same data, budget and seed) and summarise.

    Each rule's run goes to ``runs_dir/name/runs/<rule>-<key>/`` (``key`` a hash of its
    config); ``compare.csv`` and ``compare.png`` go to ``runs_dir/name/``. A rule that diverges
    is reported as such and the others still run; a rule that finished earlier is not trained
    again.

    Returns:
        The table rows (keys :data:`COLUMNS`) and the comparison folder.
    """
    valid = na.list_rules()
    unknown = [r for r in rules if r not in valid]
    if unknown or not rules:
        raise ConfigError(f"unknown rule(s) {unknown or rules}; valid: {', '.join(valid)}")
    check_model_name(cfg.model.name)  # (before any folder is made)
    distributed.init()  # under torchrun every rank runs every rule; rank 0 writes
    name = name or cfg.train.name or \
        f"compare-{cfg.data.name}-{cfg.model.name}-{distributed.timestamp()}"
    check_run_name(name, "the comparison's name (--name)")
    out = Path(cfg.train.runs_dir) / name
    main = distributed.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    data = build_data(cfg.data)
    rows, histories = [], {}
    for i, rule in enumerate(rules):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.rule.name = rule
        log.info("compare: rule %s (%d/%d)", rule, i + 1, len(rules))
        result = run_once(run_cfg, out, rule, data=data, quiet_trainer=False,
                          callbacks=callbacks)
        metrics = out / "runs" / f"{rule}-{result['key']}" / "metrics.csv"
        histories[rule] = read_csv(metrics) if metrics.is_file() else []
        rows.append(_row(rule, result))
    if not main:
        return rows, out
    write_csv(rows, out / "compare.csv")
    if any(histories.values()):
        plot_compare({r: h for r, h in histories.items() if h}, out / "compare.png",
                     title=f"{cfg.data.name} {cfg.model.name}, {cfg.train.epochs} epochs, "
                           f"seed {cfg.train.seed}")
    return rows, out


def _row(rule: str, r: dict) -> dict:
    return {"rule": rule, "final_top1": r["test_top1"], "best_top1": r["best_test_top1"],
            "best_epoch": r["best_epoch"], "weight_angle": r["weight_angle"],
            "backprop_angle": r["backprop_angle"], "feedback_lag": r["feedback_lag"],
            "epoch_time_s": r["epoch_time_s"], "epochs": r["epochs"], "status": r["status"]}


def format_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`compare`'s rows."""
    header = ["rule", "final top-1 (%)", "best top-1 (%)", "mean weight angle (°)",
              "end-to-end angle vs BP (°)", "lag ‖F − F*‖/‖F*‖", "time/epoch (s)", "status"]
    table = [[r["rule"], f"{r['final_top1']:.1f}", f"{r['best_top1']:.1f}",
              f"{r['weight_angle']:.1f}", f"{r['backprop_angle']:.1f}",
              f"{r.get('feedback_lag', math.nan):.3f}", f"{r['epoch_time_s']:.2f}", r["status"]]
             for r in rows]
    return markdown_table(header, [[c if c != "nan" else None for c in row] for row in table])
