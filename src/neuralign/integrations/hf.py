"""Hugging Face transformers: GPT-2's ``Conv1D`` as a layer family, and converted models saved
and loaded with ``save_pretrained``.

Importing this module registers the family (once: Python imports a module once), so that
``na.convert`` converts ``transformers.pytorch_utils.Conv1D`` from then on. ``na.convert``
imports it by itself when ``transformers`` is already imported, so a user of transformers
never needs to: ``import neuralign`` alone never imports transformers.

Every other weight-bearing layer of BERT, ViT, T5 and GPT-2 is an ``nn.Linear``,
``nn.Conv2d`` or an elementwise one; what stays on backprop, and why, is listed in the
convert guide (docs/guides/convert.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..convert import convert
from ..layers import FeedbackLayer, register_layer
from ..ops import LayerOps, _linear_outer, _rows
from ..rules import Rule

__all__ = ["Conv1DOps", "FeedbackConv1D", "from_pretrained"]


class Conv1DOps(LayerOps):
    """GPT-2's ``Conv1D``: ``y = x W + b`` with ``W`` stored ``[in, out]`` (``nn.Linear``'s
    layout transposed), any number of leading dimensions. F is stored ``[in, out]`` too."""

    channel_dim = -1

    def forward(self, x, W, b):
        if b is None:
            return x.matmul(W)
        # Conv1D's own op, bit for bit
        return torch.addmm(b, x.reshape(-1, x.shape[-1]), W).view(*x.shape[:-1], W.shape[1])

    def out_channels(self, W):
        return W.shape[1]

    def in_channels(self, W):
        return W.shape[0]

    # fast paths for this map (tests/test_ops.py checks them against the derived ones)
    def core_T(self, y, K, xp_shape=None):
        return y.matmul(K.t())

    def core_outer(self, xp, y):
        return _linear_outer(y, xp)  # Σ x yᵀ: [in, out]

    def scaled_outer(self, xp, y, alpha=1.0, into=None):
        return _linear_outer(y, xp, alpha, into)

    def bias_grad(self, dy):
        return _rows(dy).sum(0)


@register_layer(Conv1D, Conv1DOps.from_module)
class FeedbackConv1D(FeedbackLayer, Conv1D):
    """``transformers.pytorch_utils.Conv1D`` with a feedback weight (``[in, out]``, W's
    layout)."""

    __repr__ = nn.Module.__repr__  # (Conv1D's own repr would hide the rule)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, rule={self.rule.name}"


def from_pretrained(cls: Any, path: str | os.PathLike, rule: str | Rule,
                    layer_rules: Mapping[str, str | Rule] | None = None,
                    **kwargs: Any) -> nn.Module:
    """Load a converted model that ``save_pretrained`` wrote: F and the recipe's state are in
    its state dict, so they are in the files; the model is built from the saved config,
    converted with the same rule, and every saved tensor loaded into it.

    Args:
        cls: the model's transformers class (``GPT2LMHeadModel``, ``BertForMaskedLM``, ...).
        path: the folder ``save_pretrained`` wrote.
        rule: the rule the model was converted with (see :func:`neuralign.convert`).
        layer_rules: the per-layer rules it was converted with.
        **kwargs: for ``cls.from_config`` (``attn_implementation``, ...).

    Returns:
        The converted model with the saved tensors (W, F, the recipe's state).

    Raises:
        RuntimeError: a tensor of the model that the files do not hold (other than a tied
            weight, saved once), or one the model does not have.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = Path(path)
    config = AutoConfig.from_pretrained(folder)
    # (an Auto class builds from a config with from_config, a model class with _from_config)
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    model = convert(build(config, **kwargs), rule, layer_rules, inplace=True)
    state: dict[str, Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    for f in sorted(folder.glob("*.bin")):  # (safe_serialization=False)
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied weight is saved once, under one of its names
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if missing or unexpected:
        raise RuntimeError(f"{folder} does not fit {cls.__name__} converted with rule "
                           f"{getattr(rule, 'name', rule)!r}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model
