"""Lightning: a callback that converts a LightningModule's network (or takes a converted one)
and steps the rules' feedback recipe after each optimizer step.

::

    trainer = L.Trainer(max_epochs=10, callbacks=[FeedbackAlignment("sa", attr="net")])
    trainer.fit(module, data)

What it does, and why it fits Lightning's loop:

* ``setup``: converts ``pl_module.<attr>`` in place (before ``configure_optimizers``, so the
  module's optimizer sees the converted network) and builds the recipe,
  :func:`neuralign.feedback_optimizer`, before Lightning wraps the module in
  DistributedDataParallel. The recipe switches F's ``requires_grad`` off, so an optimizer over
  ``self.parameters()`` leaves F alone (``na.param_groups(self.net)["forward"]`` is the same).
* after each real step of the module's optimizer (a step post-hook on the torch optimizer):
  the recipe's step. So it follows ``accumulate_grad_batches`` (the backward calls of the
  accumulated micro-batches add up in the layers' state, as one batch of all their samples)
  and mixed precision's skipped steps (no W step, no F step); gradient clipping touches W's
  gradients only. ``on_before_zero_grad`` (Lightning zeroes W's gradients at the start of an
  accumulation cycle) forgets what a skipped step left collected, as W's gradients are.
* under DDP the recipe's step sums what each process collected, so F stays identical on every
  process and equal to the single process's on the global batch.
* F and the recipe's state on the layers are in the module's state dict, hence in Lightning's
  checkpoints; the recipe's own state (its rates, which schedulers may scale) is the callback's
  state. ``trainer.fit(..., ckpt_path=...)`` resumes exactly.
* at the end of each training epoch it logs, through the module's logger (whatever the user
  configured: TensorBoard, CSV, wandb, ...), ``feedback/weight_angle`` (the mean over layers of
  ∠(W, F), degrees) and ``feedback/lag`` (the mean ‖F − F*‖/‖F*‖ where the rule has a closed
  form), and with ``per_layer=True`` each layer's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from .. import metrics
from ..convert import convert, feedback_layers
from ..recipe import FeedbackOptimizer, feedback_optimizer
from ..rules import Rule

__all__ = ["FeedbackAlignment"]


class FeedbackAlignment(pl.Callback):
    """Train a LightningModule's network with a rule: convert it, step the feedback recipe.

    Args:
        rule: a rule to convert ``pl_module.<attr>`` with, or None when the module already
            holds a converted network (the callback then only steps the recipe and logs).
        attr: the module's attribute that holds the network (``""``: the module itself).
        layer_rules: per-layer rules (see :func:`neuralign.convert`).
        rate: one recipe rate for every layer (default: each rule's own).
        seed: seeds F's initialisation and the update noise (the same on every process).
        optimizer_index: the recipe steps after this optimizer of the module (the one that
            trains the network's weights).
        per_layer: also log each layer's weight angle and lag.
        convert_kwargs: more keyword arguments for :func:`neuralign.convert`
            (``on_unsupported``, ``mapping``).
    """

    def __init__(self, rule: str | Rule | None = None, attr: str = "model",
                 layer_rules: Mapping[str, str | Rule] | None = None, rate: float | None = None,
                 seed: int = 0, optimizer_index: int = 0, per_layer: bool = False,
                 **convert_kwargs: Any):
        self.rule, self.attr, self.layer_rules = rule, attr, layer_rules
        self.rate, self.seed, self.optimizer_index = rate, seed, optimizer_index
        self.per_layer, self.convert_kwargs = per_layer, convert_kwargs
        self.recipe: FeedbackOptimizer | None = None
        self._hook: Any = None
        self._saved: dict[str, Any] | None = None

    # -- before the optimizers and DDP ---------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Convert the network (once) and build the recipe (when fitting)."""
        if self.rule is not None and not any(True for _ in feedback_layers(pl_module)):
            # (F drawn from the seed: the same on every process, whatever ran before)
            kwargs = {"generator": torch.Generator().manual_seed(self.seed),
                      **self.convert_kwargs}
            if self.attr:
                net = convert(getattr(pl_module, self.attr), self.rule, self.layer_rules,
                              inplace=True, **kwargs)
                setattr(pl_module, self.attr, net)
            else:
                convert(pl_module, self.rule, self.layer_rules, inplace=True, **kwargs)
        if stage == "fit" and self.recipe is None:
            self.recipe = feedback_optimizer(pl_module, rate=self.rate)
            if self._saved is not None:
                self.recipe.load_state_dict(self._saved)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the layers back to their rules' plain backward."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if stage == "fit" and self.recipe is not None:
            self.recipe.release()
            self.recipe = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Step the recipe after each step of the module's optimizer."""
        assert self.recipe is not None
        device = pl_module.device
        self.recipe.generator = torch.Generator(device=device).manual_seed(self.seed)
        optimizer = trainer.optimizers[self.optimizer_index]
        recipe = self.recipe
        self._hook = optimizer.register_step_post_hook(lambda *_: recipe.step())

    def on_before_zero_grad(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                            optimizer: torch.optim.Optimizer) -> None:
        """W's gradients are zeroed: so is what the layers collected (a skipped step's)."""
        if self.recipe is not None:
            self.recipe.zero_grad()

    # -- logging -------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the weight angles and the feedback lags."""
        angles, lags = metrics.weight_angles(pl_module), metrics.feedback_lags(pl_module)
        values = {}
        if angles:
            values["feedback/weight_angle"] = sum(angles.values()) / len(angles)
        if lags:
            values["feedback/lag"] = sum(lags.values()) / len(lags)
        if self.per_layer:
            values.update({f"feedback/weight_angle/{k}": v for k, v in angles.items()})
            values.update({f"feedback/lag/{k}": v for k, v in lags.items()})
        if values:
            pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=True)

    # -- checkpoints: F and the layers' recipe state are in the module's state dict ---------------
    def state_dict(self) -> dict[str, Any]:
        """The recipe's own state (its groups' rates)."""
        return {} if self.recipe is None else {"recipe": self.recipe.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the recipe's rates (now, or when the recipe is built)."""
        self._saved = state_dict.get("recipe")
        if self.recipe is not None and self._saved is not None:
            self.recipe.load_state_dict(self._saved)
