"""The trainer's built-in callbacks: progress bar, epoch line, CSV, TensorBoard, checkpoints,
plots."""

from __future__ import annotations

import logging
import math
import sys
from typing import TYPE_CHECKING

from ..io import read_csv, write_csv
from .config import TrainConfig
from .events import Callback

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)

__all__ = ["ProgressBar", "EpochLogger", "CSVLogger", "TensorBoardLogger", "Checkpointer",
           "Plotter", "default_callbacks", "write_csv", "read_csv"]


def default_callbacks(tc: TrainConfig, epoch_lines: bool = True) -> list[Callback]:
    """The callbacks a :class:`TrainConfig` asks for (checkpoints before anything that may
    stop the run); ``epoch_lines=False`` leaves out the per-epoch log line."""
    cbs: list[Callback] = []
    if tc.progress:
        cbs.append(ProgressBar())
    if epoch_lines:
        cbs.append(EpochLogger())
    cbs += [Checkpointer(tc.checkpoint_every), CSVLogger()]
    if tc.tensorboard:
        cbs.append(TensorBoardLogger())
    if tc.plots:
        cbs.append(Plotter())
    return cbs


class ProgressBar(Callback):
    """A tqdm bar per epoch on stderr, showing the running loss."""

    def __init__(self, file=None):
        self.file = file
        self.bar = None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(trainer.data.train), desc=f"epoch {epoch}/"
                        f"{trainer.cfg.train.epochs}", file=self.file or sys.stderr,
                        leave=False, dynamic_ncols=True, unit="batch")

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0:
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        self._close()

    def on_train_end(self, trainer: Trainer, history: list) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt_angle(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.1f} deg"


class EpochLogger(Callback):
    """One line per epoch (logging, INFO): train loss, test top-1, mean weight angle."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        val = (f"  val top-1 {metrics['val_top1']:.2f}%" if "val_top1" in metrics else "")
        log.info("epoch %d/%d  train loss %.4f  test top-1 %.2f%%%s  weight angle %s  (%.1f s)",
                 epoch, trainer.cfg.train.epochs, metrics["train_loss"], metrics["test_top1"],
                 val, _fmt_angle(metrics["weight_angle"]), metrics["epoch_time_s"])


class CSVLogger(Callback):
    """``metrics.csv``: one row per epoch, the whole history rewritten each epoch."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        write_csv(trainer.history, trainer.run_dir / "metrics.csv")


class TensorBoardLogger(Callback):
    """TensorBoard events in ``tb/``: every epoch metric, and the training loss every 10 steps."""

    def __init__(self, every: int = 10):
        self.every = every
        self.writer = None

    def on_train_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events an interrupted run wrote after its last checkpoint
        self.writer = SummaryWriter(str(trainer.run_dir / "tb"),
                                    purge_step=trainer.step if trainer.step else None)

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        if self.writer is not None and step % self.every == 0:
            self.writer.add_scalar("train/loss_step", loss, step)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        if self.writer is None:
            return
        for k, v in metrics.items():
            if k in ("epoch", "step") or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            self.writer.add_scalar(k if "/" in k else f"epoch/{k}", v, epoch)
        self.writer.flush()

    def on_train_end(self, trainer: Trainer, history: list) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Checkpointer(Callback):
    """``checkpoints/last.pt`` every ``every`` epochs and at the last epoch (atomically)."""

    def __init__(self, every: int = 1):
        self.every = every

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        last = epoch == trainer.cfg.train.epochs
        if last or (self.every and epoch % self.every == 0):
            path = trainer.save_checkpoint()
            log.debug("epoch %d: checkpoint %s", epoch, path)


class Plotter(Callback):
    """PNG plots in ``plots/`` at the end of training (``neuralign plot RUN`` redraws them)."""

    def on_train_end(self, trainer: Trainer, history: list) -> None:
        from .plots import plot_history

        if history:
            paths = plot_history(history, trainer.run_dir / "plots",
                                 title=trainer.run_dir.name)
            log.info("plots: %s", ", ".join(str(p) for p in paths))
