"""CONTRIBUTING.md's worked examples run as written, in order, in one namespace; its layer
family, which writes only its forward map, gets the exact curvatures under the recipe."""

import math
import re
from pathlib import Path

import pytest
import torch

import neuralign as na
from neuralign import terms
from neuralign.layers import FEEDBACK_CLASSES
from neuralign.ops import OPS, ops_for
from neuralign.recipe import curvature
from neuralign.rules import _CATALOG

GUIDE = Path(__file__).parents[1] / "CONTRIBUTING.md"


@pytest.fixture(scope="module")
def example():
    """The guide's namespace after its blocks ran; the registries as they were afterwards."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(GUIDE), "exec"), namespace)
        yield namespace
    finally:
        cls = namespace.get("ScaledLinear")
        FEEDBACK_CLASSES.pop(cls, None)
        OPS.pop(cls, None)
        _CATALOG.pop("ia-light", None)


def test_contributing_examples_run(example):
    assert type(example["layer"]) is example["FeedbackScaledLinear"]
    assert example["rule"].name == "mine" and "ia-light" in na.list_rules()


def _layer(example, rule):
    torch.manual_seed(0)
    return na.convert(example["ScaledLinear"](3, 4).double(), rule)


def _gram(product, shape):
    """The matrix of a linear map on tensors of ``shape``, one basis vector at a time."""
    basis = torch.eye(math.prod(shape), dtype=torch.float64)
    return torch.stack([product(e.view(shape)).flatten() for e in basis], dim=1)


@pytest.mark.parametrize("term", ["sparse", "null"])
def test_the_example_s_curvature_products_are_its_gram_matrices(example, term):
    """The curvature products of the example's ops (derived from its forward alone) against
    Gram matrices built by brute force from the torch layer's own map ``A_K(x)``: ``JᵀJ`` for
    ``J`` the Jacobian in the kernel of ``A_K(x)`` (sparse) or of ``A_Kᵀ(y)`` (null), the term's
    Hessian times its samples. A shortcut of ``LinearOps`` (for ``y = x Wᵀ``) is 4 times too
    small for ``y = x (2W)ᵀ``."""
    layer = _layer(example, "aa")
    ops = ops_for(layer)
    x = torch.randn(6, 3, dtype=torch.float64)
    W = layer.weight.detach()
    zero = torch.zeros(4, dtype=torch.float64)

    def A(x, K):  # the torch layer's own forward, with kernel K and no bias
        return torch.func.functional_call(layer.to_module(), {"weight": K, "bias": zero}, (x,))

    y = A(x, W)
    if term == "sparse":
        J = torch.func.jacrev(lambda K: A(x, K))(W)
        got = _gram(lambda u: ops.patch_gram(x, u), ops.probe_shape(W))
    else:
        def adjoint(K):  # A_Kᵀ y, by autograd of <y, A_K(x)> in x
            return torch.func.grad(lambda x: (y * A(x, K)).sum())(x)

        J = torch.func.jacrev(adjoint)(W)
        got = ops.overlap * _gram(lambda u: ops.output_gram(y, u, x.shape),
                                  ops.output_probe_shape(W))
    J = J.reshape(-1, W.numel())
    want = J.T @ J
    # the top eigenvalue (the curvature the recipe reads), then the matrix itself
    torch.testing.assert_close(torch.linalg.eigvalsh(got)[-1], torch.linalg.eigvalsh(want)[-1],
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _recipe_curvature(layer, x, term):
    """The feedback recipe's estimate of the sparse or null term's data curvature for
    ``layer`` on the batch ``x``, its power iteration converged (the one place that knows
    where the recipe keeps it)."""
    opt = na.feedback_optimizer(layer)
    for _ in range(12):  # (8 power iterations a call until the first step)
        layer(x).sum().backward()
    for _ in range(20):  # (then one a step)
        opt.step()
        opt.zero_grad()
        layer(x).sum().backward()
    c = layer.rule.terms
    return (float(curvature(layer)) - c.get("decay", 0.0)) / c[term]


@pytest.mark.parametrize("name,term", [("aa", "sparse"), ("ia", "null")])
def test_the_recipe_s_curvature_for_the_example_is_the_dense_hessian_s(example, name, term):
    """aa's sparse and ia's null curvature (ia's mirror noise off, so that the reference sees
    the recipe's input) against the top eigenvalue of the Hessian in F of the term's loss
    form."""
    layer = _layer(example, na.get_rule(name, noise=None))
    x = torch.randn(8, 3, dtype=torch.float64)
    W = layer.weight.detach()

    def loss(f):
        return terms.loss(term, ops_for(layer), x, W, f.view_as(W))

    top = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(
        loss, W.flatten().clone()))[-1])
    est = _recipe_curvature(layer, x, term)
    assert top * (1 - 1e-6) <= est <= top * (1 + 1e-9), (top, est)


@pytest.mark.parametrize("name", ["sa", "aa", "ia"])
def test_the_example_s_feedback_settles_under_the_recipe_at_rate_1(example, name):
    """Each rule's recipe at rate 1, on one batch: sa sets F to W in one step; aa, whose step
    along the stiffest direction reaches the fixed point F = W, converges to it; ia (with
    its mirror noise) stays bounded. A curvature 4 times too small steps 4 times too far
    along that direction: aa and ia then diverge."""
    layer = _layer(example, na.get_rule(name, rate=1.0))
    with torch.no_grad():
        layer.weight.mul_(3)  # (ia: the null curvature well above the decay's)
    W = layer.weight.detach()
    opt = na.feedback_optimizer(layer)
    x = torch.randn(16, 3, dtype=torch.float64)
    gaps = []
    for _ in range(40):
        opt.zero_grad()
        layer(x).sum().backward()
        opt.step()
        gaps.append(float((layer.feedback.detach() - W).norm() / W.norm()))
    assert all(math.isfinite(g) for g in gaps), gaps
    if name == "sa":
        assert gaps[0] < 1e-12
    elif name == "aa":
        assert gaps[-1] < 1e-3, gaps
    else:  # ia's F: a ridge reconstruction, near W's scale, noisy
        assert max(gaps) < 2, gaps
