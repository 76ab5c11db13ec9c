"""The trainer: a short loop that fires named events; everything else is a callback.

Events, in order: ``on_train_start``, then per epoch ``on_epoch_start``, ``on_step_end`` after
each optimizer step, ``on_epoch_end`` with the epoch's metrics, and finally ``on_train_end``
with the whole history. Metrics, progress, CSV, TensorBoard, checkpoints and plots are callbacks
(see :mod:`neuralign.train.callbacks`); a search adds its own (e.g. Optuna pruning) and calls the
same :func:`train`.

Per step: forward, loss, one ``backward`` (W's task gradient and F's rule gradient together),
the forward optimizer's step, the feedback optimizer's step, then ``neuralign.after_step``
(update noise and normalisation of F). With ``feedback_optim.name: joint`` there is one
optimizer: F is the forward optimizer's second parameter group. Every ``angle_every`` steps
the trainer also measures, on the same batch, each layer's local gradient angle and the angle
between its W gradient under the rule and under exact backprop.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

import neuralign as na

from ..data import DataBundle
from ..io import lock_folder, write_text
from . import build, distributed
from .build import build_rule
from .checkpoint import (
    load_checkpoint,
    load_optimizer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    sigterm_deferred,
)
from .config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    save_config,
)
from .events import Callback
from .optim import (
    load_schedule_state,
)

log = logging.getLogger(__name__)

__all__ = ["Callback", "DivergenceError", "Trainer", "train", "build_rule", "resolve_run_dir",
           "CHECKPOINT", "RUN_FILES", "RESUMABLE_KEYS"]

#: Path of the checkpoint inside a run folder.
CHECKPOINT = "checkpoints/last.pt"
#: What a run folder holds.
RUN_FILES = ("config.yaml", "metrics.csv", CHECKPOINT, "tb/", "plots/")
#: Config keys a resume may change: how long, how often, where and how it is shown. Any other
#: change would relabel what the run trained (see :meth:`Trainer.from_run`).
RESUMABLE_KEYS = ("train.epochs", "train.progress", "train.tensorboard", "train.plots",
                  "train.checkpoint_every", "train.angle_every", "train.report", "train.device",
                  "train.runs_dir", "train.name", "train.overwrite", "data.data_dir",
                  "data.download", "data.workers", "data.eval_batch_size")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("terms", "layers", "kwargs"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every key whose value differs."""
    a, b = _flat(config_to_dict(old)), _flat(config_to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


class DivergenceError(RuntimeError):
    """The loss (or a weight) became non-finite; the run stopped, its last checkpoint kept."""

    def __init__(self, epoch: int, step: int, what: str, checkpoint: Path | None,
                 checkpoint_epoch: int | None):
        self.epoch, self.step, self.what = epoch, step, what
        self.checkpoint, self.checkpoint_epoch = checkpoint, checkpoint_epoch
        where = (f"the last good checkpoint, {checkpoint} (end of epoch {checkpoint_epoch}), "
                 f"is intact" if checkpoint is not None
                 else "no checkpoint had been written yet")
        super().__init__(f"training diverged at epoch {epoch}, step {step}: {what}. Stopped; "
                         f"{where}. Try a lower optim.lr, another feedback_optim.rate (or "
                         f"feedback_optim.lr with a torch optimizer on F), or other rule "
                         f"coefficients.")


def resolve_run_dir(run: str | Path, runs_dir: str | Path = "runs") -> Path:
    """A run folder from a path or a name under ``runs_dir``."""
    p = Path(run)
    if (p / "config.yaml").is_file():
        return p
    q = Path(runs_dir) / run
    if (q / "config.yaml").is_file():
        return q
    raise FileNotFoundError(f"no run folder at {str(p)!r} or {str(q)!r} (a run folder holds "
                            f"config.yaml, metrics.csv and {CHECKPOINT})")


@dataclass
class _EpochStats:
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    grad_angles: dict[str, list[float]] = field(default_factory=dict)
    bp_angles: dict[str, list[float]] = field(default_factory=dict)


class Trainer:
    """Builds data, model (converted with the rule), two optimizers and their schedules from a
    :class:`Config`, and trains.

    Args:
        cfg: the resolved configuration (not modified).
        callbacks: extra callbacks, run after the built-in ones.
        run_dir: the run folder (default ``cfg.train.runs_dir / cfg.train.name``).
        default_callbacks: add progress, logging, CSV, TensorBoard, checkpoint and plot
            callbacks as the config asks.
        data: prebuilt data (e.g. shared by the runs of a comparison).
        quiet: one of many runs (a sweep's): its setup and per-epoch lines are logged at
            DEBUG instead of INFO, without touching any logger's level.
    """

    def __init__(self, cfg: Config, callbacks: list[Callback] | None = None,
                 run_dir: str | Path | None = None, default_callbacks: bool = True,
                 data: DataBundle | None = None, quiet: bool = False):
        self.quiet = quiet
        self._info = log.debug if quiet else log.info
        cfg = self.cfg = copy.deepcopy(cfg)  # the caller's config is left as it is
        tc = cfg.train
        # construction is the builder's (neuralign.train.build): each step a function
        self.rank, self.world_size, self.device, self.run_dir = build.setup_process(cfg, run_dir)
        self.is_main = self.rank == 0
        self.rule = build.build_rule(cfg.rule)
        self.layer_rules = build.build_layer_rules(cfg.rule, self.rule)
        build.check_rates(cfg)
        torch.manual_seed(tc.seed)
        self.data = build.build_data_for(cfg, self.device, self.rank, self.world_size, data)
        self.model = build.build_network(cfg, self.rule, self.data.info, self.device,
                                         self.layer_rules)
        # update noise: one stream, the same on every rank, so F stays identical everywhere
        self.update_generator = torch.Generator(device=self.device).manual_seed(
            tc.seed + 20_011)
        # (a dfa feedback point's end-to-end angle is its module's: under its name)
        self.layer_names = [n for n, _ in na.feedback_layers(self.model)] + [
            n for n, _ in na.feedback_points(self.model)]
        # (the optimizers before DDP: the recipe decides which F need a gradient at all)
        self.optimizer, self.feedback_optimizer = build.build_optimizers(
            self.model, cfg, self.update_generator)
        self.recipe = isinstance(self.feedback_optimizer, na.FeedbackOptimizer)
        # joint: F is a group of the forward optimizer, which steps it
        self.joint = cfg.feedback_optim.name.lower() == "joint"
        # the module that trains: DDP around the model when distributed (the model itself,
        # with its plain state-dict keys, is what metrics, evaluation and checkpoints use)
        self.model, self.net = build.wrap_distributed(self.model, cfg, self.device, self.rank,
                                                      self.world_size)
        self.net = build.compile_network(self.net, tc.compile)
        self.schedule, self.feedback_schedule = build.build_schedules(
            self.optimizer, self.feedback_optimizer, cfg, len(self.data.train))
        for line in build.describe(cfg, self.model, self.rule, self.feedback_optimizer,
                                   self.device):
            self._info(line)

        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: Path | None = None
        self.last_checkpoint_epoch: int | None = None
        self.should_stop = False  # a callback may set this to end training after the epoch
        self.config_changes: list[dict] = []  # changes made on purpose when resuming
        self._lock: Any = None  # rank 0's lock on the run folder (from_run, then fit)
        self.callbacks: list[Callback] = (
            build.standard_callbacks(tc, self.is_main, quiet) if default_callbacks else [])
        self.callbacks += list(callbacks or [])

    # -- events ----------------------------------------------------------------------------------
    def _fire(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (tensors and plain data only)."""
        return {
            "format": 1,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "feedback_optimizer": (self.feedback_optimizer.state_dict()
                                   if self.feedback_optimizer is not None else None),
            "schedule": self.schedule.state_dict(),
            "feedback_schedule": (self.feedback_schedule.state_dict()
                                  if self.feedback_schedule is not None else None),
            "rng": rng_state(),
            "update_rng": self.update_generator.get_state(),
            **({"rng_ranks": distributed.all_gather_object(rng_state())}
               if self.world_size > 1 else {}),
            "history": list(self.history),
            "config": config_to_dict(self.cfg),
            "config_changes": list(self.config_changes),
            "torchrun_run_id": distributed.run_id(),  # (a restart resumes its own job's only)
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state: model, optimizers, schedules, random generators
        and history, so that training continues exactly.

        The hyperparameters are this trainer's config's: the optimizers keep their learning
        rates, momentum, betas, ..., and the schedules their base rates and shapes (evaluated
        at the step reached), so a config changed on resuming takes effect from there. An
        optimizer of another kind than the checkpoint's (``optim.name``,
        ``feedback_optim.name``) starts with a new state, said in the log.

        Raises:
            ValueError, RuntimeError: the state does not fit this trainer's model or
                optimizers (another model), before any optimizer is changed.
        """
        self.model.load_state_dict(state["model"])
        saved = state.get("config") or {}
        names = {p: n for n, p in self.model.named_parameters()}
        for key, which, optimizer in (
                ("optim", "optimizer", self.optimizer),
                ("feedback_optim", "feedback_optimizer", self.feedback_optimizer)):
            if optimizer is None:
                continue
            now = getattr(self.cfg, key).name
            was = (saved.get(key) or {}).get("name", now)
            if state.get(which) is not None and was.lower() == now.lower():
                load_optimizer_state(optimizer, state[which], which, names)
            else:
                log.warning("%s.name %s -> %s: the %s optimizer starts with a new state from "
                            "step %d (no momentum or moment estimates carried over)", key, was,
                            now, "forward" if key == "optim" else "feedback",
                            int(state["step"]))
        load_schedule_state(self.schedule, state["schedule"])
        if self.feedback_schedule is not None and state.get("feedback_schedule") is not None:
            load_schedule_state(self.feedback_schedule, state["feedback_schedule"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.history = [dict(m) for m in state["history"]]
        self.config_changes = list(state.get("config_changes", []))
        set_rng_state(state["rng"])
        if "update_rng" in state:
            self.update_generator.set_state(state["update_rng"])
        if self.world_size > 1:
            ranks = state.get("rng_ranks")
            if ranks is not None and len(ranks) == self.world_size:
                set_rng_state(ranks[self.rank])
            elif self.rank > 0:  # another world size: fresh, still independent, streams
                log.warning("checkpoint has RNG states for %s process(es), this run has %d: "
                            "ranks > 0 draw fresh noise streams", len(ranks or [0]),
                            self.world_size)
                torch.manual_seed(distributed.rank_seed(self.cfg.train.seed + self.step,
                                                        self.rank))

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/last.pt`` atomically (only when every weight is finite).

        Distributed, every rank must call it (the checkpoint holds every rank's RNG state);
        rank 0 writes."""
        for name, p in self.model.named_parameters():
            if not torch.isfinite(p).all():
                raise DivergenceError(self.epoch, self.step, f"parameter {name} is not finite",
                                      self.last_checkpoint, self.last_checkpoint_epoch)
        state = self.state_dict()
        path = self.run_dir / CHECKPOINT
        # (a SIGTERM waits until the checkpoint is whole and recorded: its note names it)
        with sigterm_deferred():
            if self.is_main:
                path = save_checkpoint(state, path)
                # config.yaml records what the checkpoint holds (a resume's changes included)
                save_config(self.cfg, self.run_dir / "config.yaml")
            self.last_checkpoint, self.last_checkpoint_epoch = path, self.epoch
        return path

    def _checkpoint_note(self) -> str:
        """Where a stopped run stands: its last checkpoint, and how to continue from it."""
        if self.last_checkpoint is None:
            return "no checkpoint had been written yet"
        epoch = self.last_checkpoint_epoch
        try:  # (the file's own: a stop can land between its write and the note of it)
            epoch = torch.load(self.last_checkpoint, weights_only=True, mmap=True)["epoch"]
        except Exception:  # noqa: BLE001 (the note falls back to the epoch noted)
            pass
        return (f"the last checkpoint, {self.last_checkpoint} (end of epoch {epoch}), is "
                f"intact: continue with neuralign train --resume {self.run_dir}")

    @classmethod
    def from_run(cls, run: str | Path, overrides: list[str] | None = None,
                 callbacks: list[Callback] | None = None, runs_dir: str | Path = "runs",
                 allow_change: bool = False, **kwargs) -> Trainer:
        """A trainer that continues the run folder ``run`` from its last checkpoint.

        ``overrides`` may change the keys of :data:`RESUMABLE_KEYS` (e.g. ``train.epochs=60``
        to train longer). Any other change (rule, model, optimizer, data, ...) would relabel
        what the run trained: it is refused with a :class:`ConfigError` naming the keys, before
        anything is touched, unless ``allow_change`` (then it is logged, recorded in the
        checkpoint's ``config_changes``, and takes effect from the step reached: see
        :meth:`load_state_dict`). ``train.epochs`` below the epochs done is refused too.

        The run folder is locked (:func:`neuralign.io.lock_folder`) from before its checkpoint
        is read until :meth:`fit` ends, so a second process cannot resume or train into it
        meanwhile; nothing in it is written before everything is built and loaded.

        Raises:
            neuralign.io.FolderInUseError: another process holds the run folder.
        """
        distributed.init()
        held = []  # rank 0's lock on the run folder, kept by the trainer until fit() ends

        def read():
            found = resolve_run_dir(run, runs_dir)
            held.append(lock_folder(found))
            state = load_checkpoint(found / CHECKPOINT)
            missing = [k for k in ("model", "config", "epoch", "history") if k not in state]
            if missing:
                raise ValueError(f"{str(found / CHECKPOINT)!r} is not a neuralign training "
                                 f"checkpoint (no {', '.join(missing)} in it)")
            return found, state

        try:
            trainer = cls._resume(distributed.on_main(read), overrides, callbacks,
                                  allow_change, **kwargs)
        except BaseException:
            for lock in held:
                if lock is not None:
                    lock.close()
            raise
        trainer._lock = held[0] if held else None
        return trainer

    @classmethod
    def _resume(cls, found: tuple[Path, dict[str, Any]], overrides: list[str] | None,
                callbacks: list[Callback] | None, allow_change: bool, **kwargs) -> Trainer:
        """:meth:`from_run`'s trainer from the run folder and its checkpoint (rank 0 reads
        them and hands them round)."""
        from .config import apply_overrides

        run_dir, state = found
        ckpt_path = run_dir / CHECKPOINT
        old = config_from_dict(state["config"])
        cfg = apply_overrides(old, overrides or [])
        changes = {k: v for k, v in _config_changes(old, cfg).items()
                   if k not in RESUMABLE_KEYS}
        if changes and not allow_change:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
            raise ConfigError(
                f"resuming {str(run_dir)!r} would change what the run trains ({listed}). "
                f"Start a new run with them (--name NEW), or pass --allow-change to change "
                f"them on purpose (recorded in the checkpoint). Keys a resume may change: "
                f"{', '.join(RESUMABLE_KEYS)}")
        done = int(state["epoch"])
        if cfg.train.epochs < done:  # (the record would claim fewer epochs than it holds)
            todo = (f"it has finished: to train longer, resume with train.epochs above {done}"
                    if old.train.epochs <= done else
                    f"resume without train.epochs to finish its {old.train.epochs}")
            raise ConfigError(
                f"{str(run_dir)!r} has trained {done} epochs: train.epochs={cfg.train.epochs} "
                f"would record it as a run of {cfg.train.epochs}; {todo}")
        trainer = cls(cfg, callbacks=callbacks, run_dir=run_dir, **kwargs)
        try:
            trainer.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, IndexError) as e:
            what = ("does not fit the changed config" if changes else
                    "does not fit its own config (is it from another run?)")
            todo = ("resume without changing those keys" if changes else
                    "move the previous checkpoint over it if it is kept (last.prev.pt), or "
                    "start a new run")
            raise ConfigError(f"the checkpoint {str(ckpt_path)!r} {what} "
                              f"({type(e).__name__}: {str(e).splitlines()[0]}); {todo}"
                              ) from None
        if changes:
            log.warning("resuming with changed config, in effect from step %d (recorded in "
                        "the checkpoint): %s", trainer.step,
                        "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
            trainer.config_changes.append({"epoch": trainer.epoch, "changes": {
                k: [a, b] for k, (a, b) in changes.items()}})
        trainer.last_checkpoint, trainer.last_checkpoint_epoch = ckpt_path, trainer.epoch
        trainer._info("resuming %s after epoch %d (step %d)", run_dir, trainer.epoch,
                      trainer.step)
        if trainer.epoch >= cfg.train.epochs:
            trainer._info("nothing to train: %s has done its %d epochs (train.epochs=N, N > %d, "
                          "trains longer)", run_dir, trainer.epoch, trainer.epoch)
        return trainer

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        """Loss, top-1 and top-5 (percent) of the model on ``loader``."""
        was_training = self.model.training
        self.model.eval()
        loss_sum, top1, top5, n = 0.0, 0, 0, 0
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            out = self.model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            k = min(5, out.shape[1])
            pred = out.topk(k, dim=1).indices
            hit = pred == y[:, None]
            top1 += int(hit[:, 0].sum())
            top5 += int(hit.any(dim=1).sum())
            n += y.numel()  # (one target per example, or per position)
        self.model.train(was_training)
        if self.world_size > 1:  # each rank saw its share of the examples
            loss_sum, top1, top5, n = distributed.all_reduce_sum(
                [loss_sum, top1, top5, n], self.device).tolist()
        n = max(n, 1)
        return {"loss": loss_sum / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}

    def _measure_angles(self, x: torch.Tensor, y: torch.Tensor, stats: _EpochStats) -> None:
        """End-to-end angle vs backprop on this batch; BN statistics are left as they were."""
        buffers = {k: b.clone() for k, b in self.model.named_buffers()}
        try:
            angles = na.metrics.backprop_angles(
                self.model, lambda: F.cross_entropy(self.model(x), y))
        finally:
            with torch.no_grad():
                for k, b in self.model.named_buffers():
                    if b.shape == buffers[k].shape:  # (dfa's D is made at its first backward)
                        b.copy_(buffers[k])
        for k, v in angles.items():
            stats.bp_angles.setdefault(k, []).append(v)

    # -- the loop --------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data; returns the training part of the metrics."""
        self.model.train()
        loader = self.data.train
        loader.set_epoch(epoch)
        stats = _EpochStats()
        every = self.cfg.train.angle_every
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            self._last_input = x
            probe = bool(every) and bool(self.layer_names) and self.step % every == 0
            if probe:
                self._measure_angles(x, y, stats)
                na.metrics.record_gradient_angles(self.model, True)
            out = self.net(x)
            loss = F.cross_entropy(out, y)
            value = local = float(loss.detach())
            if self.world_size > 1:
                # the mean over ranks: non-finite on every rank when it is on one, so all
                # stop together (and the progress bar shows the global loss)
                value = float(distributed.all_reduce_sum([value], self.device)[0]
                              ) / self.world_size
            if not math.isfinite(value):
                if probe:
                    na.metrics.record_gradient_angles(self.model, False)
                raise DivergenceError(epoch, self.step + 1, f"the loss is {value}",
                                      self.last_checkpoint, self.last_checkpoint_epoch)
            self.optimizer.zero_grad(set_to_none=True)
            if self.feedback_optimizer is not None:
                self.feedback_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if probe:
                for k, v in na.metrics.gradient_angles(self.model).items():
                    stats.grad_angles.setdefault(k, []).append(v)
                na.metrics.record_gradient_angles(self.model, False)
            self.optimizer.step()
            if self.feedback_optimizer is not None:
                self.feedback_optimizer.step()  # the recipe includes noise and normalisation
            if not self.recipe and (self.feedback_optimizer is not None or self.joint):
                # a torch optimizer stepped F (joint: the forward one, at its rate)
                na.after_step(self.model, self.feedback_optimizer or self.optimizer,
                              self.update_generator)
            self.schedule.step()
            if self.feedback_schedule is not None:
                self.feedback_schedule.step()
            self.step += 1
            stats.loss_sum += local * y.numel()
            stats.correct += int((out.detach().argmax(1) == y).sum())
            stats.seen += y.numel()
            self._fire("on_step_end", self.step, value)
        if self.world_size > 1:
            self._reduce_stats(stats)
        n = max(stats.seen, 1)
        metrics = {"train_loss": stats.loss_sum / n, "train_top1": 100.0 * stats.correct / n}
        metrics["_grad"] = {k: sum(v) / len(v) for k, v in stats.grad_angles.items()}
        metrics["_bp"] = {k: sum(v) / len(v) for k, v in stats.bp_angles.items()}
        return metrics

    def _reduce_stats(self, stats: _EpochStats) -> None:
        """Sums and counts over ranks: the epoch's statistics of the global batches."""
        vals = [stats.loss_sum, stats.correct, stats.seen]
        for d in (stats.grad_angles, stats.bp_angles):
            for name in self.layer_names:
                v = d.get(name, [])
                vals += [sum(v), len(v)]
        t = distributed.all_reduce_sum(vals, self.device).tolist()
        stats.loss_sum, stats.correct, stats.seen = t[0], int(t[1]), int(t[2])
        i = 3
        for d in (stats.grad_angles, stats.bp_angles):
            d.clear()
            for name in self.layer_names:
                total, count = t[i], int(t[i + 1])
                i += 2
                if count:  # a mean of `count` measurements, as one list entry per measurement
                    d[name] = [total / count] * count

    def fit(self) -> list[dict[str, float]]:
        """Train from the current epoch to ``train.epochs``; returns the metrics history.

        Under ``torchrun --max-restarts=N`` (N > 0) a new run also writes its checkpoint
        before the first epoch, and when torchrun restarts the job's processes, each new
        trainer continues from the run folder's last checkpoint (:meth:`_resume_after_restart`)
        instead of starting over.

        The run folder is locked while it trains (rank 0 holds the lock): a second process
        training into it or resuming it gets :class:`neuralign.io.FolderInUseError`. An
        exception that stops training carries a note (``__notes__``) saying where the last
        checkpoint stands."""
        try:
            self._resume_after_restart()
            # rank 0 alone prepares the run folder; its errors end every rank
            distributed.on_main(self._prepare_run_dir)
            if self.epoch == 0 and self.last_checkpoint is None and distributed.max_restarts() > 0:
                self.save_checkpoint()  # a restart during the first epoch resumes from here
            if self.cfg.train.report and self.epoch == 0:
                self._report()
            return self._train()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _train(self) -> list[dict[str, float]]:
        self._fire("on_train_start")
        epochs = self.cfg.train.epochs
        try:
            while self.epoch < epochs and not self.should_stop:
                epoch = self.epoch + 1
                self._fire("on_epoch_start", epoch)
                t0 = time.perf_counter()
                tr = self.train_epoch(epoch)
                train_time = time.perf_counter() - t0
                self.epoch = epoch
                metrics = self._epoch_metrics(epoch, tr, train_time)
                if not math.isfinite(metrics["test_loss"]):
                    raise DivergenceError(epoch, self.step,
                                          f"the test loss is {metrics['test_loss']}",
                                          self.last_checkpoint, self.last_checkpoint_epoch)
                self.history.append(metrics)
                self._fire("on_epoch_end", epoch, metrics)
                if self.world_size > 1:  # a callback on one rank (pruning) stops them all
                    self.should_stop = distributed.any_true(self.should_stop, self.device)
        except BaseException as stop:
            # stopped (divergence, Ctrl-C, a full disk): close bars and writers, plot what
            # there is, and let the original exception through even if a callback fails now
            if not isinstance(stop, DivergenceError):  # (its message says it already)
                stop.add_note(self._checkpoint_note())
            try:
                self._fire("on_train_end", self.history)
            except Exception as e:
                log.warning("while stopping: %s", e)
            raise
        self._fire("on_train_end", self.history)
        return self.history

    def _resume_after_restart(self) -> None:
        """After torchrun restarted the job (``TORCHELASTIC_RESTART_COUNT`` > 0), load the run
        folder's checkpoint if this job wrote it (the same ``TORCHELASTIC_RUN_ID``, torchrun's
        ``--rdzv-id``), so that the new processes continue where the old ones stopped. A
        trainer that already holds a checkpoint (:meth:`from_run`) keeps it."""
        if self.last_checkpoint is not None or self.step:
            return
        # (each agent counts its own restarts: one that restarts for another's failure may
        # count none, so the job was restarted if any process says so)
        if max(distributed.all_gather_object(distributed.restart_count())) == 0:
            return
        path = self.run_dir / CHECKPOINT

        def read() -> dict[str, Any] | None:
            if not path.is_file():
                return None
            if self._lock is None:  # (as a resume: the lock before the checkpoint is read)
                self._lock = lock_folder(self.run_dir)
            state = load_checkpoint(path)
            return state if state.get("torchrun_run_id") == distributed.run_id() else None

        state = distributed.on_main(read)  # (rank 0 reads, as for a resume)
        if state is None:
            return
        changes = [k for k in _config_changes(config_from_dict(state["config"]), self.cfg)
                   if k not in RESUMABLE_KEYS]
        if changes:
            raise ConfigError(f"torchrun restarted job {distributed.run_id()!r}, but its "
                              f"checkpoint {str(path)!r} holds another config (keys "
                              f"{', '.join(changes)})")
        self.load_state_dict(state)
        self.last_checkpoint, self.last_checkpoint_epoch = path, self.epoch
        self._info("torchrun restarted the job: resuming %s after epoch %d (step %d)",
                   self.run_dir, self.epoch, self.step)

    def _report(self) -> None:
        """``na.report`` on the first test batch, logged and written to ``report.txt``; the
        run goes on as without it (random streams and buffers restored)."""
        x, y = next(iter(self.data.test))
        x, y = x.to(self.device), y.to(self.device)
        buffers = [b.clone() for b in self.model.buffers()]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            text = str(na.report(self.model, lambda: F.cross_entropy(self.model(x), y)))
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), buffers, strict=True):
                b.copy_(saved)
        if self.is_main:
            log.info("%s", text)
            write_text(self.run_dir / "report.txt", text + "\n")

    def _prepare_run_dir(self) -> None:
        if self._lock is None:  # (a resumed run holds it since from_run)
            self._lock = lock_folder(self.run_dir)
        # resumed (by --resume, or by torchrun's restart, from the checkpoint of epoch 0 too):
        # config.yaml follows the checkpoints (save_checkpoint)
        if self.epoch > 0 or self.last_checkpoint is not None:
            return
        if (self.run_dir / "config.yaml").exists():
            if not self.cfg.train.overwrite:
                raise FileExistsError(
                    f"run folder {str(self.run_dir)!r} already exists; continue it with "
                    f"--resume {self.run_dir}, pick another name (--name / train.name) or "
                    f"replace it (train.overwrite=true)")
            for stale in ("tb", "checkpoints", "plots", "metrics.csv"):
                path = self.run_dir / stale
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")

    def _epoch_metrics(self, epoch: int, tr: dict[str, Any], train_time: float
                       ) -> dict[str, float]:
        if self.world_size > 1:  # BatchNorm statistics were updated from each rank's batches
            distributed.broadcast_buffers(self.model)
        nan = math.nan
        m: dict[str, float] = {"epoch": epoch, "step": self.step,
                               "lr": self.optimizer.param_groups[0]["lr"],
                               "feedback_lr": self._feedback_lr(),
                               "train_loss": tr["train_loss"], "train_top1": tr["train_top1"]}
        if self.data.val is not None:
            for k, v in self.evaluate(self.data.val).items():
                m[f"val_{k}"] = v
        for k, v in self.evaluate(self.data.test).items():
            m[f"test_{k}"] = v
        weight = na.metrics.weight_angles(self.model)
        lags = self._feedback_lags()

        def mean(d: dict[str, float]) -> float:
            return sum(d.values()) / len(d) if d else nan

        m["weight_angle"] = mean(weight)
        m["gradient_angle"] = mean(tr["_grad"])
        m["backprop_angle"] = mean(tr["_bp"])
        m["feedback_lag"] = mean(lags)
        m["epoch_time_s"] = train_time
        for name in self.layer_names:
            m[f"weight_angle/{name}"] = weight.get(name, nan)
        for name in self.layer_names:
            m[f"gradient_angle/{name}"] = tr["_grad"].get(name, nan)
        for name in self.layer_names:
            m[f"backprop_angle/{name}"] = tr["_bp"].get(name, nan)
        for name in self.layer_names:
            m[f"feedback_lag/{name}"] = lags.get(name, nan)
        if self.recipe:  # each layer's rate: its rule's (or feedback_optim.rate), scheduled
            for g in self.feedback_optimizer.param_groups:
                if g["params"]:
                    m[f"feedback_lr/{g['layer']}"] = g["lr"]
        estimates = na.metrics.estimate_errors(self.model)
        if estimates:  # rules with weight estimation: Ŵ against W, and the phases' cost
            m["estimate_angle"] = mean({k: a for k, (a, _) in estimates.items()})
            m["estimate_error"] = mean({k: e for k, (_, e) in estimates.items()})
            m["estimate_trials"] = float(sum(
                layer.recipe_state.estimate_trials for _, layer in na.feedback_layers(self.model)
                if layer.rule.estimate is not None)) if self.recipe else nan
            for name in self.layer_names:
                m[f"estimate_angle/{name}"] = estimates.get(name, (nan, nan))[0]
        return m

    def _feedback_lr(self) -> float:
        """F's learning rate now (the recipe's: its first layer's rate); NaN without F."""
        if self.feedback_optimizer is not None:
            return self.feedback_optimizer.param_groups[0]["lr"]
        groups = self.optimizer.param_groups
        return groups[1]["lr"] if self.joint and len(groups) > 1 else math.nan

    def _feedback_lags(self) -> dict[str, float]:
        """Lag of each F behind its rule's fixed point, at the end of the epoch (activation
        alignment's on the epoch's last training batch, in eval mode)."""
        x = getattr(self, "_last_input", None)
        was_training = self.model.training
        self.model.eval()
        try:
            return na.metrics.feedback_lags(self.model, None if x is None else
                                            lambda: self.model(x))
        finally:
            self.model.train(was_training)


def train(cfg: Config, callbacks: list[Callback] | None = None, **kwargs
          ) -> list[dict[str, float]]:
    """Build a :class:`Trainer` for ``cfg`` and train; returns the metrics history."""
    return Trainer(cfg, callbacks=callbacks, **kwargs).fit()

