"""The small run shared by the distributed tests and their worker processes."""

from __future__ import annotations

from pathlib import Path


def tiny(root: Path, *extra: str) -> list[str]:
    """160 MNIST-1D training examples in global batches of 40 (4 steps an epoch), 2 epochs."""
    return ["data.num_samples=200", "data.batch_size=40", "train.epochs=2",
            f"train.runs_dir={Path(root) / 'runs'}", "train.progress=false",
            "train.tensorboard=false", "train.plots=false", "train.angle_every=3", *extra]


#: Per-rule extras: sa also runs with update noise and normalisation, which must leave F
#: identical on every rank and equal to the single process's (one generator, same seed).
EXTRA = {"sa": ["rule.update_noise=0.5", "rule.normalize=true"]}
