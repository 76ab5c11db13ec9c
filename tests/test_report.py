"""na.report: one measured step says, per layer, whether the error went through F."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import neuralign as na


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_a_rule_s_layers_send_their_errors_through_f():
    model = na.convert(_net(), "fa")
    x, y = _batch()
    rep = na.report(model, lambda: F.cross_entropy(model(x), y))
    assert [r.name for r in rep.layers] == ["0", "2", "4"]
    assert all(r.error_via == "F" and r.rule == "fa" for r in rep.layers)
    assert all(r.local_angle > 30 and r.weight_angle > 30 for r in rep.layers)
    assert rep.layers[-1].backprop_angle == 0  # the read-out's W gradient needs no feedback
    assert rep.layers[0].backprop_angle > 1
    assert rep.bypassed == [] and rep.not_converted == []
    text = str(rep)
    assert text.splitlines()[1].split() == ["layer", "type", "rule", "error", "via", "local",
                                            "angle", "vs", "backprop", "weight", "angle", "lag"]
    assert "FeedbackLinear" in text and "bypassed (error through W" in text


def test_f_equal_to_w_is_backprop_and_the_lag_is_reported():
    model = na.convert(_net(), na.get_rule("sa", init="weight"))
    x, y = _batch()
    rep = na.report(model, lambda: F.cross_entropy(model(x), y))
    for r in rep.layers:
        assert r.error_via == "F"
        assert r.local_angle < 1e-3 and r.backprop_angle < 1e-3 and r.weight_angle < 1e-3
        assert r.lag is not None  # sa's fixed point is (self/decay)·W


def test_bypassed_and_unconverted_layers_are_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(4, 4)
            self.bil = nn.Bilinear(4, 4, 3)

        def forward(self, x):  # b's weight read functionally: its error goes through W
            h = torch.tanh(F.linear(torch.tanh(self.a(x)), self.b.weight, self.b.bias))
            return self.bil(h, h)

    torch.manual_seed(0)
    model = na.convert(Odd(), "fa", on_unsupported="ignore")
    x, y = _batch()
    rep = na.report(model, lambda: F.cross_entropy(model(x), y))
    via = {r.name: r.error_via for r in rep.layers}
    assert via == {"a": "F", "b": "W (bypassed)"}
    assert rep.bypassed == ["b"] and rep.not_converted == ["bil: Bilinear"]


def test_a_layer_the_forward_never_uses_received_no_error():
    class Spare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(6, 10), nn.Linear(6, 10)

        def forward(self, x):
            return self.used(x)

    model = na.convert(Spare(), "fa")
    x, y = _batch()
    rep = na.report(model, lambda: F.cross_entropy(model(x), y))
    assert {r.name: r.error_via for r in rep.layers} == {"used": "F", "spare": "none"}
    assert rep.bypassed == []


def test_nothing_is_stepped_or_collected():
    model = na.convert(_net(), "aa")
    opt = na.feedback_optimizer(model)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    samples = model[0].recipe_state.samples.clone()
    rep = na.report(model, lambda: F.cross_entropy(model(x), y))
    assert all(r.error_via == "F" for r in rep.layers)
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.equal(p.grad, grads[n])
    assert torch.equal(model[0].recipe_state.samples, samples)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    opt.step()  # the recipe still steps the layers


def test_dfa_layers_send_the_projected_output_error():
    model = na.convert(_net(), "dfa")
    x, y = _batch()
    rep = na.report(model, lambda: F.cross_entropy(model(x), y))
    assert [r.error_via for r in rep.layers] == ["D", "D", "D"]
    assert rep.layers[0].weight_angle is None
