"""Multi-head attention with feedback weights on its projections.

``nn.MultiheadAttention`` holds its query, key and value projections packed in one Parameter
(``in_proj_weight``, ``[3E, E]``; or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ) and
calls them, and its output projection, functionally: converting its ``out_proj`` child alone
would change nothing. :class:`FeedbackMultiheadAttention` gives each of the four projections
its own feedback layer (:class:`Projection`: a Linear map whose ``weight`` and ``bias`` are the
module's own Parameters, or slices of the packed ones, so gradients reach the very same
Parameters), and runs torch's own attention between them: ``F.multi_head_attention_forward``
with identity projections, so masks, ``add_bias_kv``, ``add_zero_attn``, dropout, ``need_weights``
and ``is_causal`` behave exactly as torch's. The attention itself (softmax(QKᵀ/√d)V, through
``scaled_dot_product_attention`` where torch uses it) keeps its ordinary backward: it holds no
weights. Where torch would return no weights and nothing needs its general path (no
``key_padding_mask``, ``add_bias_kv`` or ``add_zero_attn``), the module runs the attention
itself (heads split, ``scaled_dot_product_attention``, heads merged), as torch does between its
projections; otherwise torch's function runs with identity projections, at the cost of four
E×E products per token.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .layers import FEEDBACK_CLASSES, FeedbackLayer, shared_copy
from .rules import Rule, get_rule

__all__ = ["FeedbackMultiheadAttention", "Projection"]


class Projection(FeedbackLayer, nn.Linear):
    """One projection of a converted attention module, with its own feedback weight.

    Its ``weight`` (``[out, in]``) and ``bias`` are the attention module's Parameters, or rows
    of its packed ones, read at every call: the projection holds only ``feedback``.

    Args:
        weight: the Parameter holding W.
        rows: the rows of ``weight`` that are this projection's (None: all of them).
        bias: the Parameter holding the bias, or None.
        bias_rows: the entries of ``bias`` that are this projection's (None: all of them).
        rule: the feedback rule.
        generator: random generator for F's initialisation.
    """

    def __init__(self, weight: Tensor, rows: slice | None, bias: Tensor | None,
                 bias_rows: slice | None, rule: str | Rule, generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        # held outside the module's registries: the attention module owns these Parameters
        object.__setattr__(self, "_source", (weight, rows, bias, bias_rows))
        W = self.weight
        self.in_features, self.out_features = W.shape[1], W.shape[0]
        self._attach(get_rule(rule), generator)

    _source: tuple[Tensor, slice | None, Tensor | None, slice | None]

    @property  # type: ignore[override]
    def weight(self) -> Tensor:  # type: ignore[override]
        """W: the attention module's Parameter, or this projection's rows of it (a view)."""
        weight, rows, _, _ = self._source
        return weight if rows is None else weight[rows]

    @property  # type: ignore[override]
    def bias(self) -> Tensor | None:  # type: ignore[override]
        """The bias: the module's Parameter, this projection's entries of it, or None."""
        _, _, bias, rows = self._source
        if bias is None:
            return None
        return bias if rows is None else bias[rows]

    def to_module(self) -> nn.Module:
        raise TypeError("a Projection belongs to its attention module: revert that module")


def _rows(i: int, n: int) -> slice:
    return slice(i * n, (i + 1) * n)


class FeedbackMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose four projections send errors through feedback weights.

    Children ``q_feedback``, ``k_feedback``, ``v_feedback`` and ``o_feedback`` are
    :class:`Projection` layers over the module's own Parameters (each F in its W's layout,
    ``[E, E]``, ``[E, kdim]``, ``[E, vdim]``, ``[E, E]``). Under ``torch.no_grad()`` the module is
    torch's own (its fast path included).
    """

    q_feedback: Projection
    k_feedback: Projection
    v_feedback: Projection
    o_feedback: Projection

    @classmethod
    def from_module(cls, module: nn.Module, rule: str | Rule,
                    generator: torch.Generator | None = None) -> FeedbackMultiheadAttention:
        """A converted module sharing ``module``'s Parameters, hooks and state."""
        if type(module) is not nn.MultiheadAttention:
            raise TypeError(f"{cls.__name__}.from_module takes a MultiheadAttention, got "
                            f"{type(module).__name__}")
        new = shared_copy(cls, module)
        rule = get_rule(rule)
        E, b = module.embed_dim, module.in_proj_bias
        sources: list[tuple[Tensor, slice | None]]
        if module._qkv_same_embed_dim:
            sources = [(module.in_proj_weight, _rows(i, E)) for i in range(3)]
        else:
            sources = [(module.q_proj_weight, None), (module.k_proj_weight, None),
                       (module.v_proj_weight, None)]
        for i, (name, (w, rows)) in enumerate(zip("qkv", sources, strict=True)):
            setattr(new, f"{name}_feedback",
                    Projection(w, rows, b, _rows(i, E), rule, generator))
        out = module.out_proj
        new.o_feedback = Projection(out.weight, None, out.bias, None, rule, generator)
        return new

    def to_module(self) -> nn.Module:
        """The plain ``nn.MultiheadAttention``, sharing this module's Parameters and state."""
        plain = shared_copy(nn.MultiheadAttention, self)
        for name in ("q_feedback", "k_feedback", "v_feedback", "o_feedback"):
            plain._modules.pop(name, None)
        return plain

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if not torch.is_grad_enabled():  # no gradient: torch's module itself
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        batched = query.dim() == 3
        # the projections see the examples first, [N, L, E] (dfa reads the first dimension as
        # the examples); torch's attention takes [L, N, E]
        if batched and not self.batch_first:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        q, k, v = self.q_feedback(query), self.k_feedback(key), self.v_feedback(value)
        mask = self._fused_mask(q, k, attn_mask, is_causal) if (
            batched and not need_weights and key_padding_mask is None and self.bias_k is None
            and not self.add_zero_attn) else False
        if mask is not False:
            out, weights = self._attend(q, k, v, mask, is_causal and mask is None), None
        else:
            if batched:
                q, k, v = (t.transpose(1, 0) for t in (q, k, v))
            eye = torch.eye(self.embed_dim, dtype=q.dtype, device=q.device)
            out, weights = F.multi_head_attention_forward(
                q, k, v, self.embed_dim, self.num_heads, None, None, self.bias_k, self.bias_v,
                self.add_zero_attn, self.dropout, eye, None, training=self.training,
                key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, use_separate_proj_weight=True, q_proj_weight=eye,
                k_proj_weight=eye, v_proj_weight=eye,
                average_attn_weights=average_attn_weights, is_causal=is_causal)
            if batched:
                out = out.transpose(1, 0)
        out = self.o_feedback(out)
        if batched and not self.batch_first:
            out = out.transpose(1, 0)
        return out, weights

    # -- the fused path: the attention alone, without torch's (identity) projections ------------
    def _fused_mask(self, q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool
                    ) -> Tensor | None | Literal[False]:
        """The mask for :meth:`_attend` (None: none, or causal), or False where the fused path
        does not apply (a mask of another shape: torch's path raises its own error)."""
        if attn_mask is None:
            return False if is_causal else None  # (torch refuses the causal hint without a mask)
        if is_causal:  # torch drops the mask for the causal hint when no weights are returned
            return None
        n, length, source = q.shape[0], q.shape[1], k.shape[1]
        if attn_mask.shape not in ((length, source), (n * self.num_heads, length, source)):
            return False
        mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                 other_name="", target_type=q.dtype, check_other=False)
        assert mask is not None
        return mask.view(n, self.num_heads, length, source) if mask.dim() == 3 else mask

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool
                ) -> Tensor:
        """softmax(q kᵀ/√d + mask) v per head, through ``scaled_dot_product_attention``, on
        projected ``[N, L, E]`` inputs: what torch's attention does between its projections
        when it returns no weights."""
        n, length, E = q.shape
        heads = self.num_heads

        def split(t: Tensor) -> Tensor:  # [N, L, E] -> [N, heads, L, E / heads]
            return t.view(n, t.shape[1], heads, E // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(q), split(k), split(v), attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(n, length, E)


# convert maps the torch module to this one (not a FeedbackLayer: a container of four)
FEEDBACK_CLASSES[nn.MultiheadAttention] = FeedbackMultiheadAttention  # type: ignore[assignment]
