"""The tiny training run every test builds on (also imported by the distributed worker)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import neuralign as na


def tiny(root: Path, *extra: str) -> list[str]:
    """Overrides for a run of a second or two: 240 MNIST-1D training examples in batches of 40
    (6 steps an epoch), 2 epochs, run folders under ``root/runs``, no progress bars,
    TensorBoard or plots; ``extra`` overrides come last and win."""
    return ["data.num_samples=300", "data.batch_size=40", "train.epochs=2",
            f"train.runs_dir={Path(root) / 'runs'}", "train.progress=false",
            "train.tensorboard=false", "train.plots=false", "train.angle_every=3", *extra]


#: The distributed tests: 160 training examples, 4 global batches of 40 an epoch.
DIST = ["data.num_samples=200"]

#: Per-rule extras of the distributed tests: sa also runs with update noise and normalisation,
#: which must leave F identical on every rank and equal to the single process's.
EXTRA = {"sa": ["rule.update_noise=0.5", "rule.normalize=true"]}


def train_with_recipe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                      lr: float) -> torch.Tensor:
    """``steps`` full-batch steps of Adam on the forward weights and the rules' recipe on F
    (the README's plain loop); returns the last loss."""
    opt_w = torch.optim.Adam(na.param_groups(model)["forward"], lr=lr)
    opt_f = na.feedback_optimizer(model)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt_w.zero_grad()
        opt_f.zero_grad()
        loss.backward()
        opt_w.step()
        opt_f.step()
    return loss
