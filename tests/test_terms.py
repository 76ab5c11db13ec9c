"""terms: every closed-form gradient equals autograd of its loss form, on every layer type, and
the merged rule gradient equals the weighted sum of the terms."""

import itertools

import pytest
import torch

from cases import LAYER_CASES
from neuralign import terms
from neuralign.ops import ops_for
from test_ops import _batched

CASES = [pytest.param(c, id=c.id) for c in LAYER_CASES]


def _setup(case):
    layer = case.make()
    x = _batched(case, case.input())
    W = layer.weight.detach()
    F = torch.randn_like(W)
    return ops_for(layer), x, W, F


@pytest.mark.parametrize("term", terms.TERMS)
@pytest.mark.parametrize("case", CASES)
def test_closed_form_equals_autograd_of_loss(case, term):
    ops, x, W, F = _setup(case)
    Fv = F.clone().requires_grad_()
    (expected,) = torch.autograd.grad(terms.loss(term, ops, x, W, Fv), Fv)
    got = terms.grad(term, ops, x, W, F)
    assert got.shape == W.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert got.abs().sum() > 0  # a zero gradient would pass trivially


SUBSETS = [s for r in range(1, 6) for s in itertools.combinations(terms.TERMS, r)]


@pytest.mark.parametrize("subset", SUBSETS, ids="+".join)
@pytest.mark.parametrize("case", [c for c in CASES if c.id in
                                  ("linear-3d", "conv1d-circular", "conv2d-same-even-dil",
                                   "conv2d-depthwise", "conv3d")])
def test_merged_rule_grad_is_the_weighted_sum(case, subset):
    ops, x, W, F = _setup(case)
    coeffs = {t: c for t, c in zip(subset, (0.7, -1.3, 2.1, 0.4, 1.9), strict=False)}
    expected = sum(c * terms.grad(t, ops, x, W, F) for t, c in coeffs.items())
    y = ops.apply(x, W)
    got = terms.rule_grad(coeffs, ops, ops.pad(x), W, F, y, ops.num_samples(x, y, W))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    if "null" not in subset:  # without the output (the backward keeps none): amp in the kernel
        got = terms.rule_grad(coeffs, ops, ops.pad(x), W, F, None, ops.num_samples(x, y, W))
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_activity_terms_average_over_examples():
    # Doubling the batch with a copy of itself leaves every activity term unchanged.
    ops, x, W, F = _setup(LAYER_CASES[0])
    for t in terms.ACTIVITY_TERMS:
        torch.testing.assert_close(terms.loss(t, ops, torch.cat([x, x]), W, F),
                                   terms.loss(t, ops, x, W, F))


def test_fixed_points_of_the_closed_forms():
    # sa: self + decay vanishes at F = W; aa: amp + sparse vanishes at F = W.
    ops, x, W, _ = _setup(LAYER_CASES[0])
    zero = torch.zeros_like(W)
    for coeffs in ({"self": 1.0, "decay": 1.0}, {"amp": 1.0, "sparse": 1.0}):
        g = terms.rule_grad(coeffs, ops, x, W, W, ops.apply(x, W), x.shape[0])
        torch.testing.assert_close(g, zero, rtol=0, atol=1e-12)


def test_unknown_term_is_rejected():
    ops, x, W, F = _setup(LAYER_CASES[0])
    with pytest.raises(ValueError, match="valid terms: decay, amp, null, sparse, self"):
        terms.loss("mirror", ops, x, W, F)


@pytest.mark.parametrize("subset", [("decay",), ("self",), ("decay", "self"), ("amp", "decay")],
                         ids="+".join)
def test_rule_grad_adds_base_and_leaves_it_unchanged(subset):
    ops, x, W, F = _setup(LAYER_CASES[0])
    coeffs = {t: c for t, c in zip(subset, (0.3, 1.7), strict=False)}
    base = torch.randn_like(W)
    kept = base.clone()
    y = ops.apply(x, W)
    got = terms.rule_grad(coeffs, ops, x, W, F, y, x.shape[0], base=base)
    want = kept + terms.rule_grad(coeffs, ops, x, W, F, y, x.shape[0])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(base, kept)
