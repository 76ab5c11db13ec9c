"""Optimizers and learning-rate schedules built from :class:`OptimConfig`.

A schedule is a pure function of the step (so its whole state is one integer): the factor at
step ``s`` is computed from the fractional epoch ``s / steps_per_epoch`` and written into every
parameter group's ``lr`` before the optimizer's step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .config import OptimConfig, ScheduleConfig

__all__ = ["build_optimizer", "build_feedback_optimizer", "Schedule", "OPTIMIZERS",
           "FEEDBACK_OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("sgd", "adam", "adamw")
#: The feedback weights' choices: the rules' own recipe, or a torch optimizer.
FEEDBACK_OPTIMIZERS = ("recipe", *OPTIMIZERS)
SCHEDULES = ("constant", "step", "cosine")


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig,
                    which: str = "optim") -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over ``params`` (``which`` names the section in errors)."""
    params = list(params)
    name = cfg.name.lower()
    if name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise ValueError(f"{which}.nesterov needs {which}.momentum > 0")
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        if len(cfg.betas) != 2:
            raise ValueError(f"{which}.betas needs two values, got {cfg.betas}")
        return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                   weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {which}.name={cfg.name!r}; valid: {', '.join(OPTIMIZERS)}")


def build_feedback_optimizer(model: torch.nn.Module, cfg, generator: torch.Generator | None = None
                             ) -> torch.optim.Optimizer | None:
    """The optimizer of ``model``'s learned feedback weights from a ``FeedbackOptimConfig``:
    the rules' recipe (``neuralign.feedback_optimizer``) or a torch optimizer; None when the
    model has no learned feedback weight."""
    import neuralign as na

    feedback = na.param_groups(model)["feedback"]
    if not feedback:
        return None
    name = cfg.name.lower()
    if name == "recipe":
        try:
            return na.feedback_optimizer(model, rate=cfg.rate, generator=generator)
        except ValueError as e:
            raise ValueError(f"feedback_optim.rate: {e}") from None
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer feedback_optim.name={cfg.name!r}; valid: "
                         f"{', '.join(FEEDBACK_OPTIMIZERS)}")
    if cfg.rate is not None:
        raise ValueError(f"feedback_optim.rate is the recipe's; with feedback_optim.name={name} "
                         "set feedback_optim.lr instead")
    return build_optimizer(feedback, cfg, "feedback_optim")


class Schedule:
    """Sets ``lr = base_lr * factor(step)`` in an optimizer's groups.

    Args:
        optimizer: the optimizer whose groups it drives (their ``lr`` at construction is the
            base rate).
        cfg: the schedule.
        steps_per_epoch: optimizer steps per epoch.
        epochs: total epochs of the run (``cosine`` ends there).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig,
                 steps_per_epoch: int, epochs: int, which: str = "optim.schedule"):
        if cfg.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {which}.name={cfg.name!r}; valid: "
                             f"{', '.join(SCHEDULES)}")
        if cfg.warmup_epochs < 0:
            raise ValueError(f"{which}.warmup_epochs must be >= 0")
        self.optimizer = optimizer
        self.cfg = cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.epochs = epochs
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        """The rate factor at optimizer step ``step`` (0-based)."""
        c = self.cfg
        epoch = step / self.steps_per_epoch
        warm_steps = c.warmup_epochs * self.steps_per_epoch
        if step < warm_steps:
            return (step + 1) / warm_steps
        if c.name == "constant":
            return 1.0
        if c.name == "step":
            return c.gamma ** sum(1 for m in c.milestones if epoch >= m)
        # cosine from the end of warm-up to the end of the run
        span = max(self.epochs - c.warmup_epochs, 1e-12)
        t = min(max((epoch - c.warmup_epochs) / span, 0.0), 1.0)
        return c.min_factor + (1 - c.min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * f

    def step(self) -> None:
        """Advance one optimizer step (call after ``optimizer.step()``)."""
        self.step_count += 1
        self._apply()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer.param_groups else 0.0

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.base_lrs = [float(b) for b in state["base_lrs"]]
        self._apply()
