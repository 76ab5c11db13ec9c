"""Metaparameter transfer: the same metaparameters, kept fixed, on networks of growing depth.

Each *entry* is a config with its rule and metaparameters (e.g. a search's ``best.yaml``); each
*model* is a model name with optional overrides. Every (entry, model, seed) run trains once, in
``OUT/runs/`` (skipped when it finished before, see :func:`.common.run_once`); the table reports
the final-epoch test top-1 (and validation top-1 when the config holds a validation split),
``transfer.csv`` holds every run, ``transfer_summary.csv`` the means, ``transfer.png`` top-1
against depth, one line per entry.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..data import build_data
from ..io import whole_number_ticks
from ..models import build_model
from ..train.config import Config, ConfigError, apply_overrides, config_to_dict
from .common import (
    format_markdown,
    mean_std,
    plt,
    run_once,
    savefig_atomic,
    split_list,
    write_csv,
    write_yaml,
)

log = logging.getLogger(__name__)

__all__ = ["ModelSpec", "parse_models", "transfer", "model_depth", "DataCache"]

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ModelSpec:
    """A model of a transfer: a label, a registered name, and config overrides."""

    label: str
    name: str
    overrides: tuple[str, ...] = field(default_factory=tuple)

    def all_overrides(self) -> list[str]:
        """The config overrides that select this model: its name, then its own overrides."""
        return [f"model.name={self.name}", *self.overrides]


def parse_models(text: str) -> list[ModelSpec]:
    """``resnet20,resnet32`` or ``mlp:widths=[100,100],deep=mlp:widths=[100,100,100,100]``.

    Each item is ``[LABEL=]NAME[:KEY=VALUE[:KEY=VALUE…]]``; keys without a dot are ``model.``
    keys. Unlabelled items with overrides are labelled ``NAME-<depth>`` later."""
    specs = []
    for item in split_list(text):
        parts = _split_colon(item)
        head, over = parts[0], parts[1:]
        label, sep, name = head.partition("=")
        if not sep:
            label, name = "", head
        name = name.strip()
        if not name:
            raise ConfigError(f"--models: {item!r} names no model")
        overrides = []
        for o in over:
            k, sep, v = o.partition("=")
            if not sep or not k.strip():
                raise ConfigError(f"--models: {o!r} in {item!r} is not KEY=VALUE "
                                  f"(e.g. mlp:widths=[100,100])")
            k = k.strip()
            overrides.append(f"{k if '.' in k else 'model.' + k}={v}")
        specs.append(ModelSpec(label.strip(), name, tuple(overrides)))
    if not specs:
        raise ConfigError("--models: no models given")
    return specs


def _split_colon(text: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in text:
        depth += ch in "[{(" or 0
        depth -= ch in "]})" or 0
        if ch == ":" and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def model_depth(model: nn.Module) -> int:
    """Number of weight layers (Linear and ConvNd) on the model."""
    return sum(isinstance(m, _WEIGHT_LAYERS) for m in model.modules())


class DataCache:
    """Build each distinct data config once (runs of a sweep share loaders)."""

    def __init__(self):
        self._cache: dict[str, object] = {}

    def get(self, cfg: Config):
        """The data of ``cfg.data``, built once per distinct data section."""
        key = repr(sorted(config_to_dict(cfg)["data"].items()))
        if key not in self._cache:
            self._cache[key] = build_data(cfg.data)
        return self._cache[key]


def _label_models(models: Sequence[ModelSpec], base: Config, data: DataCache
                  ) -> list[tuple[ModelSpec, int]]:
    out, seen = [], set()
    for m in models:
        cfg = apply_overrides(base, m.all_overrides())  # unknown keys fail here, early
        info = data.get(cfg).info
        depth = model_depth(build_model(cfg.model, info.input_shape, info.num_classes))
        label = m.label or (m.name if not m.overrides else f"{m.name}-{depth}")
        if label in seen:
            raise ConfigError(f"--models: two models are labelled {label!r}; name them "
                              f"LABEL=NAME:…")
        seen.add(label)
        out.append((ModelSpec(label, m.name, m.overrides), depth))
    return out


def transfer(entries: Sequence[tuple[str, Config]], models: Sequence[ModelSpec],
             out: str | Path, seeds: Sequence[int] | None = None) -> dict:
    """Train every entry on every model (and seed); write tables and the plot.

    Args:
        entries: ``(label, config)`` pairs, e.g. ``("wm", best_wm)``, ``("bp", base)``.
        models: the models, shallow to deep (see :func:`parse_models`).
        out: the output folder.
        seeds: training seeds (default: each config's own ``train.seed``).

    Returns:
        ``{"runs": [...], "summary": [...], "table": str, "out": Path}``.
    """
    labels = [lab for lab, _ in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"transfer: entry labels repeat: {labels}")
    if not entries:
        raise ConfigError("transfer: no configs or rules given")
    out = Path(out)
    data = DataCache()
    labelled = _label_models(models, entries[0][1], data)  # a bad model fails here, before
    out.mkdir(parents=True, exist_ok=True)                   # any folder is made
    write_yaml({"entries": {lab: config_to_dict(c) for lab, c in entries},
                "models": [{"label": m.label, "name": m.name, "overrides": list(m.overrides),
                            "depth": d} for m, d in labelled],
                "seeds": list(seeds) if seeds else None}, out / "transfer.yaml")
    runs = []
    total = len(labelled) * len(entries) * max(1, len(seeds or []))
    for m, depth in labelled:
        for lab, cfg in entries:
            for seed in (seeds or [cfg.train.seed]):
                run_cfg = apply_overrides(copy.deepcopy(cfg),
                                          [*m.all_overrides(), f"train.seed={seed}"])
                log.info("transfer: %s on %s (depth %d), seed %d  [%d/%d]", lab, m.label,
                         depth, seed, len(runs) + 1, total)
                r = run_once(run_cfg, out, f"{lab}-{m.label}-s{seed}", data=data.get(run_cfg))
                runs.append({"rule": lab, "model": m.label, "depth": depth, "seed": seed, **r})
                write_csv(runs, out / "transfer.csv")
    summary = summarise(runs, ("rule", "model", "depth"))
    write_csv(summary, out / "transfer_summary.csv")
    table = pivot_table(summary, labels, [m.label for m, _ in labelled],
                        {m.label: d for m, d in labelled})
    plot_transfer(summary, labels, out / "transfer.png")
    return {"runs": runs, "summary": summary, "table": table, "out": out}


def summarise(runs: list[dict], keys: Sequence[str]) -> list[dict]:
    """Mean and standard deviation over seeds of each group of runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for g, rs in groups.items():
        # a diverged run's numbers are those of its last good epoch: not a result, left out
        ok = [r for r in rs if r["status"] == "ok"]
        m, s = mean_std([r["test_top1"] for r in ok])
        vm, _ = mean_std([r["val_top1"] for r in ok])
        wa, _ = mean_std([r["weight_angle"] for r in ok])
        bad = [r["status"] for r in rs if r["status"] != "ok"]
        out.append({**dict(zip(keys, g, strict=True)), "test_top1": m, "test_top1_std": s,
                    "val_top1": vm, "weight_angle": wa, "seeds": len(rs),
                    "diverged": len(bad), "status": "; ".join(bad) if bad else "ok"})
    return out


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    m, s, n, bad = row["test_top1"], row["test_top1_std"], row["seeds"], row["diverged"]
    if not math.isfinite(m):
        return "diverged" + (f" ({bad}/{n})" if n > 1 else "")
    txt = f"{m:.1f}" + (f" ± {s:.1f}" if n - bad > 1 else "")
    if bad:
        txt += f" ({bad}/{n} diverged)"
    return txt


def pivot_table(summary: list[dict], rules: Sequence[str], models: Sequence[str],
                depths: dict[str, int]) -> str:
    """Markdown: one row per rule, one column per model, final test top-1 (%)."""
    index = {(r["rule"], r["model"]): r for r in summary}
    header = ["rule"] + [f"{m} ({depths[m]} layers)" for m in models]
    rows = [[rule] + [_cell(index.get((rule, m))) for m in models] for rule in rules]
    return format_markdown(header, rows)


def mark_diverged(ax, xs: list[float], color: str) -> None:
    """Crosses at the bottom of the axes where every seed of a point diverged."""
    if xs:
        ax.plot(xs, [0.02] * len(xs), "x", color=color, markersize=9, mew=2,
                transform=ax.get_xaxis_transform(), clip_on=False)


def plot_transfer(summary: list[dict], rules: Sequence[str], path: Path) -> Path:
    p = plt()
    fig, ax = p.subplots(figsize=(7, 4.5))
    for i, rule in enumerate(rules):
        rows = sorted((r for r in summary if r["rule"] == rule), key=lambda r: r["depth"])
        if not rows:
            continue
        style = dict(color="k", linestyle="--") if rule == "bp" else dict(color=f"C{i}")
        ax.errorbar([r["depth"] for r in rows], [r["test_top1"] for r in rows],
                    yerr=[r["test_top1_std"] for r in rows], marker="o", capsize=3,
                    label=rule, **style)
        mark_diverged(ax, [r["depth"] for r in rows if not math.isfinite(r["test_top1"])],
                      style["color"])
    ax.set(xlabel="depth (weight layers)", ylabel="final test top-1 (%)",
           title="fixed metaparameters across depth (x: all seeds diverged)")
    ax.grid(alpha=0.3)
    whole_number_ticks(ax)
    ax.legend(fontsize="small")
    fig.tight_layout()
    savefig_atomic(fig, path)
    p.close(fig)
    return path
