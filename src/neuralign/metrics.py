"""Alignment metrics, in degrees, per feedback layer."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .convert import exact_backprop, feedback_layers

__all__ = ["angle", "weight_angles", "record_gradient_angles", "gradient_angles",
           "backprop_angles", "norms"]


def angle(a: Tensor, b: Tensor) -> float:
    """Degrees between two tensors seen as flat vectors (90 when either is zero)."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    denom = float(a.norm() * b.norm())
    if denom == 0.0:
        return 90.0
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b) / denom))))


def weight_angles(model: nn.Module) -> dict[str, float]:
    """``{layer: ∠(W, F)}``; 0 means the layer sends errors exactly as backprop (up to scale).
    Layers whose feedback is not in W's layout (dfa) have no weight angle and are left out."""
    return {name: angle(layer.weight, layer.current_feedback())
            for name, layer in feedback_layers(model) if layer.feedback.shape == layer.weight.shape}


def record_gradient_angles(model: nn.Module, enabled: bool = True) -> None:
    """Turn recording of the local gradient angle on or off for every feedback layer.

    While on, each backward also computes what the layer would send through W for the same
    incoming error (one more transposed product per layer)."""
    for _, layer in feedback_layers(model):
        layer.record_gradient_angle(enabled)


def gradient_angles(model: nn.Module) -> dict[str, float]:
    """``{layer: ∠(apply_T(dy, F), apply_T(dy, W))}`` from the last backward while recording."""
    out = {}
    for name, layer in feedback_layers(model):
        a = layer.gradient_angle
        if a is not None:
            out[name] = a
    return out


def backprop_angles(model: nn.Module, closure: Callable[[], Tensor]) -> dict[str, float]:
    """End to end: ``{layer: ∠(W's gradient under its rule, W's gradient under backprop)}`` on
    the same batch. ``closure()`` runs the forward and returns the loss; it is called twice.
    The parameters' ``.grad`` are left as they were."""
    layers = list(feedback_layers(model))
    weights = [layer.weight for _, layer in layers]
    if not layers:
        return {}
    rule_grads = torch.autograd.grad(closure(), weights, allow_unused=True)
    with exact_backprop(model):
        bp_grads = torch.autograd.grad(closure(), weights, allow_unused=True)
    out = {}
    for (name, _), g, h in zip(layers, rule_grads, bp_grads, strict=True):
        if g is not None and h is not None:
            out[name] = angle(g, h)
    return out


def norms(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{layer: (‖W‖, ‖F‖)}`` (Frobenius)."""
    return {name: (float(layer.weight.detach().norm()), float(layer.feedback.detach().norm()))
            for name, layer in feedback_layers(model)}
