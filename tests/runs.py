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
#: which must leave F identical on every rank and equal to the single process's. A label
#: ``RULE+VARIANT`` runs RULE with its own extras: ``aa+joint``, F in W's SGD (DDP averages
#: F's gradient as W's).
EXTRA = {"sa": ["rule.update_noise=0.5", "rule.normalize=true"],
         "aa+joint": ["feedback_optim.name=joint", "optim.name=sgd", "optim.lr=0.05",
                      "optim.nesterov=true"]}


def rule_args(label: str) -> list[str]:
    """The overrides of a distributed test's rule label (``RULE`` or ``RULE+VARIANT``)."""
    return [f"rule.name={label.split('+')[0]}", *EXTRA.get(label, [])]


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


#: The gradient-accumulation runs' rules (no mirror noise: each rank draws its own)
ACCUMULATE = {"aa": "aa", "kp": "kp", "sa": "sa",
              "null": na.Rule(terms={"amp": 1.0, "null": 0.5, "decay": 1.0}, rate=0.3),
              "null-paper": na.Rule(terms={"amp": 1.0, "null": 0.5, "decay": 1.0}, rate=0.3,
                                    convention="paper")}


def accumulate(rule: str, rank: int = 0, world: int = 1, parts: int = 1) -> dict:
    """Three steps of a small float64 MLP under the recipe (W by SGD), on global batches of
    16: this process's share (``rank`` of ``world``), from the second step on split into
    ``parts`` micro-batches with ``loss / parts`` (under DistributedDataParallel, no_sync
    for all but the last). Returns the model's state dict."""
    import contextlib

    torch.manual_seed(0)
    model = na.convert(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double(),
                       ACCUMULATE[rule])
    opt_f = na.feedback_optimizer(model)  # (before DDP: sa's and kp's F need no gradient)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt_w = torch.optim.SGD(na.param_groups(model)["forward"], lr=0.1)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(16, 6, generator=g, dtype=torch.float64).chunk(world)[rank]
        y = torch.randint(0, 3, (16,), generator=g).chunk(world)[rank]
        k = 1 if step == 0 else parts
        opt_w.zero_grad()
        opt_f.zero_grad()
        for i, (xs, ys) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
            sync = world == 1 or i == k - 1
            with contextlib.nullcontext() if sync else net.no_sync():  # type: ignore[operator]
                (nn.functional.cross_entropy(net(xs), ys) / k).backward()
        opt_w.step()
        opt_f.step()
    return model.state_dict()


def kill_mid_trial(load_trials, out: Path, pid_of=None, timeout: float = 120.0):
    """SIGKILL a search worker in the middle of a trial; returns that trial (as read just
    before the kill). ``load_trials()`` reads the study's trials afresh; a trial qualifies once
    it runs with its values and its first epoch is in ``out/trials/trial-NNNN/metrics.csv``;
    its worker is the trial's ``pid`` user attribute unless ``pid_of(trial)`` says otherwise.

    The worker is frozen (SIGSTOP) before its trial is read once more: a trial that finished
    between the two reads lets its worker go on (SIGCONT), and the next is tried. So the
    killed trial was running when it died, however loaded the machine (a trial of a few
    milliseconds an epoch can otherwise end between a look and a kill)."""
    import os
    import signal
    import time

    import optuna

    running = optuna.trial.TrialState.RUNNING
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        for t in load_trials():
            metrics = out / "trials" / f"trial-{t.number:04d}" / "metrics.csv"
            if t.state != running or not t.params or not metrics.is_file():
                continue
            pid = pid_of(t) if pid_of is not None else int(t.user_attrs["pid"])
            os.kill(pid, signal.SIGSTOP)
            try:
                now = next(u for u in load_trials() if u.number == t.number)
            except Exception:  # (frozen while it held SQLite's write lock: let it go on)
                os.kill(pid, signal.SIGCONT)
                continue
            if now.state == running:
                os.kill(pid, signal.SIGKILL)
                return now
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("no running trial to interrupt")
