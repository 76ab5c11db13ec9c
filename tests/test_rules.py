"""Rules, generated from the catalog: each rule's feedback gradient is the sum of its terms
(plus Kolen-Pollack's task share), W never receives rule gradient, sign rules derive F from the
current W, and the learned rules reach their fixed points."""

import math

import pytest
import torch
from torch import nn

import neuralign as na
from cases import LAYER_CASES
from neuralign import terms
from neuralign.ops import ops_for
from neuralign.rules import SIGN_KINDS, Rule, catalog, register

RULES = [r for r in na.list_rules() if r != "bp"]
LEARNED = [r for r in RULES if na.get_rule(r).learns]
CASES = [pytest.param(c, id=c.id) for c in LAYER_CASES
         if c.id in ("linear-3d", "conv1d-reflect", "conv2d-stride-pad", "conv2d-same-even-dil",
                     "conv3d", "convT1d-groups-nobias", "convT2d-stride-pad-outpad")]


def _noise_like(x, noise):
    """The mirror noise the backward draws, from the same random stream."""
    if noise.dist == "normal":
        return torch.empty_like(x).normal_(0, noise.std)
    h = noise.std * math.sqrt(3)
    return torch.empty_like(x).uniform_(-h, h)


def _variants(name):
    rule = na.get_rule(name)
    out = [rule]
    if rule.noise is not None:
        out.append(rule.replace(noise_dist="uniform", noise_std=0.7))
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", LEARNED)
def test_feedback_gradient_is_the_sum_of_its_terms(name, case):
    for rule in _variants(name):
        plain = case.make()
        layer = na.convert(plain, rule)
        x = case.input().requires_grad_()
        out = layer(x)
        dy = torch.randn_like(out)
        W, F = layer.weight.detach(), layer.feedback.detach().clone()
        torch.manual_seed(123)
        out.backward(dy)
        src = x.detach()
        if rule.noise is not None:
            torch.manual_seed(123)
            src = _noise_like(src, rule.noise)
        ops = ops_for(layer)
        want = torch.zeros_like(F)
        for t, c in rule.terms.items():  # autograd of each term's loss form
            Fv = F.clone().requires_grad_()
            want += c * torch.autograd.grad(terms.loss(t, ops, src, W, Fv), Fv)[0]
        if rule.kp:  # Kolen-Pollack: plus W's task gradient
            want += layer.weight.grad
        torch.testing.assert_close(layer.feedback.grad, want, rtol=1e-10, atol=1e-10)
        assert layer.feedback.grad.abs().sum() > 0


@pytest.mark.parametrize("name", RULES)
def test_weight_never_receives_rule_gradient(name):
    plain = nn.Linear(5, 4).double()
    layer = na.convert(plain, name)
    x = torch.randn(6, 5, dtype=torch.float64)
    dy = torch.randn(6, 4, dtype=torch.float64)
    layer(x).backward(dy)
    torch.testing.assert_close(layer.weight.grad, dy.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, dy.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [r for r in RULES if na.get_rule(r).kind in SIGN_KINDS])
def test_sign_rules_derive_feedback_from_the_current_weight(name):
    torch.manual_seed(0)
    layer = na.convert(nn.Conv2d(3, 4, 3), name)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    magnitudes = []
    for _ in range(2):
        x.grad = None
        out = layer(x)
        dy = torch.randn_like(out)
        out.backward(dy)
        F = layer.feedback
        assert torch.equal(torch.sign(F), torch.sign(layer.weight))
        (want,) = torch.autograd.grad(nn.functional.conv2d(x, F), x, dy)  # sent through this F
        torch.testing.assert_close(x.grad, want)
        magnitudes.append(F.abs().clone())
        with torch.no_grad():
            layer.weight.neg_()  # the next step must follow the new signs
    if name == "usf":  # one scale for every entry, kept by F itself
        assert torch.all(magnitudes[0] == magnitudes[0].flatten()[0]) and magnitudes[0].min() > 0
        assert torch.equal(magnitudes[0], magnitudes[1])
    elif name == "frsf":
        assert torch.equal(magnitudes[0], magnitudes[1])  # |F0|, kept by F itself
    else:  # brsf: fresh magnitudes every batch
        assert not torch.equal(magnitudes[0], magnitudes[1])


def test_fa_feedback_stays_fixed():
    layer = na.convert(nn.Linear(5, 4), "fa")
    F0 = layer.feedback.clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        layer(torch.randn(3, 5)).square().sum().backward()
        opt.step()
    assert torch.equal(layer.feedback, F0)
    assert all(p is not layer.feedback for p in layer.parameters())


# -- fixed points: W frozen, only F trained (Linear 30 -> 20, or Conv2d 4 -> 6) ---------------------
def _train_feedback(rule, steps, lr=None, batch=128, seed=0, conv=False):
    """F trained by the rule's recipe (``lr=None``) or by plain SGD on its gradient."""
    torch.manual_seed(seed)
    plain = nn.Conv2d(4, 6, 3) if conv else nn.Linear(30, 20)
    layer = na.convert(plain, rule)
    layer.weight.requires_grad_(False)
    opt = na.feedback_optimizer(layer) if lr is None else torch.optim.SGD([layer.feedback], lr=lr)
    start = na.metrics.angle(layer.weight, layer.feedback)
    for _ in range(steps):
        x = torch.randn(batch, 4, 6, 6) if conv else torch.randn(batch, 30)
        opt.zero_grad()
        if lr is not None or layer.recipe_state.terms:  # (the recipe's sa needs no backward)
            layer(x).sum().backward()  # the task error does not matter for these rules
        opt.step()
    return start, na.metrics.angle(layer.weight, layer.feedback), layer


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv2d"])
@pytest.mark.parametrize("name,lr", [("sa", 0.2), ("aa", 0.05), ("sa", None), ("aa", None)])
def test_sa_and_aa_align_below_one_degree(name, lr, conv):
    # plain SGD needs its learning rate matched to the layer (activity terms are averages, so a
    # conv's and a Linear's differ by the patch size); the recipe needs nothing
    lr = lr * 3 if lr and conv and name == "aa" else lr
    start, end, layer = _train_feedback(name, 100 if conv else 300, lr, batch=16 if conv else 128,
                                        conv=conv)
    assert start > 80 and end < 1.0, (start, end)
    # and they settle at F = W itself, not only its direction
    torch.testing.assert_close(layer.feedback, layer.weight, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("name,bound", [("wm", 10.0), ("ia", 45.0)])
@pytest.mark.parametrize("lr", [0.05, None], ids=["sgd", "recipe"])
def test_mirror_rules_lower_the_angle(name, bound, lr):
    start, end, _ = _train_feedback(name, 300, lr)
    assert start > 80 and end < bound, (start, end)


@pytest.mark.parametrize("plain", [
    nn.Conv2d(3, 4, 3, bias=False),
    # a transposed convolution averages over its input positions, each of which meets each
    # tap once (over output positions, a stride-2 map would settle at W / 4); no padding
    nn.ConvTranspose2d(3, 4, 3, stride=2, bias=False)], ids=["conv2d", "convT2d-stride2"])
def test_weight_mirror_settles_at_w_in_a_convolution_too(plain):
    """Activity terms average over positions: weight mirror's F = (amp·σ²/decay)·W holds for a
    convolution's interior taps whatever the number of positions (a sum would give P·W)."""
    torch.manual_seed(0)
    layer = na.convert(plain, "wm")
    layer.weight.requires_grad_(False)
    opt = na.feedback_optimizer(layer, rate=0.05)
    for _ in range(400):
        opt.zero_grad()
        layer(torch.randn(8, 3, 20, 20)).sum().backward()
        opt.step()
    ratio = (layer.feedback.detach() * layer.weight).sum() / layer.weight.square().sum()
    assert abs(float(ratio) - 1.0) < 0.05, float(ratio)  # (no padding: every tap sees every position)
    assert na.metrics.angle(layer.weight, layer.feedback) < 5.0


def test_kp_with_equal_decay_drives_feedback_to_weight():
    torch.manual_seed(0)
    lam = 0.1
    model = na.convert(nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3)),
                       na.get_rule("kp", decay=lam))
    groups = na.param_groups(model)
    opt = torch.optim.SGD([{"params": groups["forward"], "weight_decay": lam},
                           {"params": groups["feedback"]}], lr=0.1)
    layer = model[0]
    gap0 = (layer.feedback - layer.weight).norm().item()
    w0 = layer.weight.detach().clone()
    for _ in range(400):
        x = torch.randn(32, 10)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), x[:, :3].argmax(1)).backward()
        opt.step()
    gap = (layer.feedback - layer.weight).norm().item()
    assert (layer.weight - w0).norm() > 0.1  # W trained
    assert gap < 0.02 * gap0, (gap0, gap)  # (1 - lr*lam)^400 ~ 0.018 in exact arithmetic


# -- the catalog and the Rule type ----------------------------------------------------------------
def test_catalog_entries_are_complete():
    assert na.list_rules() == ["aa", "bp", "brsf", "dfa", "fa", "frsf", "ia", "kp", "sa", "usf",
                              "wm"]
    for info in catalog():
        assert info.description and info.source and info.rule.name == info.name


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register("sa", "again", "nowhere", terms={"self": 1.0, "decay": 1.0})


def test_get_rule_overrides_and_errors():
    r = na.get_rule("wm", amp=2.0, decay=0.5, noise_std=0.5)
    assert dict(r.terms) == {"amp": 2.0, "decay": 0.5} and r.noise.std == 0.5
    assert na.get_rule("ia", noise=None).noise is None
    with pytest.raises(ValueError, match="valid rules: aa, bp"):
        na.get_rule("wmx")
    with pytest.raises(ValueError, match="valid: decay, amp, null, sparse, self, noise_std"):
        na.get_rule("sa", alpha=1.0)
    with pytest.raises(ValueError, match="never trained"):
        na.get_rule("usf", amp=1.0)


@pytest.mark.parametrize("bad,match", [
    ({"terms": {"amp": 1, "mirror": 1}}, "unknown term 'mirror'; valid: decay, amp"),
    ({"terms": {"amp": float("nan")}}, "finite number"),
    ({"terms": {}}, "needs at least one term"),
    ({"terms": {"self": 1.0}, "noise": {"std": 1.0}}, "has none"),
    ({"terms": {"amp": 1.0}, "noise": {"dist": "cauchy"}}, "valid: normal, uniform"),
    ({"terms": {"amp": 1.0}, "noise": {"sd": 1.0}}, "valid: dist, std"),
    ({"terms": {"amp": 1.0}, "kind": "magic"}, "valid: learned, fixed"),
    ({"terms": {"amp": 1.0}, "init": "zeros"}, "valid: default, kaiming_uniform"),
    ({"terms": {"amp": 1.0}, "update_noise": -1.0}, "standard deviation >= 0"),
    ({"terms": {"amp": 1.0}, "normalize": -2.0}, "positive norm"),
])
def test_bad_rules_are_rejected_with_the_valid_choices(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Rule(**bad)


def test_user_rule_from_a_plain_dict_round_trips():
    spec = {"terms": {"amp": 1.0, "null": 0.5, "decay": 0.1}, "noise": {"dist": "normal", "std": 1.0}}
    rule = Rule.from_dict(spec)
    assert rule.noise == na.rules.MirrorNoise("normal", 1.0)
    assert Rule.from_dict(rule.to_dict()) == rule
    import pickle
    assert pickle.loads(pickle.dumps(rule)) == rule
    with pytest.raises(ValueError, match="valid: terms, kind"):
        Rule.from_dict({"terms": {"amp": 1.0}, "mirror": True})


@pytest.mark.parametrize("name", ["usf", "frsf"])
def test_weight_angle_of_sign_rules_follows_the_current_weight(name):
    # The first layer sends no error, so its backward skips deriving F; the metric derives it.
    model = na.convert(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)), name)
    model(torch.randn(3, 6)).sum().backward()
    with torch.no_grad():
        model[0].weight.neg_()
    angles = na.metrics.weight_angles(model)
    assert angles["0"] < 60 and torch.equal(torch.sign(model[0].feedback),
                                             torch.sign(model[0].weight))


def test_kind_was_called_feedback():
    """``Rule.kind`` (how F comes about) was ``Rule.feedback``, a name that also means the
    tensor ``layer.feedback``: the old name still works, with a DeprecationWarning."""
    with pytest.warns(DeprecationWarning, match="kind"):
        rule = Rule(feedback="fixed")
    assert rule.kind == "fixed" and rule == Rule(kind="fixed")
    with pytest.warns(DeprecationWarning, match="Rule.kind"):
        assert na.get_rule("usf").feedback == "usf"
    with pytest.warns(DeprecationWarning):
        assert na.get_rule("fa", feedback="usf").kind == "usf"
    assert Rule.from_dict({"kind": "fixed"}) == rule
    assert "feedback" not in rule.to_dict() and rule.to_dict()["kind"] == "fixed"


def test_the_self_term_can_be_overridden():
    assert dict(na.get_rule("sa", self=2.0).terms) == {"self": 2.0, "decay": 1.0}


def test_brsf_with_a_normal_init_draws_half_normal_magnitudes():
    torch.manual_seed(0)
    layer = na.convert(nn.Linear(300, 400), na.get_rule("brsf", init="kaiming_normal"))
    layer(torch.randn(2, 300, requires_grad=True)).sum().backward()
    std = math.sqrt(2 / 300)
    m = (layer.feedback.abs() / std).flatten().double()
    assert abs(m.mean() - math.sqrt(2 / math.pi)) < 0.01  # E|N(0, 1)|
    assert abs(m.square().mean() - 1) < 0.01


@pytest.mark.parametrize("name,former", [("frsf", "feedback_magnitude"),
                                         ("usf", "feedback_scale")])
def test_a_sign_rule_checkpoint_with_its_former_magnitude_buffer_loads(name, former):
    layer = na.convert(nn.Linear(5, 4), name)
    state = layer.state_dict()
    state[former] = layer.feedback.abs()  # as saved before F held its magnitudes itself
    if name == "usf":
        state[former] = state[former][0, 0]  # (usf kept one scale)
    fresh = na.convert(nn.Linear(5, 4), name)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.feedback, layer.feedback)
