"""configs/paper/: the paper's ImageNet protocol, one file per rule and model. Each file runs
through the command line, as users run it, for a couple of steps on a tiny generated ImageFolder
tree, so that none can rot."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import neuralign as na
from neuralign.cli import main
from neuralign.train import load_config

PAPER = sorted((Path(__file__).parent.parent / "configs" / "paper").glob("*.yaml"))
RULES = ("sa", "aa", "wm", "ia", "kp", "fa", "bp")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """An ImageFolder tree as the ImageNet loader expects: train/ and val/, two class folders,
    random 64x64 RGB JPEGs (4 a class for training, 1 for validation)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 4), ("val", 1)):
        for cls in ("n01440764", "n01443537"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{cls}_{i}.JPEG")
    return root


def test_every_rule_and_model_has_its_file():
    assert [p.stem for p in PAPER] == sorted(f"imagenet_resnet{d}_{r}" for d in (18, 50)
                                             for r in RULES)


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_the_file_is_the_protocol(path):
    cfg = load_config(path)
    depth, rule = path.stem.split("_")[1:]
    assert (cfg.data.name, cfg.model.name, cfg.rule.name) == ("imagenet", depth, rule)
    o, s = cfg.optim, cfg.optim.schedule
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.1, 0.9, True, 1e-4)
    assert (s.name, s.warmup_epochs, s.milestones, s.gamma) == ("step", 5, [30, 60, 80], 0.1)
    assert (cfg.data.batch_size, cfg.data.augment, cfg.train.epochs) == (256, True, 90)
    assert (cfg.rule.convention, cfg.feedback_optim.name) == ("paper", "joint")
    assert cfg.feedback_optim.weight_decay == 0.0
    assert f"-c configs/paper/{path.name} --data-dir IMAGENET" in path.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_the_file_runs(path, imagenet, tmp_path, one_thread):
    """One epoch of two steps of batch 4 at the protocol's 224 px: only the budget is
    overridden (epochs, batch sizes, workers, device, what is written)."""
    run = tmp_path / "runs" / "r"
    budget = ["--data-dir", str(imagenet), "--name", "r", "--no-progress",
              f"train.runs_dir={tmp_path / 'runs'}", "train.epochs=1", "train.device=cpu",
              "data.batch_size=4", "data.eval_batch_size=4", "data.workers=0",
              "train.tensorboard=false", "train.plots=false"]
    assert main(["train", "-c", str(path), *budget]) == 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["step"] for r in rows] == ["2"]
    assert math.isfinite(float(rows[0]["train_loss"]))
    state = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert state["config"]["rule"]["convention"] == "paper" and state["feedback_optimizer"] is None
    learns = na.get_rule(path.stem.split("_")[-1]).learns
    # F (where it learns) is the forward optimizer's second group, at its rate
    assert len(state["optimizer"]["param_groups"]) == (2 if learns else 1)
    if learns:
        assert float(rows[0]["feedback_lr"]) == float(rows[0]["lr"]) > 0
