"""convert / revert / inspection on real models: torchvision resnet18, Conv1d + 3-D Linear."""

import io
import logging

import pytest
import torch
import torchvision
from torch import nn

import neuralign as na
from neuralign.convert import DEFAULT_MAPPING, UnsupportedLayerError
from neuralign.layers import FeedbackLayer


class SeqModel(nn.Module):
    """Conv1d over time, then a Linear on [N, T, D] inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 5, padding="same", padding_mode="circular")
        self.proj = nn.Linear(8, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):  # x: [N, 3, T]
        h = torch.relu(self.conv(x)).transpose(1, 2)  # [N, T, 8]
        return self.head(torch.tanh(self.proj(h))).mean(1)


def _resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.mark.parametrize("make,shape", [(_resnet, (2, 3, 32, 32)), (SeqModel, (2, 3, 11))],
                         ids=["resnet18", "conv1d+linear3d"])
def test_round_trip_and_state_dict(make, shape, tmp_path):
    torch.manual_seed(0)
    plain = make().eval()
    x = torch.randn(shape)
    model = na.convert(plain, "ia")
    assert all(type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d) for m in plain.modules()
               if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d))  # the original is untouched
    n_layers = sum(isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d) for m in plain.modules())
    assert len(list(na.feedback_layers(model))) == n_layers
    assert not model.training  # eval state kept
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    sd = model.state_dict()
    assert sum(k.endswith(".feedback") for k in sd) == n_layers
    # save / load into a freshly converted model (different random feedback)
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    fresh = na.convert(make(), "ia")
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for (_, a), (_, b) in zip(na.feedback_layers(model), na.feedback_layers(fresh), strict=True):
        assert torch.equal(a.feedback, b.feedback) and torch.equal(a.weight, b.weight)
    # revert: plain torch layers again, forward weights kept
    back = na.revert(model)
    assert not list(na.feedback_layers(back)) and list(na.feedback_layers(model))
    assert set(back.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(back(x), plain(x), rtol=0, atol=0)


def test_convert_copies_by_default_and_inplace_on_request():
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model = na.convert(plain, "sa")
    assert type(plain[0]) is nn.Linear and model[0].weight is not plain[0].weight
    same = na.convert(plain, "sa", inplace=True)
    assert same is plain and isinstance(plain[0], na.FeedbackLinear)


def test_bare_layer_and_per_layer_rules():
    assert isinstance(na.convert(nn.Linear(2, 2), "fa"), na.FeedbackLinear)
    model = na.convert(_resnet(), "ia", layer_rules={"fc": "bp", "layer4.*": "sa",
                                                     "layer4.1.conv2": na.get_rule("kp")})
    assert type(model.fc) is nn.Linear
    rules = {n: layer.rule.name for n, layer in na.feedback_layers(model)}
    assert rules["conv1"] == "ia" and rules["layer4.0.conv1"] == "sa"
    assert rules["layer4.0.downsample.0"] == "sa" and rules["layer4.1.conv2"] == "kp"
    with pytest.raises(ValueError, match="match no convertible layer"):
        na.convert(_resnet(), "ia", layer_rules={"classifier": "bp"})



def _input_and_weight_grads(net, x):
    x = x.detach().clone().requires_grad_()
    net.zero_grad()
    net(x).square().sum().backward()
    layer = next(m for m in net.modules() if isinstance(m, nn.Linear))
    return x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("where", ["top", "nested"])
def test_a_module_at_two_places_is_one_feedback_layer(where):
    torch.manual_seed(0)
    lin = nn.Linear(5, 5).double()
    if where == "top":
        plain = nn.Sequential(lin, nn.Tanh(), lin)
    else:  # a shared block: its layer sits at 0.0 and 2.0
        block = nn.Sequential(lin)
        plain = nn.Sequential(block, nn.Tanh(), block)
    model = na.convert(plain, na.get_rule("fa", init="weight"))
    a, b = (model[0], model[2]) if where == "top" else (model[0][0], model[2][0])
    assert isinstance(a, na.FeedbackLinear) and a is b  # one W, one F, at both places
    assert len(list(na.feedback_layers(model))) == 1
    # F = W: plain autograd's gradients (W's summed over both places)
    x = torch.randn(7, 5, dtype=torch.float64)
    for got, want in zip(_input_and_weight_grads(model, x), _input_and_weight_grads(plain, x),
                         strict=True):
        torch.testing.assert_close(got, want)
    # F = 2W: the error goes through F at both places, so x's gradient doubles twice
    with torch.no_grad():
        a.feedback.mul_(2)
    torch.testing.assert_close(_input_and_weight_grads(model, x)[0],
                               4 * _input_and_weight_grads(plain, x)[0])
    back = na.revert(model)
    a, b = (back[0], back[2]) if where == "top" else (back[0][0], back[2][0])
    assert type(a) is nn.Linear and a is b
    torch.testing.assert_close(back(x), plain(x))


def test_the_names_of_a_shared_module_must_agree_on_its_rule():
    lin = nn.Linear(3, 3)
    plain = nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.raises(ValueError, match="'0' and '2' are one module.*0: fa, 2: sa"):
        na.convert(plain, "fa", layer_rules={"2": "sa"})
    assert na.convert(plain, "fa", layer_rules={"[02]": "sa"})[2].rule.name == "sa"
    kept = na.convert(plain, "fa", layer_rules={"0": "bp", "2": "bp"})
    assert type(kept[0]) is nn.Linear and kept[0] is kept[2]

@pytest.mark.parametrize("rule", [r for r in na.list_rules() if r != "bp"])
def test_degenerate_layers_convert_and_train(rule):
    # torch allows a layer with no inputs and a single weight; so must every rule: usf's
    # scale was the std of one entry (NaN), brsf's bound divided by a fan-in of 0
    torch.manual_seed(0)
    model = na.convert(nn.Sequential(nn.Linear(0, 3), nn.Linear(3, 1), nn.Linear(1, 1),
                                     nn.Linear(1, 2)), rule)
    x = torch.randn(4, 0)
    opt_w = torch.optim.SGD(na.param_groups(model)["forward"], lr=0.1)
    opt_f = na.feedback_optimizer(model)
    for _ in range(2):
        opt_w.zero_grad()
        opt_f.zero_grad()
        model(x).square().sum().backward()
        opt_w.step()
        opt_f.step()
    assert model[0].weight.shape == (3, 0)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(t.float()).all(), name
    assert model[2].weight.grad.abs().sum() > 0  # an error reached the single weight
    if rule in ("usf", "frsf", "brsf"):  # |F| > 0 with W's sign
        F, W = model[2].current_feedback(), model[2].weight
        assert F.abs().item() > 0 and torch.equal(F.sign(), W.sign())


def test_unsupported_layers_are_reported(caplog):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Bilinear(4, 4, 2))
    with caplog.at_level(logging.WARNING, logger="neuralign"):
        na.convert(model, "fa")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "2: Bilinear" in warned[0]  # BatchNorm is elementwise: not reported
    with pytest.raises(UnsupportedLayerError, match="Bilinear"):
        na.convert(model, "fa", on_unsupported="raise")
    caplog.clear()
    na.convert(model, "fa", on_unsupported="ignore")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    with pytest.raises(ValueError, match="valid: warn, ignore, raise"):
        na.convert(model, "fa", on_unsupported="skip")


def test_bypassed_layers_names_layers_whose_weight_is_read_functionally():
    class Tied(nn.Module):  # the read-out reuses the first layer's weight (weight tying)
        def __init__(self):
            super().__init__()
            self.inp, self.mid = nn.Linear(5, 8), nn.Linear(8, 8)

        def forward(self, x):
            return nn.functional.linear(torch.relu(self.mid(self.inp(x))), self.inp.weight.T)

    model = na.convert(Tied(), "sa")
    x = torch.randn(3, 5)
    assert na.bypassed_layers(model, lambda: model(x)) == []  # inp's forward runs too
    model.forward = lambda x: nn.functional.linear(torch.relu(model.mid(x @ model.inp.weight.T)),
                                                   model.inp.weight.T)
    assert na.bypassed_layers(model, lambda: model(x)) == ["inp"]
    # the hooks are gone afterwards
    assert not any(layer._forward_pre_hooks for _, layer in na.feedback_layers(model))


def test_torchvision_swin_attention_bypasses_its_converted_projections():
    """Swin's attention reads its qkv and proj layers' weights functionally: converted, they
    would still train by backprop. bypassed_layers finds them (documented in the convert guide)."""
    import torchvision

    torch.manual_seed(0)
    model = na.convert(torchvision.models.swin_t(num_classes=3), "fa", on_unsupported="ignore")
    bypassed = na.bypassed_layers(model, lambda: model(torch.randn(1, 3, 32, 32)))
    assert bypassed and all(name.endswith((".attn.qkv", ".attn.proj")) for name in bypassed)
    assert len(bypassed) == 2 * 12  # swin_t: 2 + 2 + 6 + 2 blocks


def test_custom_mapping_extends_conversion():
    class MyLinear(nn.Linear):
        pass

    class FeedbackMyLinear(FeedbackLayer, MyLinear):  # a new layer type is this line
        pass

    model = nn.Sequential(MyLinear(2, 3))
    assert not list(na.feedback_layers(na.convert(model, "fa", on_unsupported="ignore")))
    mapping = {**DEFAULT_MAPPING, MyLinear: FeedbackMyLinear}
    converted = na.convert(model, "fa", mapping=mapping)
    layer = converted[0]
    assert type(layer) is FeedbackMyLinear and isinstance(layer, MyLinear)
    x = torch.randn(4, 2, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 3) @ layer.feedback)
    assert type(na.revert(converted)[0]) is MyLinear


def test_registering_a_layer_family_makes_convert_use_it():
    from neuralign.convert import DEFAULT_MAPPING
    from neuralign.layers import FEEDBACK_CLASSES, register_layer
    from neuralign.ops import OPS, LinearOps

    class Scaled(nn.Linear):  # a torch layer class of one's own
        pass

    try:
        @register_layer(Scaled, LinearOps.from_module)
        class FeedbackScaled(FeedbackLayer, Scaled):
            """A new layer family: these lines."""

        converted = na.convert(nn.Sequential(Scaled(2, 3)), "sa")
        assert type(converted[0]) is FeedbackScaled and DEFAULT_MAPPING[Scaled] is FeedbackScaled
        with pytest.raises(ValueError, match="already registered"):
            register_layer(Scaled, LinearOps.from_module)(FeedbackScaled)
        with pytest.raises(TypeError, match="must subclass FeedbackLayer"):
            register_layer(nn.Bilinear, LinearOps.from_module)(FeedbackScaled)
    finally:
        FEEDBACK_CLASSES.pop(Scaled, None)
        OPS.pop(Scaled, None)


def test_a_failed_inplace_conversion_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(2, 3), nn.Bilinear(3, 3, 2))
    with pytest.raises(UnsupportedLayerError):
        na.convert(model, "fa", inplace=True, on_unsupported="raise")
    assert type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="match no convertible layer"):
        na.convert(model, "fa", inplace=True, layer_rules={"nope": "bp"})
    assert type(model[0]) is nn.Linear


def test_hooks_device_and_training_state_are_kept():
    plain = nn.Sequential(nn.Linear(3, 4))
    calls = []
    plain[0].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    plain[0].register_full_backward_hook(lambda m, gi, go: calls.append("back"))
    plain.train()
    model = na.convert(plain, "kp")
    model(torch.randn(2, 3, requires_grad=True)).sum().backward()
    assert calls == ["pre", "back"] and model.training
    assert model[0].feedback.device == model[0].weight.device


def test_param_groups_split_forward_and_feedback():
    model = na.convert(_resnet(), "sa", layer_rules={"fc": "fa"})
    groups = na.param_groups(model)
    ids = [id(p) for p in groups["forward"] + groups["feedback"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    fb = {id(layer.feedback) for _, layer in na.feedback_layers(model) if layer.rule.learns}
    assert {id(p) for p in groups["feedback"]} == fb
    assert id(model.fc.feedback) not in ids  # fixed feedback is a buffer


def test_exact_backprop_gives_plain_gradients_and_restores():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    model = na.convert(plain, "fa")
    x = torch.randn(4, 5)
    plain(x).square().sum().backward()
    with na.exact_backprop(model):
        model(x).square().sum().backward()
    for p, q in zip(plain.parameters(), [model[0].weight, model[0].bias, model[2].weight,
                                         model[2].bias], strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    model.zero_grad()
    model(x).square().sum().backward()  # restored: feedback again
    assert not torch.allclose(model[0].weight.grad, plain[0].weight.grad)
    with pytest.raises(RuntimeError), na.exact_backprop(model):
        raise RuntimeError
    assert not model[0]._exact_backprop


def test_after_step_update_noise_and_normalisation():
    rule = na.get_rule("sa", update_noise=0.1, normalize=True)
    model = na.convert(nn.Sequential(nn.Linear(4, 3)), rule)
    layer = model[0]
    norm0 = layer.feedback.norm().item()
    with torch.no_grad():
        layer.feedback.mul_(3.0)
    F = layer.feedback.detach().clone()
    lr = 0.5
    na.after_step(model, lr, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(F.shape, generator=torch.Generator().manual_seed(7))
    want = F + lr * 0.1 * eps
    torch.testing.assert_close(layer.feedback, want * (norm0 / want.norm()))
    opt = torch.optim.SGD([layer.feedback], lr=0.2)
    na.after_step(model, opt)  # the optimizer's lr is read
    assert abs(layer.feedback.norm().item() - norm0) < 1e-5
    plain_rule = na.convert(nn.Linear(4, 3), "sa")
    F = plain_rule.feedback.detach().clone()
    na.after_step(plain_rule, 1.0)
    assert torch.equal(plain_rule.feedback, F)  # no noise or normalisation asked: unchanged


def test_metrics_angles():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(8, 5)
    same = na.convert(plain, na.get_rule("fa", init="weight"))
    assert all(a < 1e-5 for a in na.metrics.weight_angles(same).values())
    model = na.convert(plain, "fa")
    assert all(a > 45 for a in na.metrics.weight_angles(model).values())
    assert na.metrics.gradient_angles(model) == {}
    na.metrics.record_gradient_angles(model)
    model(x).square().sum().backward()
    local = na.metrics.gradient_angles(model)
    assert set(local) == {"0", "2"} and all(a > 10 for a in local.values())
    na.metrics.record_gradient_angles(model, False)
    assert na.metrics.gradient_angles(model) == {}
    grads = [p.grad.clone() for p in model.parameters()]
    e2e = na.metrics.backprop_angles(model, lambda: model(x).square().sum())
    assert e2e["2"] < 1e-5 and e2e["0"] > 10  # the top layer's update does not depend on F
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert na.metrics.backprop_angles(same, lambda: same(x).square().sum())["0"] < 1e-5


def test_torch_compile_runs_and_matches_eager():
    torch.manual_seed(0)
    model = na.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(64, 5)), "aa")
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.compile(model, backend="aot_eager")(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-6)


def test_converted_layers_serialise_whole():
    model = na.convert(nn.Sequential(nn.Linear(2, 2)), "wm")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded[0], FeedbackLayer) and loaded[0].rule == model[0].rule


# What docs/guides/convert.md lists as staying on backprop in torchvision's classifiers.
_TORCHVISION_LEFT = {
    "VisionTransformer", "Encoder", "ShiftedWindowAttention", "ShiftedWindowAttentionV2",
    "RelativePositionalMultiHeadAttention", "CNBlock"}
_TORCHVISION_BYPASSED = {"ShiftedWindowAttention", "ShiftedWindowAttentionV2"}


@pytest.mark.slow
def test_every_torchvision_classifier_converts_except_what_the_guide_lists():
    """Each classifier, on the meta device (regnets, whose init needs data, on the CPU at their
    smallest), converted and run once in training mode: what is left unconverted, and the
    converted layers that the forward bypasses, are the guide's list."""
    import torchvision.models as tvm

    from neuralign.convert import _holds_weights

    left, bypassed = set(), set()
    for name in tvm.list_models(module=tvm):
        if name.startswith("regnet") and not name.endswith("_400mf"):
            continue
        with torch.device("cpu" if name.startswith("regnet") else "meta"):
            model = na.convert(tvm.get_model(name, weights=None, num_classes=10), "fa",
                               on_unsupported="ignore", inplace=True)
            x = torch.zeros(2, 3, *(299, 299) if name == "inception_v3" else (224, 224))
            for layer in na.bypassed_layers(model, lambda model=model, x=x: model(x)):
                bypassed.add(type(model.get_submodule(layer.rpartition(".")[0])).__name__)
        inside = [n for n, m in model.named_modules()  # converted attention's own children
                  if isinstance(m, na.FeedbackMultiheadAttention)]
        left |= {type(m).__name__ for n, m in model.named_modules() if _holds_weights(m)
                 and not any(n.startswith(p + ".") for p in inside)}
    assert left == _TORCHVISION_LEFT
    assert bypassed == _TORCHVISION_BYPASSED
