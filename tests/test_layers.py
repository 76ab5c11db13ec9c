"""Feedback layers: same forward as the torch layer; with F = W, exactly backprop's gradients;
with any F, the error goes down through F."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import neuralign as na
from cases import LAYER_CASES, plain_forward
from neuralign import terms as T
from neuralign.autograd import FeedbackFunction, Spec
from neuralign.layers import FeedbackLayer
from neuralign.ops import ConvTransposeOps, ops_for

CASES = [pytest.param(c, id=c.id) for c in LAYER_CASES]


def _backprop(layer, x, dy):
    """Plain autograd through the torch layer: (dx, dW, db)."""
    x = x.detach().requires_grad_()
    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    grads = torch.autograd.grad(layer(x), [x, *params], dy)
    return grads[0], grads[1], grads[2] if layer.bias is not None else None


def _run(layer, x, dy):
    x = x.detach().requires_grad_()
    layer.zero_grad(set_to_none=True)
    layer(x).backward(dy)
    return x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


@pytest.mark.parametrize("rule", ["fa", "ia", "aa", "kp", "usf"])
@pytest.mark.parametrize("case", CASES)
def test_forward_is_the_torch_layer_bit_for_bit(case, rule):
    plain, x = case.make(), case.input()
    layer = na.convert(plain, rule)
    assert isinstance(layer, FeedbackLayer) and isinstance(layer, type(plain))
    assert torch.equal(layer(x), plain(x))
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))


@pytest.mark.parametrize("case", CASES)
def test_feedback_equal_to_weight_is_exact_backprop(case):
    plain, x = case.make(), case.input()
    layer = na.convert(plain, na.get_rule("fa", init="weight"))
    assert torch.equal(layer.feedback, layer.weight)
    dy = torch.randn_like(plain(x))
    for got, want in zip(_run(layer, x, dy), _backprop(plain, x, dy), strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", ["fa", "sa", "wm", "kp", "frsf"])
@pytest.mark.parametrize("case", CASES)
def test_error_goes_down_through_feedback(case, rule):
    plain, x = case.make(), case.input()
    layer = na.convert(plain, rule)
    dy = torch.randn_like(plain(x))
    dx, dW, db = _run(layer, x, dy)
    F = layer.feedback.detach()
    assert not torch.allclose(F, layer.weight)
    xr = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(plain_forward(plain, xr, F), xr, dy)  # the torch layer with W := F
    torch.testing.assert_close(dx, want, rtol=1e-12, atol=1e-12)
    # W and b get backprop's own gradients whatever the rule
    _, dW_bp, db_bp = _backprop(plain, x, dy)
    torch.testing.assert_close(dW, dW_bp, rtol=1e-12, atol=1e-12)
    if db_bp is not None:
        torch.testing.assert_close(db, db_bp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_of_the_function(case):
    layer, x = case.make(), case.input()
    if layer.weight.dim() > 2 and x.dim() == layer.weight.dim() - 1:
        x = x.unsqueeze(0)
    spec = Spec(ops_for(layer), na.get_rule("fa"))
    W = layer.weight.detach().clone().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    F = W.detach().clone()  # F = W: the Function's Jacobian must then be the true one
    inputs = (x.requires_grad_(), W) + ((b,) if b is not None else ())

    def f(x, W, b=None):
        return FeedbackFunction.apply(x, W, b, F, spec)

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_no_rule_work_without_gradient(monkeypatch):
    layer = na.convert(nn.Linear(4, 3), "ia")

    def boom(*args, **kwargs):
        raise AssertionError("the Function ran")

    monkeypatch.setattr(FeedbackFunction, "apply", boom)
    with torch.no_grad():
        layer(torch.randn(2, 4))
    layer.eval()
    with torch.inference_mode():
        layer(torch.randn(2, 4))


@pytest.mark.parametrize("rule", ["fa", "usf", "brsf", "frsf"])
def test_no_rule_gradient_for_rules_that_need_none(rule, monkeypatch):
    import neuralign.terms

    def boom(*args, **kwargs):
        raise AssertionError("rule gradient computed")

    monkeypatch.setattr(neuralign.terms, "rule_grad", boom)
    layer = na.convert(nn.Conv2d(2, 3, 3), rule)
    layer(torch.randn(2, 2, 5, 5, requires_grad=True)).sum().backward()
    assert not layer.feedback.requires_grad and layer.feedback.grad is None
    assert "feedback" in dict(layer.named_buffers())


def test_from_module_shares_parameters_and_to_module_goes_back():
    plain = nn.Conv1d(3, 4, 3, padding=1)
    hook_calls = []
    plain.register_forward_hook(lambda *a: hook_calls.append(1))
    layer = na.FeedbackConv1d.from_module(plain, "sa")
    assert layer.weight is plain.weight and layer.bias is plain.bias
    assert isinstance(layer.feedback, nn.Parameter) and layer.feedback.shape == plain.weight.shape
    layer(torch.randn(2, 3, 5))
    assert hook_calls == [1]
    back = layer.to_module()
    assert type(back) is nn.Conv1d and back.weight is plain.weight
    assert "feedback" not in back.state_dict() and not hasattr(back, "rule")
    with pytest.raises(TypeError, match="takes a Conv1d"):
        na.FeedbackConv1d.from_module(nn.Conv2d(1, 1, 1), "fa")


def test_a_parametrized_weight_is_the_weight_the_layer_uses():
    """The layer reads W, b and F from its dicts; a parametrized weight (torch's
    ``parametrize``), which they do not hold, is read through the module's lookup."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, X):
            return 2 * X

    torch.manual_seed(0)
    layer = na.convert(nn.Linear(4, 3).double(), na.get_rule("fa"))
    parametrize.register_parametrization(layer, "weight", Double())
    W0 = layer.parametrizations.weight.original
    x = torch.randn(5, 4, dtype=torch.float64)
    out = layer(x)
    torch.testing.assert_close(out, x @ (2 * W0).T + layer.bias)
    dy = torch.randn_like(out)
    out.backward(dy)
    torch.testing.assert_close(W0.grad, 2 * dy.T @ x)  # through the parametrization


def test_layers_can_be_built_directly():
    layer = na.FeedbackLinear(4, 3, rule="kp")
    assert layer.rule.name == "kp" and layer.feedback.requires_grad
    with pytest.raises(ValueError, match="keep the plain torch layer"):
        na.FeedbackLinear(4, 3, rule="bp")


def test_default_init_is_an_independent_draw_of_the_layer_init():
    torch.manual_seed(0)
    layer = na.FeedbackLinear(400, 300, rule="fa")
    bound = 1 / 400 ** 0.5  # nn.Linear's weight init is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    F = layer.feedback
    assert F.abs().max() <= bound and F.abs().max() > 0.99 * bound
    assert abs(F.std().item() - bound / 3 ** 0.5) < 0.01 * bound
    assert na.metrics.angle(F, layer.weight) > 85  # independent of W


@pytest.mark.parametrize("init", ["kaiming_normal", "xavier_uniform", "weight"])
def test_other_inits(init):
    layer = na.FeedbackConv2d(3, 8, 3, rule=na.get_rule("fa", init=init))
    if init == "weight":
        assert torch.equal(layer.feedback, layer.weight)
    else:
        assert not torch.equal(layer.feedback, layer.weight)


def test_channels_last_gives_the_same_gradients():
    plain = nn.Conv2d(3, 5, 3, padding=1).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    layer = na.convert(plain, "aa")
    dy = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    a = _run(layer, x, dy) + (layer.feedback.grad.clone(),)
    lcl = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    b = _run(lcl, x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last))
    b = b + (lcl.feedback.grad,)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def _autocast_grads(model, x, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    out.float().square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_autocast_bf16_with_feedback_equal_to_weight_is_plain_autocast():
    plain, x = _small_cnn(), torch.randn(4, 3, 6, 6)
    model = na.convert(plain, na.get_rule("fa", init="weight"))
    want, got = _autocast_grads(plain, x, True), _autocast_grads(model, x, True)
    for n, g in want.items():
        assert got[n].dtype == torch.float32
        assert _rel(got[n], g) < 1e-2, n


@pytest.mark.parametrize("rule", ["fa", "aa", "kp", "sa", "brsf"])
def test_autocast_bf16(rule):
    plain, x = _small_cnn(), torch.randn(4, 3, 6, 6)
    # bf16's own error on this model, measured on plain backprop
    tol = 3 * max(_rel(_autocast_grads(plain, x, True)[n], g)
                  for n, g in _autocast_grads(plain, x, False).items()) + 0.02
    model = na.convert(plain, rule)
    if rule == "brsf":  # fresh random magnitudes each batch: use the same draw in both runs
        torch.manual_seed(1)
    ref = _autocast_grads(model, x, False)
    if rule == "brsf":
        torch.manual_seed(1)
    got = _autocast_grads(model, x, True)
    for n, p in model.named_parameters():
        assert got[n].dtype == p.dtype == torch.float32, n
        assert _rel(got[n], ref[n]) < tol, (n, _rel(got[n], ref[n]), tol)


def test_autocast_bf16_with_mirror_noise_runs():
    model = na.convert(_small_cnn(), "ia")
    grads = _autocast_grads(model, torch.randn(4, 3, 6, 6), True)
    assert all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads.values())
    assert grads["0.feedback"].abs().sum() > 0


# -- random layer configurations (hypothesis): F = W is exact backprop for any of them ----------
def _assert_exact_with_feedback_equal_to_weight(plain, x, out):
    """The layer converted with F = W gives autograd's (dx, dW, db) for a random output error."""
    layer = na.convert(plain, na.get_rule("sa", init="weight"))
    dy = torch.randn_like(out)
    want, got = _backprop(plain, x, dy), _run(layer, x, dy)
    for a, b in zip(want, got, strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


# what every convolution case draws (the ordinary and the transposed ones add their own)
_CONV_COMMON = {
    "dim": st.sampled_from([1, 2, 3]),
    "groups": st.sampled_from([1, 2]),
    "per_group_in": st.integers(1, 2),
    "per_group_out": st.integers(1, 2),
    "kernel": st.integers(1, 3),
    "dilation": st.integers(1, 2),
    "bias": st.booleans(),
}
_conv_config = st.fixed_dictionaries({
    **_CONV_COMMON,
    "stride": st.integers(1, 2),
    "padding": st.sampled_from([0, 1, 2, "same", "valid"]),
    "padding_mode": st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    "size": st.integers(5, 8),
})


@settings(max_examples=60, deadline=None, derandomize=True)
@given(_conv_config)
def test_any_conv_with_feedback_equal_to_weight_is_exact_backprop(c):
    if c["padding"] == "same" and c["stride"] > 1:
        return  # torch refuses 'same' with stride > 1
    pad = c["padding"] if isinstance(c["padding"], int) else (
        c["dilation"] * (c["kernel"] - 1) if c["padding"] == "same" else 0)
    if c["padding_mode"] == "reflect" and pad >= c["size"]:
        return  # reflect padding must be smaller than the input
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[c["dim"]]
    torch.manual_seed(0)
    plain = conv(c["groups"] * c["per_group_in"], c["groups"] * c["per_group_out"], c["kernel"],
                 stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
                 groups=c["groups"], bias=c["bias"], padding_mode=c["padding_mode"]).double()
    x = torch.randn(2, plain.in_channels, *[c["size"]] * c["dim"], dtype=torch.float64)
    out = plain(x)
    if out.numel() == 0:
        return
    _assert_exact_with_feedback_equal_to_weight(plain, x, out)


_conv_t_config = st.fixed_dictionaries({
    **_CONV_COMMON,
    "stride": st.integers(1, 3),
    "padding": st.integers(0, 2),
    "output_padding": st.integers(0, 2),
    "size": st.integers(2, 5),
})


@settings(max_examples=60, deadline=None, derandomize=True)
@given(_conv_t_config)
def test_any_transposed_conv_with_feedback_equal_to_weight_is_exact_backprop(c):
    if c["output_padding"] >= max(c["stride"], c["dilation"]):
        return  # torch: output padding must be smaller than stride or dilation
    conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[c["dim"]]
    torch.manual_seed(0)
    plain = conv(c["groups"] * c["per_group_in"], c["groups"] * c["per_group_out"], c["kernel"],
                 stride=c["stride"], padding=c["padding"], output_padding=c["output_padding"],
                 dilation=c["dilation"], groups=c["groups"], bias=c["bias"]).double()
    x = torch.randn(2, plain.in_channels, *[c["size"]] * c["dim"], dtype=torch.float64)
    try:
        out = plain(x)
    except RuntimeError:
        return  # an output size below one: torch refuses the configuration
    _assert_exact_with_feedback_equal_to_weight(plain, x, out)


def test_transposed_conv_output_size_picks_its_output_padding():
    """``forward(x, output_size)`` asks for another output padding than the layer's: the same
    output as torch's and, with F = W, autograd's gradients; F's rule gradient too."""
    torch.manual_seed(0)
    plain = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1).double()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    size = [10, 8]  # output_padding (1, 1); the layer's own is (0, 0), giving 9 x 7
    want_out = plain(x, output_size=size)
    assert want_out.shape[-2:] == tuple(size)
    layer = na.convert(plain, na.get_rule("sa", init="weight"))
    torch.testing.assert_close(layer(x, output_size=size), want_out, rtol=0, atol=0)
    dy = torch.randn_like(want_out)
    xr = x.clone().requires_grad_()
    layer(xr, output_size=size).backward(dy)
    want = torch.autograd.grad(plain(x.clone().requires_grad_(), output_size=size),
                               [plain.weight, plain.bias], dy)
    torch.testing.assert_close(layer.weight.grad, want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, want[1], rtol=1e-10, atol=1e-10)
    # an activity rule's gradient at that output size: the closed form against the loss form
    aa = na.convert(plain, "aa")
    aa(x, output_size=size).sum().backward()
    ops = ConvTransposeOps.from_module(plain, output_padding=(1, 1))
    W, F = plain.weight.detach(), aa.feedback.detach().clone().requires_grad_()
    loss = T.loss("amp", ops, x, W, F) + T.loss("sparse", ops, x, W, F)
    torch.testing.assert_close(aa.feedback.grad, torch.autograd.grad(loss, F)[0], rtol=1e-9,
                               atol=1e-12)
    with torch.no_grad():  # no gradient: the torch layer itself
        torch.testing.assert_close(layer(x, output_size=size), want_out, rtol=0, atol=0)


@pytest.mark.parametrize("rule", [r for r in na.list_rules() if r != "bp"])
def test_no_rule_keeps_an_activation_that_backprop_does_not(rule):
    """What the forward saves for the backward, beyond parameter-sized tensors, is what plain
    backprop saves: no rule keeps an extra activation-sized tensor (aa's amp folds into the
    kernel instead of keeping the layer's output, here larger than W: 9 x 7 against 7 x 6 and
    5 x 7)."""
    def saved_activations(model, x):
        sizes = []

        def pack(t):
            if not isinstance(t, nn.Parameter) and t.shape[:1] == x.shape[:1]:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sorted(sizes)

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5))
    model = na.convert(copy.deepcopy(plain), rule)
    if na.param_groups(model)["feedback"]:
        na.feedback_optimizer(model)  # the recipe's backward, as trained
    x = torch.randn(9, 6, requires_grad=True)
    assert saved_activations(model, x) == saved_activations(plain, x)
