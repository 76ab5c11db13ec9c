"""Alignment metrics, in degrees, per feedback layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .attention import Projection
from .autograd import angle as tensor_angle
from .convert import exact_backprop, feedback_layers, feedback_points
from .layers import FeedbackLayer

__all__ = ["angle", "weight_angles", "estimate_errors", "record_gradient_angles", "gradient_angles",
           "backprop_angles", "fixed_point", "feedback_lags", "norms"]


def angle(a: Tensor, b: Tensor) -> float:
    """Degrees between two tensors seen as flat vectors (90 when either is zero)."""
    return float(tensor_angle(a.detach(), b.detach()))


def weight_angles(model: nn.Module) -> dict[str, float]:
    """``{layer: ∠(W, F)}``; 0 means the layer sends errors exactly as backprop (up to scale).
    Layers whose feedback is not in W's layout (dfa) have no weight angle and are left out."""
    return {name: angle(layer.weight, layer.current_feedback())
            for name, layer in feedback_layers(model) if layer.feedback.shape == layer.weight.shape}


def estimate_errors(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{layer: (∠(Ŵ, W) in degrees, ‖Ŵ − W‖ / ‖W‖)}`` for the layers whose rule estimates W
    (:mod:`neuralign.estimate`): how good the estimate the self term reads is, measured with
    the W the estimator never sees."""
    out = {}
    for name, layer in feedback_layers(model):
        if getattr(layer.rule, "estimate", None) is not None:
            W, est = layer.weight.detach(), layer.weight_estimate
            out[name] = (angle(est, W), float((est - W).norm() / W.norm().clamp_min(1e-30)))
    return out


def record_gradient_angles(model: nn.Module, enabled: bool = True) -> None:
    """Turn recording of the local gradient angle on or off for every feedback layer.

    While on, each backward also computes what the layer would send through W for the same
    incoming error (one more transposed product per layer). A dfa feedback point records
    ∠(D e, the gradient that arrived from above)."""
    for _, layer in feedback_layers(model):
        layer.record_gradient_angle(enabled)
    for _, point in feedback_points(model):
        point.record_gradient_angle(enabled)


def gradient_angles(model: nn.Module) -> dict[str, float]:
    """``{layer: ∠(apply_T(dy, F), apply_T(dy, W))}`` from the last backward while recording;
    a dfa feedback point, under its module's name: ``∠(D e, dy)``."""
    out = {}
    for name, layer in feedback_layers(model):
        a = layer.gradient_angle
        if a is not None:
            out[name] = a
    for name, point in feedback_points(model):
        b = point.gradient_angle
        if b is not None:
            out[name] = b
    return out


def backprop_angles(model: nn.Module, closure: Callable[[], Tensor]) -> dict[str, float]:
    """End to end: ``{layer: ∠(W's gradient under its rule, W's gradient under backprop)}`` on
    the same batch. ``closure()`` runs the forward and returns the loss; it is called twice.
    The parameters' ``.grad``, and the feedback recipe's curvature estimates, are left as they
    were. A dfa feedback point (``convert``'s ``points``) is its module, under its name: the
    angle between the gradients of all the module's parameters, flattened together."""
    layers = list(feedback_layers(model))
    points = [(name, [p for p in model.get_submodule(name).parameters() if p.requires_grad])
              for name, _ in feedback_points(model)]
    points = [(name, ps) for name, ps in points if ps]
    if not layers and not points:
        return {}
    # a projection's W is rows of its attention module's Parameter: differentiate that
    sources = [layer._source[:2] if isinstance(layer, Projection) else (layer.weight, None)
               for _, layer in layers]
    params = list({id(p): p for p in [p for p, _ in sources] + [
        p for _, ps in points for p in ps]}.values())
    recipes = [layer._recipe for _, layer in layers]
    for _, layer in layers:  # a measurement: the recipe's state does not see its backward
        layer._recipe = None
    try:
        rule_grads = torch.autograd.grad(closure(), params, allow_unused=True)
        with exact_backprop(model):
            bp_grads = torch.autograd.grad(closure(), params, allow_unused=True)
    finally:
        for (_, layer), recipe in zip(layers, recipes, strict=True):
            layer._recipe = recipe
    by_id = {id(p): (g, h) for p, g, h in zip(params, rule_grads, bp_grads, strict=True)}
    out = {}
    for (name, _), (p, rows) in zip(layers, sources, strict=True):
        g, h = by_id[id(p)]
        if g is not None and h is not None:
            out[name] = angle(g if rows is None else g[rows], h if rows is None else h[rows])
    for name, ps in points:
        pairs = [by_id[id(p)] for p in ps]
        pairs = [(g, h) for g, h in pairs if g is not None and h is not None]
        if pairs:
            out[name] = angle(torch.cat([g.flatten() for g, _ in pairs]),
                              torch.cat([h.flatten() for _, h in pairs]))
    return out


def fixed_point(layer: FeedbackLayer) -> Tensor | None:
    """Where the layer's rule settles F for the current W, when it has a closed form in weight
    space (else None):

    - Kolen-Pollack: W;
    - self + decay (sa): (self/decay)·W;
    - amp + decay on mirror noise (wm): (amp·σ²/decay)·W (exact for Linear layers and for a
      convolution's interior positions; zero padding lowers the border taps' share);
    - amp + null + decay on mirror noise of a Linear layer (ia): the ridge reconstruction
      amp·σ²·(null·σ²·W Wᵀ + decay·I)⁻¹ W.

    Activation alignment's fixed point, (amp/sparse)·W, holds on the data's span only: see
    :func:`feedback_lags`, which measures it there.
    """
    rule = layer.rule
    if not rule.learns:
        return None
    W = layer.weight.detach()
    c = dict(rule.coefficients)
    if rule.kp:
        return W.clone() if set(c) <= {"decay"} else None
    decay = c.pop("decay", 0.0)
    if not decay:
        return None
    if rule.paper and W.dim() > 2 and c.keys() & {"amp", "null"}:
        return None  # (the paper's activity terms sum over the positions: a number of the data)
    sigma2 = rule.noise.std ** 2 if rule.noise is not None else None
    if set(c) == {"self"}:
        return W * (c["self"] / decay)
    if set(c) == {"amp"} and sigma2 is not None:
        return W * (c["amp"] * sigma2 / decay)
    if set(c) == {"amp", "null"} and sigma2 is not None and W.dim() == 2:
        Wd = W.double()
        A = c["null"] * sigma2 * Wd @ Wd.T + decay * torch.eye(W.shape[0], dtype=torch.float64,
                                                               device=W.device)
        b: Tensor | None = getattr(layer, "bias", None)
        if rule.paper and b is not None:  # (the bias in the projections: E[ȳ ȳᵀ] gains b bᵀ)
            bd = b.detach().double()
            A = A + c["null"] * torch.outer(bd, bd)
        return (c["amp"] * sigma2 * torch.linalg.solve(A, Wd)).to(W.dtype)
    return None


def _data_fixed_point(layer: FeedbackLayer) -> float | None:
    """amp/sparse for activation-alignment-like rules (amp + sparse on the data), else None."""
    rule = layer.rule
    c = rule.coefficients
    if rule.learns and not rule.kp and rule.noise is None and set(c) == {"amp", "sparse"}:
        return c["amp"] / c["sparse"]
    return None


@torch.no_grad()
def feedback_lags(model: nn.Module, forward: Callable[[], object] | None = None
                  ) -> dict[str, float]:
    """``{layer: ‖F − F*‖ / ‖F*‖}``: how far F lags its rule's fixed point F* for the current W.

    F* is :func:`fixed_point`'s closed form. For activation alignment (amp + sparse on the
    data), F* = (amp/sparse)·W holds on the data's span only, so its lag is measured there:
    ``‖apply(x, F − F*)‖ / ‖apply(x, F*)‖`` on the inputs each layer sees while ``forward()``
    runs (a callable that runs the model on a batch; without it those layers are left out).
    Layers whose rule has no closed-form fixed point are left out.
    """
    out: dict[str, float] = {}
    data_layers = {}
    layers = list(feedback_layers(model))
    for name, layer in layers:
        target = fixed_point(layer)
        if target is not None:
            F = layer.feedback.detach()
            out[name] = float((F - target).norm() / target.norm().clamp_min(1e-30))
        elif _data_fixed_point(layer) is not None:
            data_layers[name] = layer
    if forward is not None and data_layers:
        out.update(_data_lags(data_layers, forward))
    return {name: out[name] for name, _ in layers if name in out}


def _data_lags(data_layers: dict[str, FeedbackLayer], forward: Callable[[], object]
               ) -> dict[str, float]:
    out = {}
    inputs: dict[str, Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            inputs.setdefault(name, args[0].detach())  # (a hook that returns None)
        return hook

    hooks = [layer.register_forward_hook(keep(name)) for name, layer in data_layers.items()]
    try:
        forward()
    finally:
        for h in hooks:
            h.remove()
    for name, layer in data_layers.items():
        if name not in inputs:
            continue
        x = inputs[name]
        if x.dim() == layer.weight.dim() - 1 and layer.weight.dim() > 2:
            x = x.unsqueeze(0)
        ops = layer._spec.ops
        scale = _data_fixed_point(layer)
        assert scale is not None
        target = ops.apply(x, layer.weight.detach()) * scale
        diff = ops.apply(x, layer.feedback.detach()) - target
        out[name] = float(diff.norm() / target.norm().clamp_min(1e-30))
    return out


def norms(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{layer: (‖W‖, ‖F‖)}`` (Frobenius)."""
    return {name: (float(layer.weight.detach().norm()), float(layer.feedback.detach().norm()))
            for name, layer in feedback_layers(model)}
