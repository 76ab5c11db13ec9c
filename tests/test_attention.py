"""Multi-head attention: the converted module is torch's forward, with F = W exactly torch's
gradients, with any F the errors go down through F; it reverts, saves and trains."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import neuralign as na
from neuralign.attention import FeedbackMultiheadAttention, Projection
from runs import train_with_recipe

E, HEADS, L, S, B = 8, 2, 4, 5, 3

# module options x call options; every combination the two loops below build
MODULES = [dict(), dict(batch_first=True), dict(kdim=5, vdim=3), dict(bias=False),
           dict(add_bias_kv=True), dict(add_zero_attn=True), dict(add_bias_kv=True, bias=False)]
CALLS = [dict(), dict(need_weights=False), dict(average_attn_weights=False),
         dict(attn_mask="bool2d"), dict(attn_mask="bool2d", need_weights=False),
         dict(attn_mask="float3d", need_weights=False),
         dict(key_padding_mask=True), dict(attn_mask="causal", is_causal=True, need_weights=False),
         dict(self_attention=True), dict(unbatched=True)]


def _inputs(module: nn.MultiheadAttention, call: dict, gen: torch.Generator):
    call = dict(call)
    unbatched, self_attn = call.pop("unbatched", False), call.pop("self_attention", False)
    bf = module.batch_first and not unbatched

    def seq(n, d):
        shape = (n, d) if unbatched else (B, n, d) if bf else (n, B, d)
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    if self_attn and module._qkv_same_embed_dim:
        q = k = v = seq(L, E)
        src = L
    else:
        q, k, v, src = seq(L, E), seq(S, module.kdim), seq(S, module.vdim), S
    mask = call.get("attn_mask")
    if mask == "bool2d":
        call["attn_mask"] = torch.rand(L, src, generator=gen) < 0.3
    elif mask == "float3d":
        call["attn_mask"] = torch.randn(B * HEADS, L, src, generator=gen, dtype=torch.float64)
    elif mask == "causal":
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(
            L, dtype=torch.float64) if src == L else None
        if call["attn_mask"] is None:  # causal needs a square mask
            call.pop("attn_mask"), call.pop("is_causal")
    if call.get("key_padding_mask"):
        kpm = torch.zeros(B, src, dtype=torch.bool)
        kpm[0, -1] = kpm[2, -2:] = True
        call["key_padding_mask"] = kpm[0] if unbatched else kpm
    return (q, k, v), call


CASES = [pytest.param(m, c, id=f"{'-'.join(map(str, m.items())) or 'plain'}|"
                                f"{'-'.join(map(str, c)) or 'default'}")
         for m, c in itertools.product(MODULES, CALLS)
         if not (c.get("self_attention") and "kdim" in m)
         and not (c.get("unbatched") and m.get("add_bias_kv"))]


def _pair(module_kwargs, rule):
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(E, HEADS, **module_kwargs).double()
    with torch.no_grad():  # non-zero biases, so bias handling is visible
        for name, p in plain.named_parameters():
            if "bias" in name:
                p.normal_()
    return plain, na.convert(plain, rule)


@pytest.mark.parametrize("module_kwargs,call", CASES)
def test_forward_and_gradients_with_feedback_equal_to_weight_are_torch(module_kwargs, call):
    plain, conv = _pair(module_kwargs, na.get_rule("sa", init="weight"))
    inputs, kwargs = _inputs(plain, call, torch.Generator().manual_seed(1))
    want_out, want_w = plain(*inputs, **kwargs)
    got_out, got_w = conv(*inputs, **kwargs)
    torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
    if want_w is None:
        assert got_w is None
    else:
        torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    if inputs[0] is inputs[1]:
        xs = [xs[0]] * 3
    dy = torch.randn_like(want_out)
    plain_params = list(plain.parameters())
    conv_params = [p for n, p in conv.named_parameters() if not n.endswith("feedback")]
    for a, b in zip(plain_params, conv_params, strict=True):  # (convert copied them)
        assert torch.equal(a, b)
    unique = list(dict.fromkeys(xs))
    want = torch.autograd.grad(plain(*xs, **kwargs)[0], unique + plain_params, dy)
    got = torch.autograd.grad(conv(*xs, **kwargs)[0], unique + conv_params, dy)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def _fused(module_kwargs: dict, call: dict) -> bool:
    """Whether the converted module runs the attention itself (no torch function, no identity
    projections): batched, no weights returned, no key padding, bias_kv or zero attention."""
    return (call.get("need_weights") is False and not call.get("unbatched")
            and not call.get("key_padding_mask") and not module_kwargs.get("add_bias_kv")
            and not module_kwargs.get("add_zero_attn"))


def test_the_cases_run_both_paths(monkeypatch):
    """The equality cases above cover the fused path and torch's: the fused ones run without
    F.multi_head_attention_forward, the others with it."""
    import neuralign.attention as attention

    calls = []
    original = attention.F.multi_head_attention_forward
    monkeypatch.setattr(attention.F, "multi_head_attention_forward",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    fused = 0
    for param in CASES:
        module_kwargs, call = param.values
        plain, conv = _pair(module_kwargs, "fa")
        inputs, kwargs = _inputs(plain, call, torch.Generator().manual_seed(1))
        calls.clear()
        conv(*inputs, **kwargs)
        assert bool(calls) != _fused(module_kwargs, call), param.id
        fused += _fused(module_kwargs, call)
    assert fused >= 8


def _through(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, Fb: torch.Tensor):
    """x Wᵀ + b forward, errors back through Fb (an independent autograd construction)."""
    y = x @ Fb.T + (x @ (W - Fb).T).detach()
    return y if b is None else y + b


def test_errors_go_down_through_each_projections_feedback():
    """Random F: the inputs' gradients are those of a reference whose four projections
    compute x Wᵀ + b and send errors back through their own F (built from autograd alone)."""
    plain, conv = _pair(dict(kdim=5, vdim=3), "fa")
    q, k, v = (torch.randn(L, B, E, dtype=torch.float64), torch.randn(S, B, 5, dtype=torch.float64),
               torch.randn(S, B, 3, dtype=torch.float64))
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out, _ = conv(qs, ks, vs, need_weights=False)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, [qs, ks, vs], dy)

    bq, bk, bv = plain.in_proj_bias.detach().chunk(3)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    pq = _through(qr, plain.q_proj_weight.detach(), bq, conv.q_feedback.feedback.detach())
    pk = _through(kr, plain.k_proj_weight.detach(), bk, conv.k_feedback.feedback.detach())
    pv = _through(vr, plain.v_proj_weight.detach(), bv, conv.v_feedback.feedback.detach())
    eye = torch.eye(E, dtype=torch.float64)
    att, _ = F.multi_head_attention_forward(
        pq, pk, pv, E, HEADS, None, None, None, None, False, 0.0, eye, None, training=False,
        need_weights=False, use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
        v_proj_weight=eye)
    ref = _through(att, plain.out_proj.weight.detach(), plain.out_proj.bias.detach(),
                   conv.o_feedback.feedback.detach())
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(ref, [qr, kr, vr], dy)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    qp = q.clone().requires_grad_()  # and backprop's would differ: F is not W
    backprop = torch.autograd.grad(plain(qp, k, v, need_weights=False)[0], qp, dy)[0]
    assert not torch.allclose(got[0], backprop, rtol=1e-3, atol=1e-6)


def test_projections_share_the_packed_parameter():
    plain, conv = _pair(dict(), "sa")
    assert isinstance(conv, FeedbackMultiheadAttention)
    names = [n for n, _ in na.feedback_layers(conv)]
    assert names == ["q_feedback", "k_feedback", "v_feedback", "o_feedback"]
    for i, name in enumerate("qkv"):
        proj = getattr(conv, f"{name}_feedback")
        assert isinstance(proj, Projection)
        assert proj.weight._base is conv.in_proj_weight  # a view: gradients reach it
        assert torch.equal(proj.weight, conv.in_proj_weight[i * E:(i + 1) * E])
        assert torch.equal(proj.bias, conv.in_proj_bias[i * E:(i + 1) * E])
        assert proj.feedback.shape == (E, E)
    assert conv.o_feedback.weight is conv.out_proj.weight
    groups = na.param_groups(conv)
    assert len(groups["feedback"]) == 4
    assert [id(p) for p in groups["forward"]] == [
        id(p) for n, p in conv.named_parameters() if not n.endswith("feedback")]
    assert len(groups["forward"]) == len(list(plain.parameters()))
    inplace = na.convert(plain, "sa", inplace=True)  # in place: the very same Parameters
    assert inplace.q_feedback.weight._base is plain.in_proj_weight


def test_revert_state_dict_and_deepcopy():
    plain, conv = _pair(dict(batch_first=True), "ia")
    back = na.revert(conv)
    assert type(back) is nn.MultiheadAttention and not list(na.feedback_layers(back))
    x = torch.randn(B, L, E, dtype=torch.float64)
    torch.testing.assert_close(back(x, x, x)[0], plain(x, x, x)[0], rtol=0, atol=0)
    state = conv.state_dict()
    assert {k for k in state if k.endswith("feedback")} == {
        f"{n}_feedback.feedback" for n in "qkvo"}
    other = na.convert(plain, "ia")
    other.load_state_dict(state)
    for (_, a), (_, b) in zip(na.feedback_layers(conv), na.feedback_layers(other), strict=True):
        assert torch.equal(a.feedback, b.feedback)
    clone = copy.deepcopy(conv)  # the copy's projections read the copy's Parameters
    assert clone.q_feedback.weight._base is clone.in_proj_weight
    assert clone.in_proj_weight is not conv.in_proj_weight


def test_a_transformer_trains_with_every_learned_rule_and_dfa():
    """An encoder layer (attention plus feed-forward Linears) converts whole, nothing reported
    unsupported, and trains with the recipe; sa's projections track W."""
    for rule in ["sa", "aa", "kp", "wm", "ia", "fa", "usf", "dfa"]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.1, batch_first=True),
                            nn.Flatten(), nn.Linear(L * E, 3))
        model = na.convert(net, rule, on_unsupported="raise")
        assert sum(1 for _ in na.feedback_layers(model)) == 7  # q, k, v, o, two FF, read-out
        x, y = torch.randn(16, L, E), torch.randint(0, 3, (16,))
        assert torch.isfinite(train_with_recipe(model, x, y, steps=5, lr=1e-3))
        assert na.bypassed_layers(model, lambda model=model, x=x: model(x)) == []
        if rule == "sa":
            assert max(na.metrics.weight_angles(model).values()) < 5.0


def test_no_grad_is_torchs_module():
    plain, conv = _pair(dict(batch_first=True), "aa")
    plain.eval(), conv.eval()
    x = torch.randn(B, L, E, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(conv(x, x, x)[0], plain(x, x, x)[0], rtol=0, atol=0)


def test_end_to_end_angles_reach_the_projections():
    """backprop_angles differentiates the packed Parameter and reads each projection's rows:
    0 with F = W, every projection present."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True),
                        nn.Flatten(), nn.Linear(L * E, 3)).double()
    model = na.convert(net, na.get_rule("sa", init="weight"))
    x, y = torch.randn(4, L, E, dtype=torch.float64), torch.randint(0, 3, (4,))
    angles = na.metrics.backprop_angles(model, lambda: F.cross_entropy(model(x), y))
    assert set(angles) == {n for n, _ in na.feedback_layers(model)}
    assert max(angles.values()) < 1e-4
