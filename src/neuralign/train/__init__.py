"""Training engine: config dataclasses, a trainer with callbacks, checkpoints, plots, compare.

Examples:
    >>> from neuralign.train import load_config, train
    >>> history = train(load_config("configs/default.yaml", ["train.epochs=5"]))
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import (
    Config,
    ConfigError,
    OptimConfig,
    RuleConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    load_config,
)
from .trainer import Callback, DivergenceError, Trainer, build_rule, train

__all__ = [
    "Config", "ConfigError", "OptimConfig", "RuleConfig", "ScheduleConfig", "TrainConfig",
    "apply_overrides", "load_config", "Callback", "DivergenceError", "Trainer", "build_rule",
    "train", "load_checkpoint", "save_checkpoint",
]
