"""ops: apply, apply_T and outer against the torch layers themselves and against each other."""

import pytest
import torch
import torch.nn.functional as F

from cases import LAYER_CASES, plain_forward
from neuralign.ops import _pad_T_dim, ops_for

CASES = [pytest.param(c, id=c.id) for c in LAYER_CASES]


def _batched(case, x):
    """ops act on batched inputs; the layers add the batch dimension of an unbatched conv input."""
    return x.unsqueeze(0) if case.cls is not torch.nn.Linear and x.dim() == len(case.input_shape) and \
        len(case.input_shape) == int(case.cls.__name__[-2]) + 1 else x


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_apply_is_the_layer_map_without_bias(case):
    layer, x = case.make(), _batched(case, case.input())
    K = torch.randn_like(layer.weight)
    _close(ops_for(layer).apply(x, K), plain_forward(layer, x, K))


@pytest.mark.parametrize("case", CASES)
def test_apply_T_and_outer_are_autograd_of_the_layer(case):
    layer, x = case.make(), _batched(case, case.input()).requires_grad_()
    K = torch.randn_like(layer.weight, requires_grad=True)
    y = plain_forward(layer, x, K)
    dy = torch.randn_like(y)
    gx, gK = torch.autograd.grad(y, (x, K), dy)
    ops = ops_for(layer)
    _close(ops.apply_T(dy, K.detach(), x.shape), gx)
    _close(ops.outer(x.detach(), dy), gK)


@pytest.mark.parametrize("case", CASES)
def test_adjoint_identities(case):
    layer, x = case.make(), _batched(case, case.input())
    ops = ops_for(layer)
    K = torch.randn_like(layer.weight)
    y = torch.randn_like(ops.apply(x, K))
    # <y, A_K x> = <A_K^T y, x> = <outer(x, y), K>
    lhs = (y * ops.apply(x, K)).sum()
    _close(lhs, (ops.apply_T(y, K, x.shape) * x).sum())
    _close(lhs, (ops.outer(x, y) * K).sum())


@pytest.mark.parametrize("case", [c for c in CASES if c.values[0].cls is not torch.nn.Linear])
def test_fused_backward_matches_the_three_ops(case):
    layer, x = case.make(), _batched(case, case.input())
    ops = ops_for(layer)
    K = torch.randn_like(layer.weight)
    xp = ops.pad(x)
    dy = torch.randn_like(ops.core(xp, K))
    dxp, dw, db = ops.backward(dy, xp, K, (True, True, True))
    _close(dxp, ops.core_T(dy, K, xp.shape))
    _close(dw, ops.core_outer(xp, dy))
    _close(db, ops.bias_grad(dy))
    only_x = ops.backward(dy, xp, K, (True, False, False))
    assert only_x[1] is None and only_x[2] is None
    _close(only_x[0], dxp)


@pytest.mark.parametrize("case", CASES)
def test_scaled_outer_is_alpha_times_outer_and_never_reads_out(case):
    layer, x = case.make(), _batched(case, case.input())
    ops = ops_for(layer)
    xp = ops.pad(x)
    dy = torch.randn_like(ops.core(xp, layer.weight))
    want = ops.core_outer(xp, dy)
    for alpha in (1.0, -0.3):
        out = torch.full_like(layer.weight, float("nan"))  # kept memory: its values unused
        got = ops.scaled_outer(xp, dy, alpha, out)
        _close(got, alpha * want)
        # a Linear layer's product goes into the given memory; the others' come fresh
        assert (got.data_ptr() == out.data_ptr()) == (case.cls is torch.nn.Linear)
        _close(ops.scaled_outer(xp, dy, alpha), alpha * want)


@pytest.mark.parametrize("case", CASES)
def test_the_curvature_products_are_the_gram_matrices_applied(case):
    """``output_gram(y, u) = Σ_p y_p y_pᵀ u`` over examples and positions; ``patch_gram(x, u)
    = Σ_p patch_p patch_pᵀ u``, the kernel gradient of ``<v, apply(x, u)>`` at ``v =
    apply(x, u)`` (u a kernel with one output channel per group)."""
    layer, x = case.make(), _batched(case, case.input())
    ops = ops_for(layer)
    W = layer.weight.detach()
    xp = ops.pad(x)
    y = ops.core(xp, W)
    channels = ops.out_channels(W)
    rows = (y if case.cls is torch.nn.Linear else y.movedim(1, -1)).reshape(-1, channels)
    u = torch.randn(channels, dtype=y.dtype)
    _close(ops.output_gram(y, u), rows.t() @ (rows @ u))
    if "Transpose" in case.cls.__name__:
        return  # (its patch_gram reshapes u to its own kernel layout)
    K = torch.randn(ops.probe_shape(W), dtype=W.dtype, requires_grad=True)
    out = ops.core(xp, K)
    (want,) = torch.autograd.grad(out, K, out.detach())
    _close(ops.patch_gram(xp, K.detach()), want)


# (dim, kernel, stride, dilation, padding, input size): each output a single position
ONE_POSITION = [(1, 3, 1, 1, 1, 1), (1, 5, 3, 2, 4, 3), (2, 3, 2, 1, 1, 2), (2, 1, 2, 1, 0, 2),
                (2, 3, 1, 2, 2, 1), (3, 3, 1, 1, 1, 1), (3, 2, 2, 1, 1, 1)]


@pytest.mark.parametrize("dim,k,stride,dilation,padding,n", ONE_POSITION)
def test_products_on_a_single_output_position(dim, k, stride, dilation, padding, n):
    """On a single output position the rules' weight-gradient-type products (outer, the
    sparse curvature's patch Gram) go one product per tap that reads inside the input,
    skipping the zero padding: the same as autograd of the convolution. The output Gram
    takes a Linear layer's two products there."""
    conv = getattr(torch.nn, f"Conv{dim}d")(3, 4, k, stride=stride, dilation=dilation,
                                             padding=padding, bias=False).double()
    ops = ops_for(conv)
    x = torch.randn(5, 3, *[n] * dim, dtype=torch.float64)
    K = conv.weight.detach().clone().requires_grad_()
    y = conv._conv_forward(x, K, None)
    assert y.shape[2:] == (1,) * dim
    assert ops._taps(x.shape[2:], y.shape[2:]) is not None  # (the path under test is taken)
    dy = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, K, dy)
    _close(ops.core_outer(x, dy), want)
    u = torch.randn(ops.probe_shape(K), dtype=torch.float64, requires_grad=True)
    v = conv._conv_forward(x, u, None)
    (want,) = torch.autograd.grad(v, u, v.detach())  # Σ_p patch_p patch_pᵀ u
    _close(ops.patch_gram(x, u.detach()), want)
    rows, w = y.detach().flatten(1), torch.randn(4, dtype=torch.float64)
    _close(ops.output_gram(y.detach(), w), rows.t() @ (rows @ w))


def test_taps_are_not_taken_where_onednn_s_product_is_faster():
    """A 2x2 output, a kernel reading mostly inside the input, groups: oneDNN's product."""
    for conv, n in [(torch.nn.Conv2d(4, 4, 3, padding=1), 2), (torch.nn.Conv2d(4, 4, 3), 3),
                    (torch.nn.Conv2d(4, 4, 3, padding=1, groups=2), 1)]:
        ops = ops_for(conv)
        x = torch.randn(2, 4, n, n)
        y = conv(x).detach()
        assert ops._outer_by_taps(x, y) is None
        _close(ops.core_outer(x, y), ops._conv_backward(y, x, conv.weight, (False, True, False))[1])


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("left,right", [(0, 2), (2, 1), (3, 3)])
def test_pad_adjoint_per_mode(mode, left, right):
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    padded = F.pad(x, (left, right), mode=mode)
    g = torch.randn_like(padded)
    (expected,) = torch.autograd.grad(padded, x, g)
    _close(_pad_T_dim(g, 2, left, right, mode), expected)


def test_ops_for_rejects_other_layers():
    with pytest.raises(TypeError, match="registered: Linear, Conv1d"):
        ops_for(torch.nn.Bilinear(2, 2, 2))
