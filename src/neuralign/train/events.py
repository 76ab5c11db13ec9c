"""The trainer's events and the callback base class (a leaf module: it imports nothing of the
package, so callbacks and the trainer both build on it without importing each other).

Events, in order: ``on_train_start``; per epoch ``on_epoch_start``, ``on_step_end`` after each
optimizer step, ``on_epoch_end`` with the epoch's metrics; finally ``on_train_end`` with the
whole history (also when training stopped on an error).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["Callback", "EVENTS"]

#: The events a callback may handle, in the order the trainer fires them.
EVENTS = ("on_train_start", "on_epoch_start", "on_step_end", "on_epoch_end", "on_train_end")


class Callback:
    """Base class of trainer callbacks; override the events you need."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first epoch of this call to ``fit`` (after a resume, too)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before epoch ``epoch`` (1-based)."""

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        """After every optimizer step: ``step`` counts from 1 over the whole run, ``loss`` is
        the batch's."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        """After epoch ``epoch``'s evaluation: ``metrics`` is its row of ``metrics.csv``."""

    def on_train_end(self, trainer: Trainer, history: list[dict[str, float]]) -> None:
        """After the last epoch: ``history`` holds every epoch's metrics."""
