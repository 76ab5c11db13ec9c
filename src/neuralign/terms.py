"""The five terms of Kunin et al. (2020): loss forms and closed-form gradients, generic over ops.

``x`` is the layer's input, ``y = apply(x, W)`` its linear output before bias. Activity terms
(amp, null, sparse) average over samples, that is examples times positions (a convolution's
output positions, a Linear layer's leading dimensions), and sum over units. Averaging over
positions, not summing, keeps each rule's fixed point independent of a layer's spatial size:
weight mirror's F = (amp·σ²/decay)·W holds for a convolution as for a Linear layer, where a sum
would settle F at (number of positions)·W.

| term | R(F) | gradient with respect to F |
|---|---|---|
| decay | ½‖F‖² | F |
| amp | −E⟨y, apply(x, F)⟩ | −E outer(x, y) |
| null | ½E‖apply_T(y, F)‖² | E outer(apply_T(y, F), y) |
| sparse | ½E‖apply(x, F)‖² | E outer(x, apply(x, F)) |
| self | −⟨F, W⟩ | −W |

:func:`loss` and :func:`grad` are the definitions, one term at a time; :func:`rule_grad` is
what the backward pass computes: the weighted sum with terms that share an operand merged
before the expensive op.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .ops import LayerOps

TERMS = ("decay", "amp", "null", "sparse", "self")
ACTIVITY_TERMS = ("amp", "null", "sparse")


def _check(term: str) -> None:
    if term not in TERMS:
        raise ValueError(f"unknown term {term!r}; valid terms: {', '.join(TERMS)}")


def loss(term: str, ops: LayerOps, x: Tensor, W: Tensor, F: Tensor) -> Tensor:
    """The term's value R(F), differentiable in ``F`` (the reference for :func:`grad`)."""
    _check(term)
    if term == "decay":
        return 0.5 * F.pow(2).sum()
    if term == "self":
        return -(F * W).sum()
    y = ops.apply(x, W)
    n = ops.num_samples(x, y, W)
    if term == "amp":
        return -(y * ops.apply(x, F)).sum() / n
    if term == "null":
        return 0.5 * ops.apply_T(y, F, x.shape).pow(2).sum() / n
    return 0.5 * ops.apply(x, F).pow(2).sum() / n  # sparse


def grad(term: str, ops: LayerOps, x: Tensor, W: Tensor, F: Tensor) -> Tensor:
    """Closed-form gradient of :func:`loss` with respect to ``F``, in ``F``'s layout."""
    _check(term)
    if term == "decay":
        return F.clone()
    if term == "self":
        return -W.clone()
    y = ops.apply(x, W)
    n = ops.num_samples(x, y, W)
    if term == "amp":
        return -ops.outer(x, y) / n
    if term == "null":
        return ops.outer(ops.apply_T(y, F, x.shape), y) / n
    return ops.outer(x, ops.apply(x, F)) / n  # sparse


def _plus_bias(ops: LayerOps, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """``v + scale·bias``, the bias along the output channels (fresh)."""
    return ops.remove_bias(v, bias * -scale)


def rule_grad(
    coeffs: Mapping[str, float], ops: LayerOps, xp: Tensor, W: Tensor, F: Tensor, y: Tensor | None,
    n: int,
    base: Tensor | None = None, W_self: Tensor | None = None, into: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``Σ_t c_t ∇_F R_t``, merged: the fewest kernel-sized products.

    Args:
        coeffs: term name -> coefficient (missing terms are zero).
        ops: the layer's ops.
        xp: the (possibly noise) input, already padded by ``ops.pad``.
        W: the forward kernel.
        F: the feedback kernel, in ``W``'s layout.
        y: ``apply(x, W)`` for that input, before bias, or None (amp then folds into the
            kernel; null needs it).
        n: number of samples the activity terms average over (:meth:`~neuralign.ops.LayerOps.num_samples`).
        base: a kernel-shaped tensor added to the result, left unchanged (Kolen-Pollack's task
            share), or None.
        W_self: what the self term reads in place of ``W`` (an estimate Ŵ), or None for W.
        into: a kernel-shaped tensor (F's dtype) the result is added into and returned as,
            each product adding itself where the family can (the feedback recipe's sums over
            a step's backward calls), or None for a fresh result.
        bias: the paper's convention (:attr:`neuralign.rules.Rule.convention`): the layer's
            bias, added to both projections, ``y`` (which then holds it) and ``apply(x, F)``
            (sparse's); None (the library's convention, or a layer without bias) adds none.

    amp shares ``x`` with sparse and ``y`` with null: with null present, amp joins null as
    ``outer(null·apply_T(y, F) − amp·x, y)``; otherwise it joins sparse as
    ``outer(x, sparse·apply(x, F) − amp·y)``, or, without ``y``, as
    ``outer(x, apply(x, sparse·F − amp·W))``.
    """
    amp, null, sparse = (coeffs.get(t, 0.0) / n for t in ACTIVITY_TERMS)
    g = into

    def outer(a: Tensor, b: Tensor, alpha: float) -> Tensor:
        # alpha · outer(a, b), the scale in the product's own, added into `into` if given
        return ops.scaled_outer(a, b, alpha, into)

    def add(g: Tensor | None, h: Tensor) -> Tensor:
        return h if g is None or g is h else g.add_(h)

    if null:
        assert y is not None, "null needs the output y"
        u = ops.pad(ops.pad_T(ops.core_T(y, F, xp.shape)))  # (fresh: may change in place)
        h = outer(u if not amp else u.sub_(xp, alpha=amp / null), y, null)
        g = add(g, h)
        amp = 0.0
    if sparse or amp:
        if amp and y is None:  # amp on the data, the output not kept: x (sparse F − amp W)ᵀ
            K = torch.mul(W, -amp) if not sparse else torch.sub(F, W, alpha=amp / sparse)
            v = ops.core(xp, K)
            if bias is not None:  # (sparse·(Fx + b) − amp·(Wx + b), over sparse)
                v = _plus_bias(ops, v, bias, 1 - amp / sparse if sparse else -amp)
            h = outer(xp, v, sparse or 1.0)
        elif not sparse:  # amp alone, on the output: its scale in the product's
            assert y is not None
            h = outer(xp, y, -amp)
        else:  # x (sparse·apply(x, F) − amp·y)ᵀ, sparse in the product's scale
            v = ops.core(xp, F)
            v = v if bias is None else _plus_bias(ops, v, bias, 1.0)
            h = outer(xp, v.sub_(y, alpha=amp / sparse) if y is not None and amp else v, sparse)
        g = add(g, h)
    if g is not None and g.dtype != F.dtype:  # under autocast: accumulate in F's own dtype
        g = g.to(F.dtype)
    # The elementwise terms: each a single pass over the kernel, with no extra temporary
    # (on weight-bound models every pass over F costs a few percent of a step).
    decay, self_ = coeffs.get("decay", 0.0), coeffs.get("self", 0.0)
    if W_self is not None:
        W = W_self  # (the activity terms above used the real W: it is the forward's)
    if base is not None:  # the first elementwise op writes a fresh tensor; base stays as it is
        if g is not None:
            g.add_(base)
        elif decay:
            g, decay = torch.add(base, F, alpha=decay), 0.0
        elif self_:
            g, self_ = torch.sub(base, W, alpha=self_), 0.0
        else:
            g = base.clone()
    if g is None and decay and self_:  # decay·F − self·W = decay·(F − (self/decay)·W)
        g = torch.sub(F, W, alpha=self_ / decay)
        return g if decay == 1 else g.mul_(decay)
    if decay:
        g = F * decay if g is None else g.add_(F, alpha=decay)
    if self_:
        g = W * -self_ if g is None else g.sub_(W, alpha=self_)
    return g if g is not None else torch.zeros_like(F)
