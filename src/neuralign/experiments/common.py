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
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from ..io import markdown_table as format_markdown
from ..io import mean_std, read_csv, split_list, summarize, write_csv, write_text, write_yaml
from ..io import pyplot as plt
from ..io import save_figure as savefig_atomic
from ..train import distributed
from ..train.config import Config, ConfigError, RuleConfig, apply_overrides, config_to_dict
from ..train.trainer import CHECKPOINT, DivergenceError, Trainer

log = logging.getLogger(__name__)

__all__ = ["write_text", "write_yaml", "write_csv", "read_csv", "run_key", "run_once",
           "split_list", "parse_floats", "rule_variant", "format_markdown", "mean_std", "plt",
           "savefig_atomic", "RESULT_FILE"]

#: The file a finished run leaves in its folder.
RESULT_FILE = "result.yaml"

#: Config keys that do not change what a run computes: left out of :func:`run_key`.
VOLATILE_KEYS = (
    ("train", "name"), ("train", "runs_dir"), ("train", "progress"), ("train", "overwrite"),
    ("train", "tensorboard"), ("train", "plots"), ("train", "device"),
    ("train", "checkpoint_every"), ("data", "data_dir"), ("data", "download"),
    ("data", "workers"),
)


def run_key(cfg: Config) -> str:
    """A short hash of what determines a run's result (volatile keys left out)."""
    d = copy.deepcopy(config_to_dict(cfg))
    for section, key in VOLATILE_KEYS:
        d.get(section, {}).pop(key, None)
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def run_once(cfg: Config, root: str | Path, label: str, data=None,
             quiet_trainer: bool = True, callbacks: list | None = None) -> dict[str, Any]:
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
                                   callbacks=callbacks, data=data, quiet=quiet_trainer)
        log.info("%s: continuing from its checkpoint (epoch %d)", name, trainer.epoch)
    else:
        trainer = Trainer(cfg, callbacks=callbacks, data=data, quiet=quiet_trainer)
    status = "ok"
    try:
        history = trainer.fit()
    except DivergenceError as e:
        log.warning("%s: %s", name, e)
        history, status = trainer.history, f"diverged at epoch {e.epoch}"
    result = {"label": label, "key": key, **summarize(history, status,
                                                      time.perf_counter() - t0)}
    if distributed.is_main():
        write_yaml(result, result_path)
    return {**result, "skipped": False}


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


