"""Feedback layers: torch layers whose backward sends the error through a feedback weight.

Each subclasses the torch layer it replaces, gives the same forward output, keeps ``weight``
and ``bias`` as the very same Parameters, and adds ``feedback`` (in ``weight``'s layout): a
Parameter when the rule learns it, a buffer when it is fixed or derived from ``sign(W)``.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn

from .autograd import WARMUP_ITERATIONS, Spec, angle, feedback_forward
from .dfa import DFAState, PointFunction
from .ops import OPS, ConvOps, ConvTransposeOps, LayerOps, LinearOps, ops_for
from .random_draws import UniformMagnitudes
from .rules import INITS, Rule, get_rule
from .terms import ACTIVITY_TERMS

__all__ = ["FeedbackLayer", "RecipeState", "FeedbackLinear", "FeedbackConv1d", "FeedbackConv2d",
           "FeedbackConv3d", "FeedbackConvTranspose1d", "FeedbackConvTranspose2d",
           "FeedbackConvTranspose3d", "FEEDBACK_CLASSES", "register_layer", "init_feedback",
           "shared_copy", "DFAPoint"]

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
    "uniform": lambda t: 1.0,
}


def _bound(c: float, fan: int) -> float:
    """``sqrt(c / fan)``; 0 for a fan of 0 (a weight with no entries, as torch allows)."""
    return math.sqrt(c / fan) if fan else 0.0


def _fans(t: Tensor) -> tuple[int, int]:
    return nn.init._calculate_fan_in_and_fan_out(t)


class RecipeState(nn.Module):
    """What the feedback recipe (:mod:`neuralign.recipe`) keeps for one learned feedback
    layer: the layer's child ``recipe_state``, made when the layer is converted, whether a
    recipe ever steps it or not. While a recipe steps the layer, its backward adds into the
    collected tensors, and the recipe's step reads and resets them.

    Its tensors are plain attributes (each only where the rule needs it): they move with the
    model (``model.to(...)``), are copied and pickled with it, and DistributedDataParallel
    neither broadcasts nor reduces them (the recipe's step sums the collected ones over the
    processes). The persistent ones and the fields are in the model's state dict.

    Persistent:
        probe_in: the sparse term's power iteration, a unit vector per block,
            ``[groups, *kernel]`` (see :meth:`neuralign.ops.LayerOps.patch_gram`).
        probe_out: the null term's, one unit vector of
            :meth:`~neuralign.ops.LayerOps.output_probe_shape` (the built-in families:
            ``[out_channels]``).
        kp_delta: Kolen-Pollack's ``F − W``, in ``W``'s layout, as ``kp_scale · kp_delta``.

    Collected between two steps (zero after a step):
        grad: in F's layout, the activity terms' gradient summed over the samples of the
            backward calls (made when a recipe first steps the layer).
        samples: int64 ``[]``: those samples (examples × positions), by which the step
            divides ``grad`` and the Gram products: accumulated micro-batches and a recurrent
            layer's time steps count as one batch of all their samples.
        gram_in, gram_out: the input-patch Gram (sparse) and the output Gram (null), summed
            over those samples, applied to their probes.

    Fields (in the state dict as 0-d tensors):
        steps: the recipe steps taken (the first backward's power iterations warm up until
            one was; weight estimation runs every ``estimate.every`` of them).
        warm: ``steps > 0``, read by the forward (a bool: a compiled forward recompiles once).
        kp_scale: see ``kp_delta``; None until a recipe first steps the layer.
        estimate_trials: trials of the weight estimation phases so far.

    Args:
        rule: the layer's rule (a learned one).
        probe_shape: the shape of the sparse term's probe vector.
        out_probe_shape: the shape of the null term's probe vector.
        weight: the layer's W (dtype, device, and Kolen-Pollack's layout).
    """

    probe_in: Tensor | None
    probe_out: Tensor | None
    kp_delta: Tensor | None
    grad: Tensor | None
    samples: Tensor | None
    gram_in: Tensor | None
    gram_out: Tensor | None

    _PERSISTENT = ("probe_in", "probe_out", "kp_delta")
    _COLLECTED = ("grad", "samples", "gram_in", "gram_out")
    #: the fields, as 0-d tensors in the state dict (a state dict of tensors only, as code
    #: that clones or averages one expects); kp_scale only with kp_delta, None as -1
    _FIELDS = (("steps", torch.int64), ("kp_scale", torch.float64),
               ("estimate_trials", torch.int64))

    def __init__(self, rule: Rule, probe_shape: tuple[int, ...],
                 out_probe_shape: tuple[int, ...], weight: Tensor):
        super().__init__()
        #: the terms the backward collects while a recipe steps the layer
        self.terms = {t: c for t, c in rule.coefficients.items() if t in ACTIVITY_TERMS}
        self.steps, self.warm, self.estimate_trials = 0, False, 0
        self.kp_scale: float | None = None
        W = weight.detach()
        self.probe_in = self.probe_out = self.kp_delta = None
        self.grad = self.samples = self.gram_in = self.gram_out = None
        if self.terms:
            self.samples = torch.zeros((), dtype=torch.int64, device=W.device)
        if "sparse" in self.terms:  # every block starts as the unit vector of equal entries
            u = W.new_ones(probe_shape)
            self.probe_in = u.div_(math.sqrt(max(1, u[0].numel())))
            self.gram_in = W.new_zeros(probe_shape)
        if "null" in self.terms:
            u = W.new_ones(out_probe_shape)
            self.probe_out = u.div_(math.sqrt(max(1, u.numel())))
            self.gram_out = W.new_zeros(out_probe_shape)
        if rule.kp:
            self.kp_delta = torch.zeros_like(W)

    def tensors(self, names: tuple[str, ...]) -> dict[str, Tensor]:
        """The state's tensors of ``names`` that the rule has."""
        return {k: t for k in names if (t := self.__dict__.get(k)) is not None}

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the backward calls since the last step."""
        for t in self.tensors(self._COLLECTED).values():
            t.zero_()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, t in self.tensors(self._PERSISTENT + self._COLLECTED).items():
            setattr(self, name, fn(t))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in self.tensors(self._PERSISTENT).items():
            destination[prefix + name] = t if keep_vars else t.detach()
        for name, dtype in self._FIELDS:
            value = getattr(self, name)
            if name != "kp_scale" or self.kp_delta is not None:
                destination[prefix + name] = torch.tensor(-1 if value is None else value,
                                                          dtype=dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A state dict without the recipe's state (saved before it was kept here) loads: the
        # state starts afresh, and Kolen-Pollack's F − W is taken from F and W again.
        unexpected = len(unexpected_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        ours = {prefix + name for name in self._PERSISTENT} | {
            prefix + name for name, _ in self._FIELDS}
        unexpected_keys[unexpected:] = [k for k in unexpected_keys[unexpected:]
                                        if k not in ours]
        with torch.no_grad():
            for name, t in self.tensors(self._PERSISTENT).items():
                saved = state_dict.get(prefix + name)
                if saved is None:
                    continue
                if saved.shape != t.shape:
                    error_msgs.append(f"size mismatch for {prefix + name}: copying a param "
                                      f"with shape {tuple(saved.shape)}, the shape in the "
                                      f"current model is {tuple(t.shape)}.")
                    continue
                t.copy_(saved)
        values = {name: state_dict.get(prefix + name) for name, _ in self._FIELDS}
        self.steps = int(values["steps"]) if values["steps"] is not None else 0
        self.warm = self.steps > 0
        self.estimate_trials = int(values["estimate_trials"]) \
            if values["estimate_trials"] is not None else 0
        scale = values["kp_scale"]
        self.kp_scale = None if scale is None or float(scale) < 0 \
            or prefix + "kp_delta" not in state_dict else float(scale)
        self.reset()

    def extra_repr(self) -> str:
        return f"steps={self.steps}"


class FeedbackLayer(nn.Module):
    """Mixin for feedback layers; put it before the torch layer class in the bases (and
    register the pair with :func:`register_layer` to have ``convert`` use it by default)."""

    # what the torch layer and this mixin give every feedback layer (for type checkers)
    weight: Tensor
    feedback: Tensor
    weight_estimate: Tensor
    recipe_state: RecipeState
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
        plain._modules.pop("recipe_state", None)
        return plain

    _ADDED = ("rule", "_spec", "_exact_backprop", "_recipe", "_recipe_froze")
    _FEEDBACK_TENSORS = ("feedback", "feedback_norm", "weight_estimate",
                         "dfa_seed")

    def _attach(self, rule: Rule, generator: torch.Generator | None) -> None:
        if rule.kind == "bp":
            raise ValueError("rule 'bp' means no feedback weight: keep the plain torch layer")
        self.rule = rule
        self._exact_backprop = False
        # the feedback recipe stepping this layer (a weak reference: see neuralign.recipe), and
        # whether it switched F's requires_grad off; neither outlives a copy or a pickle
        self._recipe: weakref.ref | None = None
        self._recipe_froze = False
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
        ops = ops_for(self)
        recipe = None
        if rule.learns:
            self.recipe_state = recipe = RecipeState(rule, ops.probe_shape(W),
                                                     ops.output_probe_shape(W), W)
        self._spec = Spec(ops, rule, derive=derive, self_weight=self_weight, recipe=recipe)
        if derive is not None:
            derive(W.detach())

    # -- copies and pickles: a recipe steps the layer it was built for, not its copies ------------
    def __getstate__(self):
        state = super().__getstate__()
        state["_recipe"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if state.get("_recipe_froze"):  # the copy's F learns again (its own recipe may stop it)
            self._parameters["feedback"].requires_grad_(True)  # type: ignore[union-attr]
            self._recipe_froze = False

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

    def _project_dfa(self, outputs: int) -> Tensor:
        D: Tensor = self._buffers["feedback"]  # type: ignore[assignment]
        return _dfa_matrix(self, outputs, D.shape[1])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # frsf kept |F0| (usf its scale) in a buffer of its own before F held it (F is in the
        # checkpoint too)
        state_dict.pop(prefix + "feedback_magnitude", None)
        state_dict.pop(prefix + "feedback_scale", None)
        if self.rule.kind == "dfa":
            _dfa_shape_for_load(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        # While a recipe steps the layer, its backward collects what the recipe's step needs
        # (power iterations: a few on the first batch, then one a call)
        state = self._modules.get("recipe_state")
        collect = 0 if self._recipe is None or not state.terms else (  # type: ignore[union-attr]
            1 if state.warm else WARMUP_ITERATIONS)  # type: ignore[union-attr]
        if collect and not (x.requires_grad or W.requires_grad
                            or (b is not None and b.requires_grad)):
            # (W frozen, an input without gradient: F needs none either, so nothing would
            # call the backward that collects; the input asks for it)
            x = x.detach().requires_grad_()
        if W.dim() > 2 and x.dim() == W.dim() - 1:  # one unbatched conv example, as torch takes
            return feedback_forward(x.unsqueeze(0), W, b, F, spec, collect).squeeze(0)
        return feedback_forward(x, W, b, F, spec, collect)

    # -- after the optimizer step ------------------------------------------------------------------
    @torch.no_grad()
    def perturb_feedback(self, lr: float, generator: torch.Generator | None = None) -> None:
        """Update noise with the rule's σ (nothing when σ is 0): ``F += lr · N(0, σ²)``, or
        under ``update_noise_units='weight'`` ``F += σ · rms(W) · N(0, 1)``."""
        sigma = self.rule.update_noise
        if sigma:
            F = self.feedback
            eps = torch.randn(F.shape, generator=generator, device=F.device, dtype=F.dtype)
            F.add_(eps.mul_(update_noise_scale(self.rule, lr, self.weight)))

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


def update_noise_scale(rule: Rule, lr: float | Tensor, W: Tensor) -> float | Tensor:
    """The update noise's standard deviation per entry of F for a step of size ``lr``:
    ``lr · σ`` in gradient units, ``σ · rms(W)`` (a 0-d tensor: no host sync) in weight
    units."""
    if rule.update_noise_units == "weight":
        return W.detach().norm() * (rule.update_noise / math.sqrt(max(W.numel(), 1)))
    return lr * rule.update_noise


def _dfa_matrix(owner: FeedbackLayer | DFAPoint, outputs: int, columns: int) -> Tensor:
    """``owner``'s dfa matrix ``D`` (its ``feedback`` buffer) for ``outputs`` output values:
    made at the first backward, once they are known, from the seed drawn at conversion (so
    every rank of a distributed run draws the same). Called in every backward: the buffer is
    read from ``_buffers``, and only the first call makes D."""
    D: Tensor = owner._buffers["feedback"]  # type: ignore[assignment]
    if D.shape != (outputs, columns):
        with torch.no_grad():
            g = torch.Generator().manual_seed(int(owner.dfa_seed))
            fresh = init_feedback(torch.empty(outputs, columns), None, owner.rule.init, g)
            owner.feedback = D = fresh.to(D)  # replaces the buffer (its shape changes)
    return D


def _dfa_shape_for_load(owner: FeedbackLayer | DFAPoint, state_dict: dict, prefix: str) -> None:
    """Before loading a state dict: give ``owner``'s D the saved shape (D may not be made
    here yet)."""
    saved = state_dict.get(prefix + "feedback")
    if saved is not None and saved.shape != owner.feedback.shape:
        owner.feedback = owner.feedback.new_empty(saved.shape)


class DFAPoint(nn.Module):
    """A feedback point of direct feedback alignment (Launay et al. 2020): the identity on its
    host module's output in the forward; in the backward it sends ``D e`` (the output error,
    projected, per position where the tensor has the error's positions, else pooled as
    ``rule.dfa_scale`` says) instead of the gradient arriving from above.

    ``neuralign.convert(model, "dfa", points=[...])`` registers one as ``dfa_point`` on each
    named module, with a forward hook that passes the module's output through it. The tensor
    must hold the examples first and its features last (``[N, *positions, C]``: a transformer
    block's output). ``D`` is ``[outputs, C]``, drawn as a dfa layer's is.
    """

    feedback: Tensor
    dfa_seed: Tensor

    def __init__(self, rule: Rule, generator: torch.Generator | None = None):
        super().__init__()
        if rule.kind != "dfa":
            raise ValueError(f"a feedback point needs a dfa rule, got {rule.name!r}")
        self.rule = rule
        self.register_buffer("feedback", torch.empty(0, 0))
        self.register_buffer("dfa_seed", torch.randint(2**62, (), generator=generator))
        self.exact_backprop = False  # (neuralign.exact_backprop: the point passes gradients)
        self.state: DFAState | None = None  # the model's, set by convert
        self.probe: Tensor | None = None  # the local angle, while recording

    # (under torch.compile a point runs eagerly, a graph break: its backward reads the pass's
    # error from a slot that a traced backward could not)
    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        if self.exact_backprop or not torch.is_grad_enabled() or not x.requires_grad:
            return x
        if x.dim() < 2:
            raise TypeError(f"a dfa feedback point needs a tensor [N, *positions, features] "
                            f"(examples first, features last), got shape {tuple(x.shape)}")
        return PointFunction.apply(x, self, None if self.state is None else self.state.current)

    def record_gradient_angle(self, enabled: bool = True) -> None:
        """Record, at each backward, the angle between what the point sends down (``D e``) and
        the gradient that arrived from above (what backprop would pass on)."""
        self.probe = torch.full((), math.nan, dtype=torch.float64,
                                device=self.dfa_seed.device) if enabled else None

    @property
    def gradient_angle(self) -> float | None:
        """Degrees, from the last backward while recording was on (else None)."""
        if self.probe is None:
            return None
        a = float(self.probe)
        return None if math.isnan(a) else a

    def sent(self, v: Tensor, dy: Tensor) -> Tensor:
        """``v`` (what the backward sends down), the local angle to ``dy`` recorded."""
        if self.probe is not None:
            self.probe.copy_(angle(v, dy))
        return v

    def project(self, outputs: int, columns: int) -> Tensor:
        """``D``, ``[outputs, columns]``: for an error of ``outputs`` values and a tensor of
        ``columns`` features (made at the first backward)."""
        return _dfa_matrix(self, outputs, columns)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _dfa_shape_for_load(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"rule={self.rule.name}"
