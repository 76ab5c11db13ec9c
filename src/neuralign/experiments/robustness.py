"""Robustness to noisy feedback updates: top-1 against the update-noise σ.

After every feedback step ``F ← F + lr_F · ε``, ``ε ~ N(0, σ²)`` (the paper's
ΔB = ∇R + N(0, σ²); ``rule.update_noise``), or, with ``units='weight'``,
``F ← F + σ · rms(W) · N(0, 1)``: the same noise per step relative to W for every rule, whatever
its step size (``rule.update_noise_units``). Each rule runs with its metaparameters from the base
config when the base is that rule, else with its catalog defaults (:func:`.common.rule_variant`).
Rules without learned feedback weights (``bp``, ``fa``, sign rules, ``dfa``) have nothing to
perturb: they run once, at σ = 0, as reference lines.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import neuralign as na

from ..models import check_model_name
from ..rules import UPDATE_NOISE_UNITS
from ..train.config import Config, ConfigError, config_to_dict
from .common import (
    format_markdown,
    plt,
    rule_variant,
    run_once,
    savefig_atomic,
    write_csv,
    write_yaml,
)
from .transfer import DataCache, _cell, mark_diverged, summarise

log = logging.getLogger(__name__)

__all__ = ["robustness"]


def _learns(rule: str) -> bool:  # learned feedback weights, which update noise can perturb
    return na.get_rule(rule).learns


def robustness(base: Config, rules: Sequence[str], noise: Sequence[float], out: str | Path,
               seeds: Sequence[int] | None = None, units: str = "gradient") -> dict:
    """Train each rule at each update-noise σ (and seed); write tables and the plot.
    ``units``: what σ is measured in (:attr:`neuralign.Rule.update_noise_units`).

    Returns:
        ``{"runs": [...], "summary": [...], "table": str, "out": Path}``.
    """
    if not rules:
        raise ConfigError("robustness: no rules given")
    if not noise:
        raise ConfigError("robustness: no noise levels given")
    if any(s < 0 for s in noise):
        raise ConfigError(f"robustness: σ is a standard deviation >= 0, got {list(noise)}")
    if units not in UPDATE_NOISE_UNITS:
        raise ConfigError(f"robustness: unknown noise units {units!r}; valid: "
                          f"{', '.join(UPDATE_NOISE_UNITS)}")
    configs = {r: rule_variant(base, r) for r in rules}  # unknown rules fail here, early
    check_model_name(base.model.name)  # and an unknown model
    noise = sorted(set(float(s) for s in noise))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml({"base": config_to_dict(base), "rules": list(rules), "noise": noise,
                "units": units, "seeds": list(seeds) if seeds else None},
               out / "robustness.yaml")
    data = DataCache()
    runs = []
    plan = [(r, s, seed) for r in rules for s in (noise if _learns(r) else [0.0])
            for seed in (seeds or [base.train.seed])]
    for i, (rule, sigma, seed) in enumerate(plan):
        cfg = rule_variant(configs[rule], rule)
        cfg.train.seed = seed
        if _learns(rule):
            cfg.rule.update_noise = sigma
            cfg.rule.update_noise_units = units
        log.info("robustness: %s at σ=%g (%s units), seed %d  [%d/%d]", rule, sigma, units,
                 seed, i + 1, len(plan))
        tag = "" if units == "gradient" else f"-{units}"
        r = run_once(cfg, out, f"{rule}-noise{sigma:g}{tag}-s{seed}", data=data.get(cfg))
        runs.append({"rule": rule, "sigma": sigma, "seed": seed, **r})
        write_csv(runs, out / "robustness.csv")
    summary = summarise(runs, ("rule", "sigma"))
    write_csv(summary, out / "robustness_summary.csv")
    index = {(r["rule"], r["sigma"]): r for r in summary}
    header = ["rule"] + [f"σ={s:g}" for s in noise]
    rows = []
    for rule in rules:
        if _learns(rule):
            rows.append([rule] + [_cell(index.get((rule, s))) for s in noise])
        else:
            rows.append([f"{rule} (no learned F)"] + [_cell(index.get((rule, 0.0)))]
                        + ["″"] * (len(noise) - 1))
    table = format_markdown(header, rows)
    plot_robustness(summary, rules, noise, out / "robustness.png")
    return {"runs": runs, "summary": summary, "table": table, "out": out}


def plot_robustness(summary: list[dict], rules: Sequence[str], noise: Sequence[float],
                    path: Path) -> Path:
    p = plt()
    fig, ax = p.subplots(figsize=(7, 4.5))
    nonzero = [s for s in noise if s > 0]
    for i, rule in enumerate(rules):
        rows = sorted((r for r in summary if r["rule"] == rule), key=lambda r: r["sigma"])
        if not rows:
            continue
        if not _learns(rule):
            ax.axhline(rows[0]["test_top1"], color="k" if rule == "bp" else f"C{i}",
                       linestyle="--", label=f"{rule} (no learned F)")
            continue
        ax.errorbar([r["sigma"] for r in rows], [r["test_top1"] for r in rows],
                    yerr=[r["test_top1_std"] for r in rows], marker="o", capsize=3,
                    color=f"C{i}", label=rule)
        mark_diverged(ax, [r["sigma"] for r in rows if not math.isfinite(r["test_top1"])],
                      f"C{i}")
    if nonzero:
        ax.set_xscale("symlog", linthresh=min(nonzero))
        ax.set_xlim(left=-0.3 * min(nonzero), right=max(noise) * 2)
    ax.set(xlabel="update-noise σ (F ← F + lr_F·N(0, σ²) after each step)",
           ylabel="final test top-1 (%)",
           title="robustness to noisy feedback updates (x: all seeds diverged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    savefig_atomic(fig, path)
    p.close(fig)
    return path
