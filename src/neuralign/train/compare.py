"""Train several rules under the same budget and seed, and tabulate them."""

from __future__ import annotations

import copy
import logging
import math
import time
from datetime import datetime
from pathlib import Path

import neuralign as na

from ..data import build_data
from . import distributed
from .callbacks import write_csv
from .config import Config, ConfigError, check_run_name, save_config
from .plots import plot_compare
from .trainer import Callback, DivergenceError, Trainer

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

    Each rule's run goes to ``runs_dir/name/<rule>/``; ``compare.csv`` and ``compare.png`` go to
    ``runs_dir/name/``. A rule that diverges is reported as such and the others still run.

    Returns:
        The table rows (keys :data:`COLUMNS`) and the comparison folder.
    """
    valid = na.list_rules()
    unknown = [r for r in rules if r not in valid]
    if unknown or not rules:
        raise ConfigError(f"unknown rule(s) {unknown or rules}; valid: {', '.join(valid)}")
    distributed.init()  # under torchrun every rank runs every rule; rank 0 writes
    name = name or cfg.train.name or f"compare-{cfg.data.name}-{cfg.model.name}-" \
        f"{distributed.broadcast_object(datetime.now().strftime('%Y%m%d-%H%M%S'))}"
    check_run_name(name, "the comparison's name (--name)")
    out = Path(cfg.train.runs_dir) / name
    main = distributed.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    data = build_data(cfg.data)
    rows, histories = [], {}
    for rule in rules:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.rule.name = rule
        run_cfg.train.name = f"{name}/{rule}"
        log.info("compare: rule %s (%d/%d)", rule, len(rows) + 1, len(rules))
        t0 = time.perf_counter()
        status = "ok"
        trainer = Trainer(run_cfg, callbacks=callbacks, data=data)
        try:
            history = trainer.fit()
        except DivergenceError as e:
            log.warning("compare: rule %s: %s", rule, e)
            history = trainer.history
            status = f"diverged (epoch {e.epoch}, step {e.step})"
        wall = time.perf_counter() - t0
        histories[rule] = history
        rows.append(_summary(rule, history, status, wall))
    if not main:
        return rows, out
    write_csv(rows, out / "compare.csv")
    if any(histories.values()):
        plot_compare({r: h for r, h in histories.items() if h}, out / "compare.png",
                     title=f"{cfg.data.name} {cfg.model.name}, {cfg.train.epochs} epochs, "
                           f"seed {cfg.train.seed}")
    return rows, out


def _summary(rule: str, history: list[dict], status: str, wall: float) -> dict:
    nan = math.nan
    if not history:
        return {"rule": rule, "final_top1": nan, "best_top1": nan, "best_epoch": nan,
                "weight_angle": nan, "backprop_angle": nan, "feedback_lag": nan,
                "epoch_time_s": nan, "epochs": 0, "status": status}
    best = max(history, key=lambda h: h["test_top1"])
    last = history[-1]
    return {
        "rule": rule,
        "final_top1": last["test_top1"],
        "best_top1": best["test_top1"],
        "best_epoch": int(best["epoch"]),
        "weight_angle": last["weight_angle"],
        "backprop_angle": last["backprop_angle"],
        "feedback_lag": last.get("feedback_lag", nan),
        "epoch_time_s": sum(h["epoch_time_s"] for h in history) / len(history),
        "epochs": len(history),
        "status": status,
    }


def format_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`compare`'s rows."""

    def num(v, fmt):
        return "–" if not isinstance(v, (int, float)) or not math.isfinite(v) else fmt.format(v)

    head = ("| rule | final top-1 (%) | best top-1 (%) | mean weight angle (°) | "
            "end-to-end angle vs BP (°) | lag ‖F − F*‖/‖F*‖ | time/epoch (s) | status |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['rule']} | {num(r['final_top1'], '{:.1f}')} | "
                     f"{num(r['best_top1'], '{:.1f}')} | {num(r['weight_angle'], '{:.1f}')} | "
                     f"{num(r['backprop_angle'], '{:.1f}')} | "
                     f"{num(r.get('feedback_lag'), '{:.3f}')} | "
                     f"{num(r['epoch_time_s'], '{:.2f}')} | {r['status']} |")
    return "\n".join(lines)
