"""Optimizers and learning-rate schedules built from :class:`OptimConfig`.

A schedule is torch's ``LambdaLR`` over a pure function of the optimizer step (so its whole
state is one integer): the factor at step ``s`` is computed from the fractional epoch
``s / steps_per_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .config import OptimConfig, ScheduleConfig

__all__ = ["build_optimizer", "build_feedback_optimizer", "build_joint_optimizer",
           "build_schedule", "schedule_factor", "load_schedule_state", "OPTIMIZERS",
           "FEEDBACK_OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("sgd", "adam", "adamw")
#: The feedback weights' choices: the rules' own recipe, a torch optimizer of their own, or
#: ``joint``: the forward optimizer itself, with F as its second parameter group.
FEEDBACK_OPTIMIZERS = ("recipe", *OPTIMIZERS, "joint")
SCHEDULES = ("constant", "step", "cosine")


def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], cfg: OptimConfig,
                    which: str = "optim") -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over ``params``, Parameters or torch parameter groups
    (``which`` names the section in errors)."""
    params = list(params)
    name = cfg.name.lower()
    _check_finite(cfg, which)
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


def _check_finite(cfg: OptimConfig, which: str) -> None:
    """A ValueError naming the key for a hyperparameter that torch cannot hold: not finite
    (``1e400`` reads as infinity), or beyond float32's range (torch's step fails with "value
    cannot be converted to type float without overflow")."""
    biggest = torch.finfo(torch.float32).max
    values = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
              "eps": cfg.eps, **{f"betas[{i}]": b for i, b in enumerate(cfg.betas)}}
    for key, value in values.items():
        if not math.isfinite(value) or abs(value) > biggest:
            raise ValueError(f"{which}.{key}={value!r} is not a number torch can hold "
                             f"(float32: finite, at most {biggest:.3g} in size)")


def build_feedback_optimizer(model: torch.nn.Module, cfg, generator: torch.Generator | None = None
                             ) -> torch.optim.Optimizer | None:
    """The optimizer of ``model``'s learned feedback weights from a ``FeedbackOptimConfig``:
    the rules' recipe (``neuralign.feedback_optimizer``) or a torch optimizer; None when the
    model has no learned feedback weight, and for ``joint``, whose F is a group of the forward
    optimizer (:func:`build_joint_optimizer`)."""
    import neuralign as na

    feedback = na.param_groups(model)["feedback"]
    name = cfg.name.lower()
    if not feedback or name == "joint":
        return None
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


def build_joint_optimizer(model: torch.nn.Module, cfg: OptimConfig, weight_decay: float = 0.0
                          ) -> torch.optim.Optimizer:
    """The forward optimizer ``cfg`` over ``model``'s forward parameters and, as a second
    parameter group, its learned feedback weights with their own ``weight_decay`` (0: decay
    on the forward weights only). F then moves in W's step with W's learning rate, momentum
    and schedule, on the rule's full gradient that the backward leaves in ``F.grad``: the
    authors' dynamics (Kunin et al. 2020). No recipe is built."""
    import neuralign as na

    groups = na.param_groups(model)
    params: list[dict] = [{"params": groups["forward"]}]
    if groups["feedback"]:
        params.append({"params": groups["feedback"], "weight_decay": weight_decay})
    return build_optimizer(params, cfg, "optim")


def schedule_factor(cfg: ScheduleConfig, steps_per_epoch: int, epochs: int,
                    which: str = "optim.schedule"):
    """The rate factor as a function of the optimizer step (0-based): linear warm-up over
    ``warmup_epochs``, then constant, ×``gamma`` at each milestone epoch, or cosine to
    ``min_factor`` at the last epoch. Fractional epochs are ``step / steps_per_epoch``."""
    if cfg.name not in SCHEDULES:
        raise ValueError(f"unknown schedule {which}.name={cfg.name!r}; valid: "
                         f"{', '.join(SCHEDULES)}")
    if cfg.warmup_epochs < 0:
        raise ValueError(f"{which}.warmup_epochs must be >= 0")
    steps_per_epoch = max(1, steps_per_epoch)
    warm_steps = cfg.warmup_epochs * steps_per_epoch
    name, gamma, milestones = cfg.name, cfg.gamma, tuple(cfg.milestones)
    warmup, min_factor = cfg.warmup_epochs, cfg.min_factor
    span = max(epochs - warmup, 1e-12)

    def factor(step: int) -> float:
        epoch = step / steps_per_epoch
        if step < warm_steps:
            return (step + 1) / warm_steps
        if name == "constant":
            return 1.0
        if name == "step":
            return gamma ** sum(1 for m in milestones if epoch >= m)
        t = min(max((epoch - warmup) / span, 0.0), 1.0)  # cosine, from the end of warm-up
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def build_schedule(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int,
                   epochs: int, which: str = "optim.schedule"
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """``torch.optim.lr_scheduler.LambdaLR`` stepping :func:`schedule_factor` once per
    optimizer step (its state is the step count: the factor is a function, not saved)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, schedule_factor(cfg, steps_per_epoch, epochs, which))


def load_schedule_state(schedule: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Restore a schedule's position, the optimizer step it reached, also from checkpoints of
    the former hand-written one (``{"step_count", ...}``).

    The base rates and the factor function stay the schedule's own (those of the config it
    was built from): a schedule or rate changed on resuming takes effect at once, as the new
    schedule evaluated at the step reached."""
    base = list(schedule.base_lrs)
    if "step_count" in state:  # before LambdaLR
        state = {**schedule.state_dict(), "last_epoch": int(state["step_count"]),
                 "_step_count": int(state["step_count"]) + 1}
    schedule.load_state_dict(state)
    schedule.base_lrs = base
    # LambdaLR's load does not write the rates back into the optimizer's groups
    step = schedule.last_epoch
    for group, lr, factor in zip(schedule.optimizer.param_groups, base, schedule.lr_lambdas,
                                 strict=True):
        group["lr"] = lr * factor(step)
    schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]
