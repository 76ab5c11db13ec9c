"""The autograd Function of a feedback layer: one backward call produces every gradient.

The forward is the torch layer's own op. The backward sends the error down through the
feedback weight F, gives W and b their ordinary gradients, and gives F its rule gradient
(plus Kolen-Pollack's task share) from tensors the forward already holds. The Function is
generic over :class:`~neuralign.ops.LayerOps`: a new layer family only needs new ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import terms
from .dfa import DFAState, examples_error, missing_error, project_error
from .ops import LayerOps
from .random_draws import noise_like
from .rules import Rule

__all__ = ["Spec", "FeedbackFunction", "feedback_forward", "angle", "WARMUP_ITERATIONS"]


#: Power iterations of a layer's curvature products in each backward before the recipe's first
#: step on it (afterwards one per backward).
WARMUP_ITERATIONS = 8


@dataclass
class Spec:
    """What the Function needs besides tensors: the layer's own, fixed when it is converted.

    Attributes:
        ops: the layer family's linear map.
        rule: the feedback rule.
        derive: for feedback derived from W (sign rules): ``derive(W) -> F``, called in the
            backward (only when a gradient is taken), writing the layer's buffer in place.
        probe: a 0-d float64 tensor that receives the local gradient angle (degrees) while
            recording is on, or None.
        dfa: for direct feedback alignment, the model's :class:`~neuralign.dfa.DFAState`.
        project: for direct feedback alignment, ``project(outputs) -> D``: the layer's
            projection of an output error of ``outputs`` values, ``[outputs, in_channels]``
            (made at the first backward, once the outputs are known).
        self_weight: for a rule with an estimator, ``self_weight() -> Ŵ``, what the self term
            reads instead of W; None reads W.
        recipe: for a learned rule, the layer's :class:`~neuralign.layers.RecipeState`, which
            the backward fills while a feedback recipe steps the layer.
    """

    ops: LayerOps
    rule: Rule
    derive: Callable[[Tensor], Tensor] | None = None
    probe: Tensor | None = field(default=None)
    dfa: DFAState | None = None
    project: Callable[[int], Tensor] | None = None
    self_weight: Callable[[], Tensor] | None = None
    recipe: Any = None


def mirror_noise(x: Tensor, rule: Rule, dout: Tensor) -> Tensor:
    """Fresh noise of ``x``'s shape: normal, or uniform with the same std (drawn in the
    backward of the output gradient ``dout``, compiled too)."""
    noise = rule.noise
    assert noise is not None
    return noise_like(x, noise.dist, noise.std, after=dout)


def angle(a: Tensor, b: Tensor) -> Tensor:
    """Degrees between two tensors seen as flat vectors, as a 0-d tensor (no host sync; 90
    when either is zero)."""
    a, b = a.flatten().double(), b.flatten().double()
    cos = (a @ b) / (a.norm() * b.norm()).clamp_min(1e-300)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


class FeedbackFunction(torch.autograd.Function):
    """``out = layer(x; W, b)``; backward: ``dx = apply_T(dy, F)``, ``dW``, ``db`` as
    backprop, and ``dF = Σ c_t ∇R_t (+ dW for Kolen-Pollack)``: the rule's own gradient, or,
    with ``collect`` (a feedback recipe steps the layer), the activity terms' sums over the
    call's samples, the rest being the recipe's step's (see :func:`collect`)."""

    # forward(ctx, ...) rather than forward + setup_context: with a separate setup_context,
    # torch binds the arguments through inspect.signature at every call, about 20 µs a layer.
    @staticmethod
    def forward(ctx, x, weight, bias, feedback, spec, collect=0, tap=False):
        output = spec.ops.forward(x, weight, bias)
        ctx.spec, ctx.collect = spec, collect
        # The output is kept for null, and for amp where it is smaller than W (else amp folds
        # into a W-sized kernel in the backward): never an activation larger than both.
        keep_out = (ctx.needs_input_grad[3] or collect) and (spec.rule.uses_output or (
            spec.rule.amp_on_data and output.numel() < weight.numel()))
        # Derived feedback is not saved: the backward derives it from the saved W, so writing
        # the buffer in place can never invalidate another pending graph.
        ctx.save_for_backward(x, weight, bias,
                              None if spec.derive or spec.project else feedback,
                              output if keep_out else None)
        ctx.slot = spec.dfa.current if spec.dfa is not None else None
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device)) \
            if torch.is_autocast_enabled(device) else None
        if tap:  # dfa, compiled: a second output whose gradient is the output error e
            assert spec.dfa is not None and spec.dfa.tail is not None
            return output, output.new_zeros(()).expand(x.shape[0], *spec.dfa.tail)
        return output

    @staticmethod
    def backward(ctx, dout, e=None):
        if ctx.autocast is None:
            return FeedbackFunction._backward(ctx, dout, e)
        # Under autocast the products run in the dtype autocast gave the output, with autocast
        # itself off (the backward ops are not on its lists); the engine casts each gradient to
        # its parameter's own dtype.
        with torch.autocast(ctx.autocast[0], enabled=False):
            return FeedbackFunction._backward(ctx, dout, e)

    @staticmethod
    def _backward(ctx, dout, e=None):
        x, W, b, F, out = ctx.saved_tensors
        need_x, need_w, need_b, need_f, _ = ctx.needs_input_grad[:5]
        spec: Spec = ctx.spec
        ops, rule = spec.ops, spec.rule
        if spec.dfa is not None:
            return _dfa_backward(ctx, dout, x, W, need_x, need_w, need_b, e)
        if spec.derive is not None and (need_x or spec.probe is not None):
            F = spec.derive(W)  # derived only where it is used: a first layer sends nothing
        x, W, F = _cast(dout.dtype, x, W, F)
        # while a recipe steps the layer (F needs no gradient then) the backward collects
        # what its step needs into the layer's state
        recipe = spec.recipe if ctx.collect else None
        kp = need_f and rule.kp
        need_f = need_f or recipe is not None
        xp = ops.pad(x)
        # (a derived F that is not used is None; the weight gradient only needs W's shape)
        dxp, dw, db = ops.backward(dout, xp, W if F is None else F, (need_x, need_w or kp, need_b))
        dx = ops.pad_T(dxp) if dxp is not None else None
        if spec.probe is not None:
            sent = dx if dx is not None else ops.pad_T(ops.core_T(dout, F, xp.shape))
            _record_angle(spec, sent, dout, W, xp.shape)
        df = None
        if need_f:
            # the paper's convention: the bias in both projections, the activity terms summed
            # over positions (averaged over the examples alone)
            bias = b.to(dout.dtype) if rule.paper and b is not None else None
            if rule.noise is not None:
                src = ops.pad(mirror_noise(x, rule, dout))
                y = ops.core(src, W)
                y = y if bias is None else ops.remove_bias(y, -bias)
            else:
                src = xp
                y = None if out is None else (out if b is None or bias is not None
                                              else ops.remove_bias(out, b))
                y = y if y is None else y.to(dout.dtype)
            n = (x.shape[0] if x.dim() > 1 else 1) if rule.paper else ops.num_samples(x, dout, W)
            if recipe is None:
                W_self = spec.self_weight().to(F.dtype) if spec.self_weight is not None \
                    else None
                df = terms.rule_grad(rule.coefficients, ops, src, W, F, y, n,
                                     base=dw if kp else None, W_self=W_self, bias=bias)
            else:
                collect(recipe, ops, src, W, F, y, n, ctx.collect, bias)
        return dx, dw if need_w else None, db, df, None, None, None


@torch.no_grad()
def collect(state, ops: LayerOps, src: Tensor, W: Tensor, F: Tensor, y: Tensor | None, n: int,
            iters: int, bias: Tensor | None = None) -> None:
    """What a feedback recipe's step needs from one backward call, added into the layer's
    :class:`~neuralign.layers.RecipeState`: the activity terms' gradient summed over the
    call's ``n`` samples (written into ``state.grad`` by the products themselves, where the
    family can: no fresh kernel-sized tensor a call), the samples, and for each data
    curvature the rule has (the input-patch Gram for sparse, the output Gram for null) the
    Gram summed over the samples applied to the state's probe vector. The step divides by
    the samples and takes the norm (the curvature) and the direction (the next probe: one
    power iteration a step). Sums over the calls are exactly one batch of all their samples:
    accumulated micro-batches, a recurrent layer's time steps.

    With ``iters > 1`` (before the recipe's first step on the layer) the probe first iterates
    ``iters - 1`` times on this call's batch, each product averaged over the processes of a
    distributed run (so that they keep one probe): a first step's curvature from one
    iteration on an arbitrary vector would be too small, and the step too long.

    ``bias`` (the paper's convention): the layer's bias, in both projections (``y`` holds
    it already). Only tensors are written, in place: a compiled backward has no Python side
    effect."""
    terms.rule_grad(state.terms, ops, src, W, F, y, 1, into=state.grad, bias=bias)
    state.samples.add_(n)
    if "sparse" in state.terms:
        _iterate(state.probe_in, state.gram_in, lambda u: ops.patch_gram(src, u), iters, True,
                 src.dtype)
    if "null" in state.terms and y is not None:
        out = y
        _iterate(state.probe_out, state.gram_out, lambda u: ops.output_gram(out, u, src.shape),
                 iters, False, src.dtype)


def _iterate(probe: Tensor, gram: Tensor, product: Callable[[Tensor], Tensor], iters: int,
             blocks: bool, dtype: torch.dtype) -> None:
    """``iters - 1`` power iterations of ``probe`` (written back), then ``product(probe)``
    added into ``gram``, the products in ``dtype`` (the backward's, under autocast)."""
    u = probe if probe.dtype == dtype else probe.to(dtype)
    for _ in range(iters - 1):
        u = unit_blocks(_mean_over_processes(product(u)), u, blocks)
    if iters > 1:
        probe.copy_(u)
    gram.add_(product(u))


def unit_blocks(h: Tensor, u: Tensor, blocks: bool) -> Tensor:
    """``h`` scaled to unit norm, and ``u`` where ``h`` is zero: the power iteration's next
    vector. With ``blocks``, each block alone (the sparse term's probe: one block per group,
    along the first dimension)."""
    lam = h.flatten(1).norm(dim=1).view(-1, *[1] * (h.dim() - 1)) if blocks else h.norm()
    return torch.where(lam > 0, h / lam.clamp_min(torch.finfo(lam.dtype).tiny), u)


def _mean_over_processes(t: Tensor) -> Tensor:
    """``t`` averaged over the processes of a distributed run (in place; ``t`` alone
    otherwise)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def _cast(dtype, *tensors):
    """The tensors in ``dtype`` (under autocast the output's dtype differs from the saved ones)."""
    if all(t is None or t.dtype == dtype for t in tensors):
        return tensors
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _record_angle(spec: Spec, sent: Tensor, dout: Tensor, W: Tensor, xp_shape) -> None:
    """Local gradient angle: what was sent down vs what W would send for the same error."""
    ops = spec.ops
    assert spec.probe is not None
    spec.probe.copy_(angle(sent, ops.pad_T(ops.core_T(dout, W.to(dout.dtype), xp_shape))))


def _dfa_backward(ctx, dout, x, W, need_x, need_w, need_b, e=None):
    """Direct feedback alignment: send ``D e`` down; W and b get their gradients from the error
    that reached this layer's output (which the layers above sent as their own ``D e``). ``e``
    comes as the gradient of the layer's tap (compiled), else from the pass's slot."""
    spec: Spec = ctx.spec
    ops = spec.ops
    x, W = _cast(dout.dtype, x, W)
    xp = ops.pad(x)
    _, dw, db = ops.backward(dout, xp, W, (False, need_w, need_b))
    dx = None
    if need_x or spec.probe is not None:
        if e is None:
            if ctx.slot is None or "e" not in ctx.slot:
                raise missing_error()
            e = ctx.slot["e"]
        n = x.shape[0] if x.dim() > 1 else 1
        # (a 1-D output of a batched input holds one value per example: [N] is [N, 1])
        outputs = e.shape[0] if e.dim() > 1 or (e.dim() == 1 and x.dim() > 1) else 1
        if outputs != n:
            raise examples_error(outputs, f"this layer's input {n} (input shape "
                                          f"{tuple(x.shape)})")
        e, = _cast(dout.dtype, e)
        dx = _project_error(ops, spec, e, n, x.shape)
        if spec.probe is not None:
            _record_angle(spec, dx, dout, W, xp.shape)
    return dx if need_x else None, dw if need_w else None, db, None, None, None, None


def _project_error(ops: LayerOps, spec: Spec, e: Tensor, n: int, shape: torch.Size) -> Tensor:
    """dfa's error for an input of ``shape`` (``n`` examples) from the output error ``e``."""
    assert spec.project is not None
    positions = tuple(ops.positions(shape)) if len(shape) > 1 else ()
    return ops.from_channels_last(
        project_error(e, n, positions, spec.project, spec.rule.dfa_scale), shape)


def feedback_forward(x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor,
                     spec: Spec, collect: int = 0) -> Tensor:
    """Apply the layer through :class:`FeedbackFunction` (a dfa layer in a compiled pass
    also hands its tap to the output marker: see :mod:`neuralign.dfa`). ``collect``: 0 for
    the rule's own backward, else the power iterations of the recipe's backward (see
    :func:`collect`)."""
    dfa = spec.dfa
    if dfa is not None and dfa.taps is not None and x.dim() > 1:
        out, tap = FeedbackFunction.apply(x, weight, bias, feedback, spec, 0, True)
        dfa.taps.append(tap)
        return out
    return FeedbackFunction.apply(x, weight, bias, feedback, spec, collect)
