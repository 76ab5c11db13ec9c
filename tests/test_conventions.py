"""The paper's convention (``Rule(convention="paper")``) against the authors' own formulas.

The reference here is written from the authors' definitions (Kunin et al. 2020, their code:
``Alignments/primitives.py`` and ``AlignmentBase.__call__`` in ``Alignments/alignment.py``),
not from neuralign's terms: the forward projection ``fp = A_W(x) + b`` and the backward
projection ``bp = A_B(x) + b`` (both with the layer's bias, their flags' defaults), the forward
reconstruction ``fr`` (``fp`` sent back through B by the map's adjoint), and the primitives

- decay = ‖W‖² + ‖B‖², self = −Σ W·B (their ``−tr(WB)``, the kernels in one layout),
- amp = −mean_n Σ fp·bp, sparse = mean_n Σ (fp² + bp²), null = mean_n Σ fr²,

(means over the examples, sums over units and positions, no ½, the constant parts kept).
F.grad after one backward must be the gradient of the rule's penalty with respect to B (plus,
for Kolen-Pollack, W's own gradient), to 1e-12 in float64, on every layer case."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import neuralign as na

TERMS = ("decay", "amp", "null", "sparse", "self")
NAMED = ("sa", "aa", "wm", "ia", "kp")


def _cases():
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return [
        ("linear-2d", lambda: nn.Linear(5, 4), randn(6, 5)),
        ("linear-3d", lambda: nn.Linear(5, 4), randn(3, 7, 5)),
        ("linear-nobias", lambda: nn.Linear(5, 4, bias=False), randn(6, 5)),
        ("conv1d", lambda: nn.Conv1d(3, 4, 3), randn(2, 3, 9)),
        ("conv2d-valid", lambda: nn.Conv2d(3, 4, 3), randn(2, 3, 7, 7)),
        ("conv2d-stride2", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), randn(2, 3, 8, 8)),
        ("conv2d-same", lambda: nn.Conv2d(3, 4, 3, padding="same"), randn(2, 3, 6, 6)),
        ("conv2d-groups", lambda: nn.Conv2d(4, 6, 3, groups=2), randn(2, 4, 6, 6)),
        ("conv3d", lambda: nn.Conv3d(2, 3, 2), randn(2, 2, 4, 4, 4)),
        ("convT2d", lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1), randn(2, 3, 4, 4)),
    ]


CASES = _cases()


def _map(layer: nn.Module, x, K, b):
    """The layer's own map with kernel K and bias b, written with torch's functional ops."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, K, b)
    if isinstance(layer, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, K, b, layer.stride, layer.padding, layer.output_padding,
                                  layer.groups, layer.dilation)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    return conv(x, K, b, layer.stride, layer.padding, layer.dilation, layer.groups)


def authors_penalty(layer: nn.Module, coeffs: dict, x, W, B):
    """The authors' penalty, differentiable in B: their primitives on their projections."""
    b = layer.bias.detach() if layer.bias is not None else None
    n = x.shape[0]
    fp = _map(layer, x, W, b)  # forward projection, with the bias
    bp = _map(layer, x, B, b)  # backward projection, with the bias
    # forward reconstruction: fp through B by the map's adjoint (their conv2d_transpose, or
    # fp @ B), onto the input's shape
    xs = x.detach().requires_grad_()
    (fr,) = torch.autograd.grad(_map(layer, xs, B, None), xs, fp, create_graph=True)
    primitives = {
        "decay": (W ** 2).sum() + (B ** 2).sum(),
        "self": -(W * B).sum(),
        "amp": -(fp * bp).sum() / n,
        "sparse": ((fp ** 2).sum() + (bp ** 2).sum()) / n,
        "null": (fr ** 2).sum() / n,
    }
    return sum(c * primitives[t] for t, c in coeffs.items())


def _check(rule: na.Rule, make, x, monkeypatch):
    """F.grad after one backward against the authors' penalty's gradient in B."""
    from neuralign import autograd

    torch.manual_seed(1)
    plain = make().double()
    layer = na.convert(plain, rule)
    # the mirror noise, fixed: the reference sees the noise the layer saw
    xi = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    monkeypatch.setattr(autograd, "mirror_noise", lambda x_, rule_, dout: xi.clone())
    out = layer(x)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    (out * r).sum().backward()
    W = layer.weight.detach()
    B = layer.feedback.detach().clone().requires_grad_()
    src = xi if rule.noise is not None else x
    (want,) = torch.autograd.grad(authors_penalty(layer, dict(rule.terms), src, W, B), B)
    if rule.kp:  # Kolen-Pollack: B also gets W's own gradient
        Wr = W.clone().requires_grad_()
        b = layer.bias.detach() if layer.bias is not None else None
        (dW,) = torch.autograd.grad((_map(layer, x, Wr, b) * r).sum(), Wr)
        want = want + dW
    torch.testing.assert_close(layer.feedback.grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("term", TERMS)
@pytest.mark.parametrize("name,make,x", CASES, ids=[c[0] for c in CASES])
def test_each_term_is_the_authors(term, name, make, x, monkeypatch):
    _check(na.Rule(terms={term: 0.7}, convention="paper"), make, x, monkeypatch)


@pytest.mark.parametrize("rule", NAMED)
@pytest.mark.parametrize("name,make,x", CASES, ids=[c[0] for c in CASES])
def test_each_named_rule_is_the_authors(rule, name, make, x, monkeypatch):
    _check(na.get_rule(rule, convention="paper"), make, x, monkeypatch)


@pytest.mark.parametrize("name,make,x", CASES, ids=[c[0] for c in CASES])
def test_a_mixed_rule_on_the_data_folds_the_bias_as_the_authors(name, make, x, monkeypatch):
    """amp with sparse on the data (the output not kept: amp folded into the kernel) and with
    null, coefficients where the bias does not cancel."""
    _check(na.Rule(terms={"amp": 0.3, "sparse": 0.5}, convention="paper"), make, x, monkeypatch)
    _check(na.Rule(terms={"amp": 0.3, "null": 0.2, "decay": 0.1}, convention="paper"), make, x,
           monkeypatch)


def test_the_named_rules_take_the_authors_coefficients():
    want = {"sa": {"decay": 1e-3, "self": 2e-3}, "aa": {"sparse": 1e-3, "amp": 2e-3},
            "wm": {"decay": 1e-3, "amp": 1e-3}, "ia": {"amp": 2e-3, "null": 1e-3, "decay": 1e-3},
            "kp": {"decay": 1e-3}}
    for name, terms in want.items():
        rule = na.get_rule(name, convention="paper")
        assert rule.convention == "paper" and dict(rule.terms) == terms, name
        assert rule.noise == na.get_rule(name).noise and rule.kp == na.get_rule(name).kp
    # the other overrides apply over them; the library's stay the default
    assert na.get_rule("wm", convention="paper", amp=5e-3).terms["amp"] == 5e-3
    assert na.get_rule("wm").convention == "library"
    with pytest.raises(ValueError, match="unknown convention 'authors'; valid: library, paper"):
        na.get_rule("wm", convention="authors")


def test_the_library_convention_is_the_paper_s_translated():
    """A library rule equals the paper rule whose coefficients are translated (decay ÷ 2;
    sparse, null ÷ 2P; amp ÷ P; self as is) on a layer without bias (the bias has no
    translation)."""
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 4, 3, bias=False).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    P = 4 * 4  # output positions
    lib = na.Rule(terms={"decay": 0.6, "sparse": 0.8, "amp": 0.5, "null": 0.4, "self": 0.3})
    paper = na.Rule(terms={"decay": 0.3, "sparse": 0.8 / (2 * P), "amp": 0.5 / P,
                           "null": 0.4 / (2 * P), "self": 0.3}, convention="paper")
    grads = []
    for rule in (lib, paper):
        layer = na.convert(plain, rule)
        with torch.no_grad():
            layer.feedback.copy_(torch.randn_like(layer.feedback,
                                                 generator=torch.Generator().manual_seed(4)))
        layer(x).sum().backward()
        grads.append(layer.feedback.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_the_recipe_under_the_paper_s_convention_settles_at_its_fixed_points():
    """The recipe's rate means the same under both conventions; the paper's weight mirror
    settles at amp·σ²/(2·decay)·W = W/2 on a Linear layer, its sa at W."""
    for name, factor in (("wm", 0.5), ("sa", 1.0)):
        torch.manual_seed(0)
        layer = na.convert(nn.Linear(8, 6), na.get_rule(name, convention="paper"))
        layer.weight.requires_grad_(False)
        opt = na.feedback_optimizer(layer, rate=0.1)
        torch.testing.assert_close(na.metrics.fixed_point(layer), factor * layer.weight)
        for _ in range(300):
            opt.zero_grad()
            layer(torch.randn(256, 8)).sum().backward()
            opt.step()
        lag = na.metrics.feedback_lags(layer)[""]
        assert lag < 0.1, (name, lag)


@pytest.mark.parametrize("make,x", [
    (lambda: nn.MultiheadAttention(8, 2, batch_first=True), torch.randn(3, 5, 8)),
    (lambda: nn.GRU(4, 6, batch_first=True), torch.randn(3, 5, 4)),
    (lambda: nn.ConvTranspose1d(3, 2, 3, stride=2), torch.randn(2, 3, 5)),
], ids=["attention", "gru", "convT1d"])
@pytest.mark.parametrize("name", ["ia", "aa", "kp"])
def test_every_layer_family_trains_under_the_paper_s_convention(make, x, name):
    torch.manual_seed(0)
    model = na.convert(make(), na.get_rule(name, convention="paper", update_noise=0.1))
    opt_f = na.feedback_optimizer(model)
    opt_w = torch.optim.SGD(na.param_groups(model)["forward"], lr=0.05)
    F0 = [layer.feedback.detach().clone() for _, layer in na.feedback_layers(model)]
    for _ in range(3):
        out = model(x) if not isinstance(model, nn.MultiheadAttention) else model(x, x, x)[0]
        out = out[0] if isinstance(out, tuple) else out
        opt_w.zero_grad()
        opt_f.zero_grad()
        out.square().mean().backward()
        opt_w.step()
        opt_f.step()
    for (_, layer), f0 in zip(na.feedback_layers(model), F0, strict=True):
        assert torch.isfinite(layer.feedback).all() and not torch.equal(layer.feedback, f0)


def test_weight_estimation_under_the_paper_s_convention():
    torch.manual_seed(0)
    rule = na.get_rule("sa", convention="paper", estimate={"method": "perturb", "samples": 200})
    model = na.convert(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)), rule)
    opt = na.feedback_optimizer(model)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    assert 0 < na.metrics.angle(model[0].weight_estimate, model[0].weight) < 45


def test_the_paper_s_convention_compiles_as_eager():
    def run(compiled: bool):
        torch.manual_seed(0)
        model = na.convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
                           na.get_rule("ia", convention="paper"))
        opt = na.feedback_optimizer(model)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        for _ in range(3):
            opt.zero_grad()
            forward(torch.randn(5, 6)).square().sum().backward()
            opt.step()
        return model

    torch._dynamo.reset()
    want, got = run(False), run(True)
    for a, b in zip(got.parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_config_s_paper_convention_takes_the_authors_coefficients(tmp_path):
    from neuralign.train import load_config
    from neuralign.train.build import build_rule

    cfg = load_config(None, ["rule.name=wm", "rule.convention=paper"])
    rule = build_rule(cfg.rule)
    assert rule.convention == "paper" and dict(rule.terms) == {"amp": 1e-3, "decay": 1e-3}
    cfg = load_config(None, ["rule.name=wm", "rule.convention=paper", "rule.terms.amp=0.01"])
    assert dict(build_rule(cfg.rule).terms) == {"amp": 0.01, "decay": 1e-3}
