"""What the experiment commands share: atomic results files, run keys, run-once-and-skip.

Every run of a sweep (transfer, robustness) lives in ``OUT/runs/<label>-<key>/``, where ``key``
is a hash of the resolved config with the keys that do not change the result left out (run
name, folders, progress bars, device …). A run that finished (or diverged) leaves
``result.yaml`` there, written atomically; a restarted sweep reads it instead of training again.
A run that was interrupted continues from its last checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from ..train import distributed
from ..train.callbacks import read_csv, write_csv
from ..train.config import Config, ConfigError, RuleConfig, apply_overrides, config_to_dict
from ..train.trainer import CHECKPOINT, DivergenceError, Trainer

log = logging.getLogger(__name__)

__all__ = ["atomic_write_text", "write_yaml", "write_csv", "read_csv", "run_key", "run_once",
           "split_list", "parse_floats", "rule_variant", "format_markdown", "RESULT_FILE"]

#: The file a finished run leaves in its folder.
RESULT_FILE = "result.yaml"

#: Config keys that do not change what a run computes: left out of :func:`run_key`.
VOLATILE_KEYS = (
    ("train", "name"), ("train", "runs_dir"), ("train", "progress"), ("train", "overwrite"),
    ("train", "tensorboard"), ("train", "plots"), ("train", "device"),
    ("train", "checkpoint_every"), ("data", "data_dir"), ("data", "download"),
    ("data", "workers"),
)


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and
    ``os.replace``: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_yaml(data: Any, path: str | Path) -> Path:
    """Plain data as YAML, atomically."""
    return atomic_write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None),
                             path)


def run_key(cfg: Config) -> str:
    """A short hash of what determines a run's result (volatile keys left out)."""
    d = copy.deepcopy(config_to_dict(cfg))
    for section, key in VOLATILE_KEYS:
        d.get(section, {}).pop(key, None)
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _summary(history: list[dict], status: str, wall: float) -> dict[str, Any]:
    nan = math.nan
    last = history[-1] if history else {}

    def get(k):
        v = last.get(k, nan)
        return float(v) if isinstance(v, (int, float)) else nan

    vals = [h["val_top1"] for h in history if "val_top1" in h]
    return {
        "status": status,
        "epochs": len(history),
        "test_top1": get("test_top1"),
        "val_top1": get("val_top1"),
        "best_val_top1": max(vals) if vals else nan,
        "train_loss": get("train_loss"),
        "weight_angle": get("weight_angle"),
        "wall_s": wall,
    }


def run_once(cfg: Config, root: str | Path, label: str, data=None,
             quiet_trainer: bool = True) -> dict[str, Any]:
    """Train ``cfg`` in ``root/runs/<label>-<key>/`` unless that run already finished.

    Returns the run's result (``status`` ``ok`` or ``diverged``, final test and validation
    top-1, …) with ``skipped=True`` when it was read from an earlier ``result.yaml``. A run
    interrupted after a checkpoint continues from it. Errors other than divergence propagate
    and leave no result, so a restart tries the run again.
    """
    key = run_key(cfg)
    name = f"{label}-{key}"
    run_dir = Path(root) / "runs" / name
    result_path = run_dir / RESULT_FILE

    def earlier() -> tuple[dict | None, bool]:
        result = None
        if result_path.is_file():
            with open(result_path) as f:
                result = yaml.safe_load(f)
        return result, (run_dir / CHECKPOINT).is_file()

    # under torchrun rank 0 decides (skip, continue or start) for every rank
    result, has_checkpoint = distributed.on_main(earlier)
    if result and result.get("key") == key:
        log.info("%s: finished earlier (%s), skipped", name, result.get("status"))
        return {**result, "skipped": True}
    cfg = copy.deepcopy(cfg)
    tc = cfg.train
    tc.name, tc.runs_dir, tc.overwrite = name, str(Path(root) / "runs"), True
    if quiet_trainer:
        tc.progress = False
    t0 = time.perf_counter()
    if has_checkpoint:
        trainer = Trainer.from_run(run_dir, [f"train.progress={str(tc.progress).lower()}"],
                                   data=data, quiet=quiet_trainer)
        log.info("%s: continuing from its checkpoint (epoch %d)", name, trainer.epoch)
    else:
        trainer = Trainer(cfg, data=data, quiet=quiet_trainer)
    status = "ok"
    try:
        history = trainer.fit()
    except DivergenceError as e:
        log.warning("%s: %s", name, e)
        history, status = trainer.history, f"diverged at epoch {e.epoch}"
    result = {"label": label, "key": key, **_summary(history, status,
                                                      time.perf_counter() - t0)}
    if distributed.is_main():
        write_yaml(result, result_path)
    return {**result, "skipped": False}


def split_list(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a,b:x=[1,2],c"`` -> ``['a', 'b:x=[1,2]', 'c']``."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [s for s in out if s]


def parse_floats(text: str, what: str) -> list[float]:
    """``"0,1e-4,1e-3"`` -> floats; a ConfigError naming ``what`` otherwise."""
    out = []
    for s in split_list(text):
        try:
            v = float(s)
        except ValueError:
            raise ConfigError(f"{what}: {s!r} is not a number (expected e.g. 0,1e-4,1e-3)"
                              ) from None
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"{what}: {s!r} must be a finite number >= 0")
        out.append(v)
    if not out:
        raise ConfigError(f"{what}: no values given")
    return out


def rule_variant(base: Config, rule: str) -> Config:
    """``base`` with rule ``rule``: the base's own rule section (its metaparameters) when it is
    that rule already, else the rule's catalog defaults (per-layer exceptions kept)."""
    import neuralign as na

    valid = na.list_rules()
    if rule not in valid:
        raise ConfigError(f"unknown rule {rule!r}; valid: {', '.join(valid)}")
    cfg = copy.deepcopy(base)
    if cfg.rule.name != rule:
        cfg.rule = RuleConfig(name=rule, layers=dict(base.rule.layers),
                              on_unsupported=base.rule.on_unsupported)
    return cfg


def with_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    return apply_overrides(cfg, list(overrides))


def format_markdown(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats with one decimal, NaN as an en dash."""

    def cell(v):
        if isinstance(v, float):
            return "–" if not math.isfinite(v) else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    s = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return m, s


def plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as pyplot

    return pyplot


def savefig_atomic(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
