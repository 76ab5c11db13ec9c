"""ops: apply, apply_T and outer against the torch layers themselves and against each other;
the built-in families' fast paths against what LayerOps derives from their maps."""

import math

import pytest
import torch
import torch.nn.functional as F

from cases import LAYER_CASES, plain_forward
from neuralign.ops import DERIVED, ConvOps, ConvTransposeOps, LayerOps, LinearOps, _pad_T_dim, ops_for

CASES = [pytest.param(c, id=c.id) for c in LAYER_CASES]


def _batched(case, x):
    """ops act on batched inputs; the layers add the batch dimension of an unbatched conv input."""
    return x.unsqueeze(0) if not issubclass(case.cls, torch.nn.Linear) and \
        x.dim() == len(case.input_shape) and \
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
def test_scaled_outer_is_alpha_times_outer(case):
    layer, x = case.make(), _batched(case, case.input())
    ops = ops_for(layer)
    xp = ops.pad(x)
    dy = torch.randn_like(ops.core(xp, layer.weight))
    want = ops.core_outer(xp, dy)
    for alpha in (1.0, -0.3):
        _close(ops.scaled_outer(xp, dy, alpha), alpha * want)


@pytest.mark.parametrize("case", CASES)
def test_the_curvature_products_are_the_gram_matrices_applied(case):
    """``output_gram(y, u) = Σ_p y_p y_pᵀ u`` over examples and positions; ``patch_gram(x, u)
    = Σ_p patch_p patch_pᵀ u``, the kernel gradient of ``<v, apply(x, u)>`` at ``v =
    apply(x, u)`` (u a kernel with one output channel per group)."""
    layer, x = case.make(), _batched(case, case.input())
    ops = ops_for(layer)
    W = layer.weight.detach()
    if ops.output_probe_shape(W) == LayerOps.output_probe_shape(ops, W):
        pytest.skip("a family that derives its curvature products (the whole kernel)")
    xp = ops.pad(x)
    y = ops.core(xp, W)
    channels = ops.out_channels(W)
    rows = (y if issubclass(case.cls, torch.nn.Linear) else y.movedim(1, -1)).reshape(-1, channels)
    u = torch.randn(channels, dtype=y.dtype)
    _close(ops.output_gram(y, u), rows.t() @ (rows @ u))
    if "Transpose" in case.cls.__name__:
        return  # (its patch_gram reshapes u to its own kernel layout)
    K = torch.randn(ops.probe_shape(W), dtype=W.dtype, requires_grad=True)
    out = ops.core(xp, K)
    (want,) = torch.autograd.grad(out, K, out.detach())
    _close(ops.patch_gram(xp, K.detach()), want)


def _derived(ops):
    """The same map with nothing but what LayerOps derives from it: the ops as an instance of
    a subclass that writes the map again (the very same functions), which by the rule of
    LayerOps.__init_subclass__ keeps none of its parent's fast paths."""
    cls = type(ops)
    sub = type(f"Derived{cls.__name__}", (cls,), {"core": cls.core, "forward": cls.forward})
    derived = object.__new__(sub)
    derived.__dict__.update(ops.__dict__)
    for name in set(DERIVED) - {"core", "forward"}:
        assert getattr(sub, name) is getattr(LayerOps, name), name
    return derived


def _channel_blocks(ops, K):
    """The view of kernel ``K`` that holds each group's first output channel, in the layout of
    ``ops.probe_shape``: the built-in families' sparse probe (LayerOps's is the whole kernel)."""
    groups = ops.probe_shape(K)[0]
    if isinstance(ops, ConvTransposeOps):  # [in, out // groups, *kernel]
        return K.view(groups, -1, *K.shape[1:])[:, :, 0]
    return K.view(groups, -1, *K.shape[1:])[:, 0]  # [out, in // groups, *kernel]


def _top_eigenvalue(product, shape):
    """The top eigenvalue of a symmetric linear map on tensors of ``shape``, from its matrix."""
    basis = torch.eye(math.prod(shape), dtype=torch.float64)
    dense = torch.stack([product(e.view(shape)).flatten() for e in basis], dim=1)
    return torch.linalg.eigvalsh(dense)[-1]


@pytest.mark.parametrize("case", CASES)
def test_the_fast_paths_equal_what_layer_ops_derives(case):
    """Every built-in family's hand-written methods against LayerOps's, derived from the
    same map by torch.func: a test of the derived methods and an independent reference for
    the fast paths."""
    layer, x = case.make(), _batched(case, case.input())
    ops = ops_for(layer)
    derived = _derived(ops)
    W = layer.weight.detach()
    xp = ops.pad(x)
    K = torch.randn_like(W)
    y = ops.core(xp, W)
    dy = torch.randn_like(y)
    _close(derived.core_T(dy, K, xp.shape), ops.core_T(dy, K, xp.shape))
    _close(derived.apply_T(dy, K, x.shape), ops.apply_T(dy, K, x.shape))
    _close(derived.core_outer(xp, dy), ops.core_outer(xp, dy))
    _close(derived.scaled_outer(xp, dy, -0.3), ops.scaled_outer(xp, dy, -0.3))
    for got, want in zip(derived.backward(dy, xp, K, (True, True, True)),
                         ops.backward(dy, xp, K, (True, True, True)), strict=True):
        _close(got, want)
    _close(derived.bias_grad(dy), ops.bias_grad(dy))
    b = torch.randn(ops.out_channels(W), dtype=W.dtype)
    _close(derived.remove_bias(y, b), ops.remove_bias(y, b))
    if x.dim() > 1:  # (dfa's layout, for a batch)
        assert derived.positions(x.shape) == ops.positions(x.shape)
        v = torch.randn(x.shape[0], *ops.positions(x.shape), ops.in_channels(W), dtype=W.dtype)
        _close(derived.from_channels_last(v, x.shape), ops.from_channels_last(v, x.shape))

    # sparse: the fast path probes one output channel per group; the derived product (the
    # sparse term's Hessian on the whole kernel) on a kernel holding only those channels
    # gives the same there, and nothing elsewhere (the Hessian is block-diagonal over them)
    u = torch.randn(ops.probe_shape(W), dtype=W.dtype)
    if ops.probe_shape(W) == derived.probe_shape(W):  # (a family without that fast path)
        _close(derived.patch_gram(xp, u), ops.patch_gram(xp, u))
    else:
        probe = torch.zeros_like(W)
        _channel_blocks(ops, probe).copy_(u)
        h = derived.patch_gram(xp, probe[None])[0]
        _close(_channel_blocks(ops, h), ops.patch_gram(xp, u))
        _channel_blocks(ops, h).zero_()
        _close(h, torch.zeros_like(h))

    # null: the fast path is the outputs' Gram on [out_channels], which times the overlap
    # bounds the null term's Hessian (the derived product's): exactly so for a Linear layer,
    # whose Hessian is that Gram for every input feature alike
    if isinstance(ops, LinearOps):
        u, v = torch.randn(ops.out_channels(W), dtype=W.dtype), torch.randn(W.shape[1],
                                                                         dtype=W.dtype)
        got = derived.output_gram(y, torch.outer(u, v)[None], xp.shape)[0]
        _close(got, torch.outer(ops.output_gram(y, u, xp.shape), v))
    else:
        exact = _top_eigenvalue(lambda u: derived.output_gram(y, u, xp.shape),
                                derived.output_probe_shape(W))
        gram = _top_eigenvalue(lambda u: ops.output_gram(y, u, xp.shape),
                               ops.output_probe_shape(W))
        assert exact <= ops.overlap * gram * (1 + 1e-9), \
            (float(gram), float(exact), ops.overlap)


def test_a_subclass_with_its_own_map_keeps_none_of_its_parent_s_fast_paths():
    class Doubled(LinearOps):  # y = x (2W)ᵀ + b: LinearOps's shortcuts are wrong for it
        def forward(self, x, W, b):
            return F.linear(x, 2 * W, b)

    class Same(LinearOps):  # LinearOps's own map: its shortcuts hold
        pass

    for name in DERIVED:
        want = Doubled.__dict__["forward"] if name == "forward" else getattr(LayerOps, name)
        assert getattr(Doubled, name) is want, name
        assert getattr(Same, name) is getattr(LinearOps, name), name
    ops = Doubled.from_module(torch.nn.Linear(3, 4))
    x, y, K = torch.randn(5, 3), torch.randn(5, 4), torch.randn(4, 3)
    torch.testing.assert_close(ops.apply_T(y, K, x.shape), y @ (2 * K))
    torch.testing.assert_close(ops.outer(x, y), 2 * y.t() @ x)
    u = torch.randn(ops.probe_shape(K))  # the whole kernel: 4 x xᵀ for every unit
    torch.testing.assert_close(ops.patch_gram(x, u)[0], 4 * u[0] @ x.t() @ x)


def test_a_family_without_a_map_or_its_layout_is_refused_when_defined():
    with pytest.raises(TypeError, match="has no map"):
        class NoMap(LayerOps):
            channel_dim = 1
    with pytest.raises(TypeError, match="pads explicitly: write core"):
        class Padded(ConvOps):
            def forward(self, x, W, b):
                return F.conv1d(self.pad(x), W, b)
    with pytest.raises(TypeError, match="set channel_dim"):
        class NoChannels(LayerOps):
            def forward(self, x, W, b):
                return F.linear(x, W, b)


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
