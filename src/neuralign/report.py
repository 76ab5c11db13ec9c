"""Is the rule really active? One measured step, per layer, as a table to paste in an issue."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import metrics
from .convert import _converted, _holds_weights, bypassed_layers, feedback_layers, feedback_points

__all__ = ["Report", "LayerReport", "report"]


@dataclass(frozen=True)
class LayerReport:
    """One feedback layer's (or dfa feedback point's) row of a :class:`Report`.

    Attributes:
        name: the layer's qualified name.
        kind: its class (``FeedbackLinear``, ...).
        rule: its rule's name.
        error_via: how its error went down in the measured backward: ``'F'`` (its feedback
            weight), ``'D'`` (dfa's projection of the output error), ``'D (point)'`` (a dfa
            feedback point at the module's output: its parameters learn by backprop from D e),
            ``'W (bypassed)'`` (the model reads its weight itself: plain backprop) or
            ``'none'`` (unused, or no error reached it).
        local_angle: ∠(what it sent down, what W would send for the same error), degrees (a
            dfa feedback point: ∠(D e, the gradient that arrived from above)).
        backprop_angle: ∠(W's gradient under the rule, W's gradient under exact backprop on
            the same batch), degrees.
        weight_angle: ∠(W, F), degrees (dfa: none).
        lag: ‖F − F*‖/‖F*‖, F* the rule's fixed point where it has a closed form.
    """

    name: str
    kind: str
    rule: str
    error_via: str
    local_angle: float | None
    backprop_angle: float | None
    weight_angle: float | None
    lag: float | None


@dataclass(frozen=True)
class Report:
    """What :func:`report` measured: a row per feedback layer, the layers the model bypasses,
    and the weight-bearing layers ``convert`` left on backprop. ``str(report)`` is the table.
    """

    layers: list[LayerReport]
    bypassed: list[str] = field(default_factory=list)
    not_converted: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None or math.isnan(v) else format(v, fmt)

        head = ("layer", "type", "rule", "error via", "local angle", "vs backprop",
                "weight angle", "lag")
        rows = [(r.name or "(model)", r.kind, r.rule, r.error_via, num(r.local_angle, ".1f"),
                 num(r.backprop_angle, ".1f"), num(r.weight_angle, ".1f"), num(r.lag, ".3f"))
                for r in self.layers]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
        points = sum(r.error_via == "D (point)" for r in self.layers)
        lines = [f"neuralign report: {len(self.layers) - points} feedback layer(s)"
                 f"{f', {points} dfa feedback point(s)' if points else ''}; rules "
                 f"{', '.join(sorted({r.rule for r in self.layers})) or '-'}; angles in degrees",
                 *("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                   for row in (head, *rows))]
        lines.append("bypassed (error through W: the model reads their weights itself): "
                     + (", ".join(self.bypassed) or "none"))
        lines.append("not converted (weight-bearing, on backprop): "
                     + (", ".join(self.not_converted) or "none"))
        return "\n".join(lines)


def report(model: nn.Module, closure: Callable[[], Tensor]) -> Report:
    """Measure, on one batch, whether each feedback layer's error really goes through its
    feedback weight, and how far that is from backprop.

    ``closure()`` runs the model's forward on a batch and returns the loss; it is called four
    times (the measured backward, exact backprop's for comparison, a forward to find bypassed
    layers, and one for activation alignment's lag). Nothing is stepped: the parameters'
    ``.grad`` and the feedback recipe's collected state are left as they were (the closure's
    forwards do move batch norm's running statistics, as any forward in training mode).

    Args:
        model: a converted model.
        closure: runs a forward of ``model`` and returns a scalar loss.

    Returns:
        The measurements, a :class:`Report` (``print(report)`` shows the table).

    Examples:
        >>> print(na.report(model, lambda: F.cross_entropy(model(x), y)))
    """
    layers = list(feedback_layers(model))
    called: set[str] = set()
    hooks = [layer.register_forward_pre_hook(lambda m, a, name=name: called.add(name))
             for name, layer in layers]
    recipes = [layer._recipe for _, layer in layers]
    for _, layer in layers:  # a measurement: the recipe's state does not see its backward
        layer._recipe = None
    metrics.record_gradient_angles(model, True)
    try:
        loss = closure()
        wanted = [(name, layer.weight) for name, layer in layers if layer.weight.requires_grad]
        # (a backward through the points too: their modules' parameters)
        inside = [p for name, _ in feedback_points(model)
                  for p in model.get_submodule(name).parameters() if p.requires_grad]
        reached: set[str] = set()  # the layers whose W got a gradient
        if wanted or inside:  # (the gradients themselves are not kept: only the angles)
            grads = torch.autograd.grad(loss, [*(w for _, w in wanted), *inside],
                                        allow_unused=True)
            reached = {name for (name, _), g in zip(wanted, grads[:len(wanted)], strict=True)
                       if g is not None}
        local = metrics.gradient_angles(model)
    finally:
        metrics.record_gradient_angles(model, False)
        for h in hooks:
            h.remove()
        for (_, layer), recipe in zip(layers, recipes, strict=True):
            layer._recipe = recipe
    versus = metrics.backprop_angles(model, closure)
    # never called, yet W got a gradient: the model read the weight itself (an unused layer
    # is not bypassed)
    bypassed = [n for n in bypassed_layers(model, closure) if n in reached]
    weight_angles = metrics.weight_angles(model)
    lags = metrics.feedback_lags(model, closure)
    rows = []
    for name, layer in layers:
        if name in bypassed:
            via = "W (bypassed)"
        elif name not in called or name not in local:  # unused, or no error reached it
            via = "none"
        else:
            via = "D" if layer.rule.kind == "dfa" else "F"
        rows.append(LayerReport(name, type(layer).__name__, layer.rule.name, via,
                                local.get(name), versus.get(name), weight_angles.get(name),
                                lags.get(name)))
    for name, point in feedback_points(model):  # (vs backprop: all the module's parameters)
        rows.append(LayerReport(name, f"DFAPoint on {type(model.get_submodule(name)).__name__}",
                                point.rule.name, "D (point)", local.get(name), versus.get(name),
                                None, None))
    converted = [n for n, m in model.named_modules() if _converted(m)]
    left = [f"{n}: {type(m).__name__}" for n, m in model.named_modules()
            if n and _holds_weights(m) and not any(n.startswith(c + ".") for c in converted)]
    return Report(rows, bypassed, left)
