"""Feedback layers: torch layers whose backward sends the error through a feedback weight.

Each subclasses the torch layer it replaces, gives the same forward output, keeps ``weight``
and ``bias`` as the very same Parameters, and adds ``feedback`` (in ``weight``'s layout): a
Parameter when the rule learns it, a buffer when it is fixed or derived from ``sign(W)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn

from .autograd import Spec, feedback_forward
from .dfa import DFAState
from .ops import OPS, ConvOps, ConvTransposeOps, LayerOps, LinearOps, ops_for
from .random_draws import UniformMagnitudes
from .rules import INITS, Rule, get_rule

__all__ = ["FeedbackLayer", "FeedbackLinear", "FeedbackConv1d", "FeedbackConv2d",
           "FeedbackConv3d", "FeedbackConvTranspose1d", "FeedbackConvTranspose2d",
           "FeedbackConvTranspose3d", "FEEDBACK_CLASSES", "register_layer", "init_feedback",
           "shared_copy"]

#: torch layer class -> its feedback layer class (filled by :func:`register_layer`; the
#: default mapping of :func:`neuralign.convert`).
FEEDBACK_CLASSES: dict[type[nn.Module], type[FeedbackLayer]] = {}


def shared_copy(cls: type, module: nn.Module, drop: tuple[str, ...] = ()) -> Any:
    """An instance of ``cls`` sharing ``module``'s Parameters, buffers, hooks and state (its
    registries are copied, their entries shared), without the attributes named in ``drop``:
    how a layer becomes its feedback version, and back."""
    new: Any = object.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, dict | set) else v
                         for k, v in module.__dict__.items() if k not in drop})
    return new


def register_layer(torch_cls: type[nn.Module], make_ops: Callable[[Any], LayerOps]):
    """Class decorator: one registration ties a torch layer class to its ops (``make_ops``,
    called with a layer, gives its :class:`~neuralign.ops.LayerOps`) and to the decorated
    feedback class, which ``convert`` then uses for it by default::

        @register_layer(nn.Linear, LinearOps.from_module)
        class FeedbackLinear(FeedbackLayer, nn.Linear):
            \"\"\"nn.Linear with a feedback weight.\"\"\"
    """

    def register(cls: type[FeedbackLayer]) -> type[FeedbackLayer]:
        if not (issubclass(cls, FeedbackLayer) and issubclass(cls, torch_cls)):
            raise TypeError(f"{cls.__name__} must subclass FeedbackLayer and then "
                            f"{torch_cls.__name__}")
        if torch_cls in FEEDBACK_CLASSES:
            raise ValueError(f"{torch_cls.__name__} is already registered (to "
                             f"{FEEDBACK_CLASSES[torch_cls].__name__})")
        cls.torch_cls = torch_cls
        OPS[torch_cls] = make_ops
        FEEDBACK_CLASSES[torch_cls] = cls
        return cls

    return register

@torch.no_grad()
def init_feedback(out: Tensor, weight: Tensor | None, init: str,
                  generator: torch.Generator | None = None) -> Tensor:
    """Fill ``out`` (in ``weight``'s layout) with an initial feedback weight, in place.

    ``'default'`` is an independent draw from the torch layer's own weight init; ``'weight'``
    copies W (so the layer starts at exact backprop); the others are ``torch.nn.init``'s.
    """
    if init == "weight":
        if weight is None:
            raise ValueError("init 'weight' needs the layer's weight")
        return out.copy_(weight)
    return INITS[init](out, generator)


#: The uniform initialisations' bound ``b`` (the draw is ``U(-b, b)``), from the kernel.
UNIFORM_BOUNDS: dict[str, Callable[[Tensor], float]] = {
    # kaiming_uniform_ with a = sqrt(5): gain sqrt(1/3), so b = sqrt(3) gain / sqrt(fan_in)
    "default": lambda t: _bound(1, _fans(t)[0]),
    "kaiming_uniform": lambda t: _bound(6, _fans(t)[0]),
    "xavier_uniform": lambda t: _bound(6, sum(_fans(t))),
}


def _bound(c: float, fan: int) -> float:
    """``sqrt(c / fan)``; 0 for a fan of 0 (a weight with no entries, as torch allows)."""
    return math.sqrt(c / fan) if fan else 0.0


def _fans(t: Tensor) -> tuple[int, int]:
    return nn.init._calculate_fan_in_and_fan_out(t)


class FeedbackLayer(nn.Module):
    """Mixin for feedback layers; put it before the torch layer class in the bases (and
    register the pair with :func:`register_layer` to have ``convert`` use it by default)."""

    # what the torch layer and this mixin give every feedback layer (for type checkers)
    weight: Tensor
    feedback: Tensor
    weight_estimate: Tensor
    dfa_seed: Tensor
    rule: Rule
    _spec: Spec
    _exact_backprop: bool
    torch_cls: type[nn.Module]

    @classmethod
    def base_class(cls) -> type[nn.Module]:
        """The torch layer class this feedback class replaces: the registered one, else the
        first torch class after ``FeedbackLayer`` in the bases."""
        registered = getattr(cls, "torch_cls", None)
        if registered is not None:
            return registered
        return next(c for c in cls.__mro__ if issubclass(c, nn.Module)
                    and not issubclass(c, FeedbackLayer))

    def __init__(self, *args, rule: str | Rule = "fa", generator: torch.Generator | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._attach(get_rule(rule), generator)

    @classmethod
    def from_module(cls, module: nn.Module, rule: str | Rule,
                    generator: torch.Generator | None = None) -> FeedbackLayer:
        """A feedback layer sharing ``module``'s Parameters, buffers, hooks and state."""
        base = cls.base_class()
        if type(module) is not base:
            raise TypeError(f"{cls.__name__}.from_module takes a {base.__name__}, "
                            f"got {type(module).__name__}")
        new = shared_copy(cls, module)
        new._attach(get_rule(rule), generator)
        return new

    def to_module(self) -> nn.Module:
        """The plain torch layer, sharing this layer's Parameters, hooks and state."""
        plain = shared_copy(type(self).base_class(), self, drop=self._ADDED)
        for name in self._FEEDBACK_TENSORS:
            plain._parameters.pop(name, None)
            plain._buffers.pop(name, None)
            plain._non_persistent_buffers_set.discard(name)
        return plain

    _ADDED = ("rule", "_spec", "_exact_backprop")
    _FEEDBACK_TENSORS = ("feedback", "feedback_norm", "weight_estimate",
                         "dfa_seed")

    def _attach(self, rule: Rule, generator: torch.Generator | None) -> None:
        if rule.kind == "bp":
            raise ValueError("rule 'bp' means no feedback weight: keep the plain torch layer")
        self.rule = rule
        self._exact_backprop = False
        W = self.weight
        if rule.kind == "dfa":
            # D: [outputs, in_channels], in the layout of a Linear map from the layer's input
            # channels to the network's outputs; made at the first backward, once the output
            # size is known, from a seed drawn now (so every rank of a distributed run draws
            # the same).
            channels = ops_for(self).in_channels(W)
            self.register_buffer("feedback", W.new_empty(0, channels))
            seed = torch.randint(2**62, (), generator=generator)
            self.register_buffer("dfa_seed", seed.to(W.device))
            self._spec = Spec(ops_for(self), rule, dfa=DFAState(), project=self._project_dfa)
            return
        F0 = init_feedback(torch.empty_like(W, requires_grad=False), W, rule.init, generator)
        derive = None
        if rule.kind == "usf":  # F holds the scale, std(F0), in every entry (|F0| for one)
            F0.fill_(F0.std() if F0.numel() > 1 else F0.abs().sum())
            derive = self._derive_signs
        elif rule.kind == "frsf":  # F holds |F0|
            derive = self._derive_signs
        elif rule.kind == "brsf":  # fresh magnitudes every batch
            bound = UNIFORM_BOUNDS.get(rule.init)
            draw = UniformMagnitudes(bound(F0)) if bound is not None else self._draw_init
            derive = partial(self._derive_brsf, draw)
        if rule.learns:
            self.feedback = nn.Parameter(F0)
        else:
            self.register_buffer("feedback", F0)
        if rule.normalize:
            norm = F0.norm() if rule.normalize is True else torch.tensor(float(rule.normalize))
            self.register_buffer("feedback_norm", norm.to(F0))
        self_weight = None
        if rule.estimate is not None:  # Ŵ for the self term, from neuralign.estimate's phases
            self.register_buffer("weight_estimate", torch.zeros_like(W, requires_grad=False))
            self_weight = self._weight_estimate
        self._spec = Spec(ops_for(self), rule, derive=derive, self_weight=self_weight)
        if derive is not None:
            derive(W.detach())

    def _weight_estimate(self) -> Tensor:
        return self.weight_estimate

    # -- sign-symmetric feedback, derived in place from the W of the step -------------------------
    # One pass each, no temporary: copysign(m, W) = |m| sign(W), except that an exactly zero
    # weight gives +|m| (as +0.0) or -|m| (as -0.0) where sign(0) would give 0. F keeps its
    # magnitudes (usf: the scale, frsf: |F0|), so each step only sets its signs. Called in
    # the backward, per call: W detached rather than a no_grad context, and the buffer read
    # from _buffers rather than through nn.Module's attribute lookup (the same, for 2 µs less).
    def _derive_signs(self, W: Tensor) -> Tensor:
        F: Tensor = self._buffers["feedback"]  # type: ignore[assignment]
        return torch.copysign(F, W.detach(), out=F)

    def _derive_brsf(self, draw: Callable[[Tensor, Tensor], Tensor], W: Tensor) -> Tensor:
        F: Tensor = self._buffers["feedback"]  # type: ignore[assignment]
        return draw(F, W.detach())  # copysign(fresh magnitudes, W)

    def _draw_init(self, F: Tensor, sign: Tensor) -> Tensor:  # brsf, an init not uniform
        return torch.copysign(init_feedback(F, sign, self.rule.init), sign, out=F)

    @torch.no_grad()
    def current_feedback(self) -> Tensor:
        """F as the next backward would use it: usf and frsf are derived from the current W
        (the buffer only follows W where the layer sends an error); brsf's last draw."""
        if self.rule.kind in ("usf", "frsf") and self._spec.derive is not None:
            self._spec.derive(self.weight)
        return self.feedback

    def _project_dfa(self, e: Tensor) -> Tensor:
        # (called in every dfa layer's backward: the buffer read from _buffers, and no
        # no_grad context, 1-2 µs each, where only the first call makes D)
        D: Tensor = self._buffers["feedback"]  # type: ignore[assignment]
        if D.shape[0] != e.shape[1]:
            with torch.no_grad():
                g = torch.Generator().manual_seed(int(self.dfa_seed))
                fresh = init_feedback(torch.empty(e.shape[1], D.shape[1]), None, self.rule.init,
                                      g)
                self.feedback = D = fresh.to(D)  # replaces the buffer (its shape changes)
        return D

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # frsf kept |F0| (usf its scale) in a buffer of its own before F held it (F is in the
        # checkpoint too)
        state_dict.pop(prefix + "feedback_magnitude", None)
        state_dict.pop(prefix + "feedback_scale", None)
        saved = state_dict.get(prefix + "feedback")
        if self.rule.kind == "dfa" and saved is not None and saved.shape != self.feedback.shape:
            self.feedback = self.feedback.new_empty(saved.shape)  # D not yet made here
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self._spec.loaded is not None:
            self._spec.loaded()

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self._exact_backprop or not torch.is_grad_enabled():
            return super().forward(x)  # no gradient (or exact backprop): the torch layer itself
        return self._feedback_call(x, self._spec)

    def _feedback_call(self, x: Tensor, spec: Spec) -> Tensor:
        # W, b and F read from the module's dicts: nn.Module's attribute lookup costs about
        # 0.45 µs a name, in every layer's every forward. A name the dicts do not hold (a
        # parametrized weight, a property) goes through the lookup.
        p, buffers = self._parameters, self._buffers
        W = p["weight"] if "weight" in p else self.weight
        b = p["bias"] if "bias" in p else cast(Tensor | None, self.bias)  # (a Parameter or None)
        F = buffers["feedback"] if "feedback" in buffers else (
            p["feedback"] if "feedback" in p else self.feedback)
        assert W is not None and F is not None
        if W.dim() > 2 and x.dim() == W.dim() - 1:  # one unbatched conv example, as torch takes
            return feedback_forward(x.unsqueeze(0), W, b, F, spec).squeeze(0)
        return feedback_forward(x, W, b, F, spec)

    # -- after the optimizer step ------------------------------------------------------------------
    @torch.no_grad()
    def perturb_feedback(self, lr: float, generator: torch.Generator | None = None) -> None:
        """Update noise ``F += lr · N(0, σ²)`` with the rule's σ (nothing when σ is 0)."""
        sigma = self.rule.update_noise
        if sigma:
            F = self.feedback
            eps = torch.randn(F.shape, generator=generator, device=F.device, dtype=F.dtype)
            F.add_(eps, alpha=lr * sigma)

    @torch.no_grad()
    def normalize_feedback(self) -> None:
        """Rescale F to the rule's fixed Frobenius norm (nothing when the rule has none)."""
        if self.rule.normalize:
            F = self.feedback
            F.mul_(self.feedback_norm / F.norm().clamp_min(torch.finfo(F.dtype).tiny))

    def record_gradient_angle(self, enabled: bool = True) -> None:
        """Record, at each backward, the angle between what the layer sends down through F and
        what it would send through W for the same incoming error."""
        # a 0-d tensor that the backward overwrites (NaN until then): no Python side effect in
        # the backward, so recording does not break a compiled graph
        self._spec.probe = torch.full((), math.nan, dtype=torch.float64,
                                      device=self.weight.device) if enabled else None

    @property
    def gradient_angle(self) -> float | None:
        """Degrees, from the last backward while recording was on (else None)."""
        probe = self._spec.probe
        if probe is None:
            return None
        angle = float(probe)
        return None if math.isnan(angle) else angle

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule.name}"


@register_layer(nn.Linear, LinearOps.from_module)
class FeedbackLinear(FeedbackLayer, nn.Linear):
    """``nn.Linear`` (any number of leading dimensions) with a feedback weight."""


@register_layer(nn.Conv1d, ConvOps.from_module)
class FeedbackConv1d(FeedbackLayer, nn.Conv1d):
    """``nn.Conv1d`` with a feedback weight."""


@register_layer(nn.Conv2d, ConvOps.from_module)
class FeedbackConv2d(FeedbackLayer, nn.Conv2d):
    """``nn.Conv2d`` with a feedback weight."""


@register_layer(nn.Conv3d, ConvOps.from_module)
class FeedbackConv3d(FeedbackLayer, nn.Conv3d):
    """``nn.Conv3d`` with a feedback weight."""


class _FeedbackConvTranspose(FeedbackLayer):
    """A transposed convolution's ``forward(x, output_size=None)``: an ``output_size`` that
    asks for another ``output_padding`` than the layer's is served by ops with that one."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if output_size is None:
            return super().forward(x)
        m = cast(nn.modules.conv._ConvTransposeNd, self)
        if self._exact_backprop or not torch.is_grad_enabled():  # the torch layer itself
            return self.base_class().forward(m, x, output_size)  # type: ignore[call-arg]
        padding = m._output_padding(  # (torch's stub types its own call's tuples as lists)
            x, output_size, m.stride, m.padding, m.kernel_size,  # type: ignore[arg-type]
            len(m.kernel_size), m.dilation)  # type: ignore[arg-type]
        spec = self._spec
        if tuple(padding) != cast(ConvTransposeOps, spec.ops).output_padding:
            spec = copy.copy(spec)
            spec.ops = ConvTransposeOps.from_module(m, output_padding=tuple(padding))
        return self._feedback_call(x, spec)


@register_layer(nn.ConvTranspose1d, ConvTransposeOps.from_module)
class FeedbackConvTranspose1d(_FeedbackConvTranspose, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with a feedback weight (in the weight's layout,
    ``[in_channels, out_channels // groups, k]``)."""


@register_layer(nn.ConvTranspose2d, ConvTransposeOps.from_module)
class FeedbackConvTranspose2d(_FeedbackConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with a feedback weight (in the weight's layout)."""


@register_layer(nn.ConvTranspose3d, ConvTransposeOps.from_module)
class FeedbackConvTranspose3d(_FeedbackConvTranspose, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with a feedback weight (in the weight's layout)."""
