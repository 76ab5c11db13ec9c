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
        if layer.feedback.requires_grad:  # (the recipe's sa and kp need no backward)
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


@pytest.fixture(params=["native", "torch"])
def draw_path(request, monkeypatch):
    """Each way of drawing on CPU: the native kernel (``neuralign.native``), and torch's ops
    (the kernel turned off, as without a C compiler)."""
    from neuralign import native

    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None:  # (.ci/run checks that CI builds it)
        pytest.skip("no C compiler here for the native kernels")
    return request.param


@pytest.mark.parametrize("init,shape", [("default", (400, 300)), ("kaiming_uniform", (400, 300)),
                                        ("xavier_uniform", (400, 300)), ("default", (600, 500)),
                                        ("default", (40, 50))])
def test_brsf_magnitudes_are_fresh_uniform_draws(init, shape, draw_path):
    """brsf's fast draw (one random byte an entry, eight per 64-bit word) has the distribution
    the rule specifies, |U(-b, b)| = U(0, b) with the init's own b, on 256 levels (the bins'
    midpoints), independently per entry and per batch: every value on the grid, a chi-square
    test of the 256 levels, the moments, and the correlation between neighbouring entries
    (same word, next word) and between batches, against their sampling error. Without the
    native kernel, (600, 500) is drawn by the hash (2^15 words and more), the others by
    torch's own draw."""
    from neuralign.layers import UNIFORM_BOUNDS

    torch.manual_seed(0)
    layer = na.convert(nn.Linear(shape[1], shape[0]), na.get_rule("brsf", init=init))
    W = layer.weight.detach()
    b = UNIFORM_BOUNDS[init](W)
    # b is the init's own: its draw has std b / sqrt(3)
    ref = na.layers.init_feedback(torch.empty(2000, shape[1]) if init != "xavier_uniform"
                                  else torch.empty(shape), None, init)
    assert abs(ref.std().item() * math.sqrt(3) / b - 1) < 0.01
    draws = []
    for _ in range(2):
        layer(torch.randn(2, shape[1], requires_grad=True)).sum().backward()
        F = layer.feedback
        assert torch.equal(torch.sign(F), torch.sign(W))
        draws.append((F.abs() / b).flatten().double())
    u, v = draws
    n = u.numel()
    level = u * 256 - 0.5  # the level k of (k + 1/2) / 256
    k = level.round()
    assert (level - k).abs().max() < 1e-3 and k.min() >= 0 and k.max() <= 255
    counts = torch.bincount(k.long(), minlength=256).double()
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum().item()
    dof = 255  # its 0.1% critical value, by Wilson & Hilferty's cube-root normal approximation
    assert chi2 < dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    tol = 4 / math.sqrt(n)  # four standard errors (of a correlation)
    assert abs(u.mean() - 0.5) < tol * math.sqrt(1 / 12)
    assert abs(u.var() - (1 - 2**-16) / 12) < tol * math.sqrt(1 / 180)
    z, w = u - 0.5, v - 0.5
    for lag in (1, 2, 3, 7, 8, 9):  # entries from the same 64-bit word, and from the next
        assert abs((z[lag:] * z[:-lag]).mean() / z.var()) < tol, lag
    assert abs((z * w).mean() / z.var()) < tol  # batch to batch
    assert (u != v).float().mean() > 0.99


@pytest.mark.parametrize("shape", [(50, 40), (2**15 - 1, 8), (2**15 + 1, 8), (1000, 999)])
def test_uniform_magnitudes_are_the_bytes_of_seeded_words(shape, draw_path):
    """Each byte s gives (s + 128.5) b / 256. The words are SplitMix64's (random_words), or,
    without the native kernel and below 2^15 words, torch's full-range int64 draw: both
    seeded by torch's generator, so a seed repeats the draw. The native kernel rounds each
    level once, (s + 128.5) · float32(b) / 256, and sets the sign's sign bit (-0.0 too)."""
    from neuralign.draws import HASH_FROM, UniformMagnitudes, random_words

    draw = UniformMagnitudes(0.3)
    out = torch.empty(shape)
    n = out.numel()
    words = (n + 7) // 8
    sign = torch.randn(shape)
    sign.view(-1)[:4] = torch.tensor([0.0, -0.0, float("inf"), -float("inf")])
    for seed in (5, 6):  # twice: the second call reuses the memory the first one kept
        torch.manual_seed(seed)
        got = draw(out).clone()
        torch.manual_seed(seed)
        if words >= HASH_FROM or draw_path == "native":
            w = random_words(words)
        else:
            w = torch.empty(words, dtype=torch.int64).random_(-2**63, None)
        s = w.view(torch.int8)[:n].view(shape).double()
        level = (s + 128.5) * torch.tensor(0.3).item() / 256  # (float32(b), exact in float64)
        if draw_path == "native":
            assert torch.equal(got, level.float())
        else:
            assert torch.allclose(got.double(), level, rtol=0, atol=1e-6)
        torch.manual_seed(seed)
        assert torch.equal(draw(out), got)
        torch.manual_seed(seed)
        assert torch.equal(draw(out, sign), torch.copysign(got, sign))


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


@pytest.mark.parametrize("dist", ["normal", "uniform"])
@pytest.mark.parametrize("extra", [2, 3])  # an odd and an even number of entries (3 m)
@pytest.mark.parametrize("draw_path,least", [("native", "NATIVE_NOISE_FROM"),
                                              ("native", "NOISE_HASH_FROM"),
                                              ("torch", "NOISE_HASH_FROM")], indirect=["draw_path"])
def test_mirror_noise_from_the_hash_is_the_box_muller_of_its_words(dist, extra, least,
                                                                   draw_path):
    """From NOISE_HASH_FROM entries up, on CPU (from NATIVE_NOISE_FROM by the native kernel),
    the noise is made from random_words (seeded by torch): the top 24 bits of each 32-bit half
    as a uniform (k + 1/2) / 2^24, and for normals the Box-Muller transform of pairs, computed
    here in float64 from the same words. Its sample has the distribution's moments and is
    independent across the pairs' halves."""
    from neuralign import draws
    from neuralign.draws import noise_like, random_words

    m = getattr(draws, least) // 3 + extra
    n, std = 3 * m, 0.7  # (where odd, the last pair's cosine is dropped)
    assert n >= getattr(draws, least)
    x = torch.empty(3, m)
    torch.manual_seed(1)
    got = noise_like(x, dist, std)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.manual_seed(1)
    h = (n + 1) // 2
    k = random_words(h if dist == "normal" else (n + 1) // 2).view(torch.int32).double()
    k = torch.div(k, 256, rounding_mode="floor")  # the top 24 bits, [-2^23, 2^23)
    if dist == "normal":
        u = (k[:h] + 2**23 + 0.5) / 2**24
        theta = 2 * math.pi * (k[h:] + 0.5) / 2**24
        r = std * torch.sqrt(-2 * torch.log(u))
        want = torch.cat([r * torch.sin(theta), r * torch.cos(theta)])[:n]
    else:
        w = std * math.sqrt(3)
        want = (k[:n] + 0.5) * 2 * w / 2**24
    torch.testing.assert_close(got.flatten().double(), want, rtol=0, atol=2e-5 * std)
    assert got.isfinite().all()
    z = got.flatten().double() / std
    tol = 4 / math.sqrt(n)  # four standard errors
    assert abs(z.mean()) < tol and abs(z.var() - 1) < tol * (math.sqrt(2) if dist == "normal"
                                                             else math.sqrt(0.8))
    if dist == "normal":
        assert abs(z.pow(4).mean() - 3) < tol * math.sqrt(96)  # kurtosis: Var(z^4) = 96
        a, b = z[:n - h], z[h:]  # the sine and the cosine of the same pairs
        assert abs((a * b).mean()) < tol and abs((a * a * b * b).mean() - 1) < tol * 3
    else:
        assert z.abs().max() <= math.sqrt(3) * (1 + 1e-6)
    torch.manual_seed(1)
    assert torch.equal(noise_like(x, dist, std), got)


def test_large_draws_go_in_chunks_and_the_workspace_stays_bounded(monkeypatch, draw_path):
    """A draw larger than CHUNK_WORDS words is made chunk by chunk, each from its own seed,
    so the kept workspace never grows with the tensor (mirror noise covers activations);
    brsf's native draw keeps no workspace, and has the same chunks."""
    from neuralign import draws

    monkeypatch.setattr(draws, "CHUNK_WORDS", 2**15)
    monkeypatch.setattr(draws, "_WORKSPACE", draws._Workspace())
    x = torch.empty(5, 2**16 + 3)  # 2.5 chunks of normal pairs, the last one odd
    torch.manual_seed(2)
    got = draws.noise_like(x, "normal", 1.0).flatten()
    assert draws._WORKSPACE.counter is None if draw_path == "native" else (
        draws._WORKSPACE.counter.numel() == 2**15)
    torch.manual_seed(2)
    size, want = 2 * 2**15, torch.empty(x.numel())
    for i in range(0, x.numel(), size):  # each chunk as one draw (even the last, small one)
        draws._noise_chunk(want[i:i + size], "normal", 1.0)
    if draw_path == "native":  # (the same words; float32's rounding of log, sin, cos differs)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    else:
        assert torch.equal(got, want)
    brsf = draws.UniformMagnitudes(0.5)
    F = torch.empty(3 * 8 * 2**15 + 7)
    monkeypatch.setattr(draws, "_WORKSPACE", draws._Workspace())
    torch.manual_seed(3)
    brsf(F)
    assert draws._WORKSPACE.counter is None if draw_path == "native" else (
        draws._WORKSPACE.counter.numel() == 2**15)
    torch.manual_seed(3)
    parts = [draws.random_words(2**15), draws.random_words(2**15), draws.random_words(2**15),
             draws.random_words(1)]
    s = torch.cat([w.view(torch.int8) for w in parts])[:F.numel()].double()
    torch.testing.assert_close(F.double(), (s + 128.5) * 0.5 / 256, rtol=0, atol=1e-6)


def test_box_muller_is_finite_and_exact_at_the_extreme_words():
    """The smallest radius word gives u = 2^-25 exactly (not 0: no infinite noise), the
    largest u = 1 - 2^-25 (rounded in float32 to at most 1: a radius of 0 at worst)."""
    from neuralign.draws import box_muller

    lo, hi = -2**23, 2**23 - 1
    bits = torch.tensor([lo, hi, 0, lo, lo, hi], dtype=torch.int32)  # radii, then angles
    out = box_muller(bits.clone(), 1.0, torch.empty(6))
    assert out.isfinite().all()
    r = math.sqrt(-2 * math.log(2**-25))  # 5.887, the largest radius
    theta = 2 * math.pi * (lo + 0.5) / 2**24
    assert out[3].item() == pytest.approx(r * math.cos(theta), rel=1e-5)
    assert out[0].item() == pytest.approx(r * math.sin(theta), rel=1e-4, abs=1e-5)
    assert abs(out[1].item()) < 1e-3 and abs(out[4].item()) < 1e-3  # u near 1: radius near 0


@pytest.mark.parametrize("compiler", ["no-such-compiler", "false"])
def test_native_kernels_are_built_in_the_cache_or_else_off(tmp_path, monkeypatch, compiler):
    """The kernels are compiled into the cache folder, leaving nothing else there; a compiler
    that is missing or fails turns them off with a warning (brsf then draws by torch ops),
    and NEURALIGN_NATIVE=0 turns them off silently."""
    import shutil
    import warnings

    from neuralign import native

    monkeypatch.setenv("NEURALIGN_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        if shutil.which("cc") is not None:
            assert native.library() is not None
            assert [p.name for p in (tmp_path / "native").iterdir()] == [
                p.name for p in (tmp_path / "native").glob("kernels-*.so")] != []
        shutil.rmtree(tmp_path / "native", ignore_errors=True)
        monkeypatch.setenv("CC", compiler)
        native.library.cache_clear()
        with pytest.warns(RuntimeWarning, match="native kernels are off"):
            assert native.library() is None
        layer = na.convert(nn.Linear(30, 20), "brsf")
        layer(torch.randn(2, 30, requires_grad=True)).sum().backward()
        assert torch.equal(torch.sign(layer.feedback), torch.sign(layer.weight))
        monkeypatch.setenv("NEURALIGN_NATIVE", "0")
        native.library.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.library() is None
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("build", [0, 1, 2])
def test_every_build_of_the_native_kernels_draws_the_same(tmp_path, monkeypatch, build):
    """Each way the kernels may build (libmvec and OpenMP; OpenMP alone; neither) gives brsf's
    exact levels, the noise of the torch ops' words, up to float32 rounding, and the
    recipe's step as torch's ops round it."""
    from neuralign import draws, native

    if native.library() is None:
        pytest.skip("no C compiler here for the native kernels")
    monkeypatch.setenv("NEURALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_FLAG_SETS", native._FLAG_SETS[build:build + 1])
    native.library.cache_clear()
    try:
        lib = native.library()
        assert lib is not None and len(list((tmp_path / "native").glob("*.so"))) == 1
        sign = torch.randn(3000)
        F, seed = torch.empty(3000), torch.tensor(12345)
        native.signed_uniform_bytes(lib, F, sign, seed, 0.25 / 256)
        # random_words' and the torch ops' seed, made 12345
        monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: torch.tensor(12345))
        s = draws.random_words(375).view(torch.int8).double()
        assert torch.equal(F, ((s + 128.5) * 0.25 / 256).float().copysign(sign))
        for dist in ("normal", "uniform"):
            got = native.noise(lib, torch.empty(20001), dist, 0.5, seed)
            want = torch.empty(20001)
            draws._noise_chunk(want, dist, 0.5)  # (torch ops: random_words of 12345)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        x, g = torch.randn(40000), torch.randn(40000)  # the recipe's step, as torch rounds it
        want = x.clone().mul_(0.999).add_(g, alpha=-0.01)
        assert native.scale_add(lib, x, g, 0.999, -0.01) and torch.equal(x, want)
    finally:
        native.library.cache_clear()


def test_a_native_build_that_failed_is_not_retried_once_another_is_cached(tmp_path,
                                                                         monkeypatch):
    from neuralign import native

    if native.library() is None:
        pytest.skip("no C compiler here for the native kernels")
    monkeypatch.setenv("NEURALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_FLAG_SETS", ((["-no-such-flag"], []), native._FLAG_SETS[-1]))
    native.library.cache_clear()
    try:
        assert native.library() is not None  # (the second set)
        native.library.cache_clear()
        monkeypatch.setattr(native.subprocess, "run", None)  # no compiler call now
        assert native.library() is not None
    finally:
        native.library.cache_clear()


def test_native_draws_take_channels_last_tensors(monkeypatch):
    """A channels_last convolution's W and F (and its activations' noise) are dense: the
    kernels draw them as they lie in memory, with W's sign at each entry."""
    from neuralign import draws, native

    if native.library() is None:
        pytest.skip("no C compiler here for the native kernels")
    calls = []
    for name in ("signed_uniform_bytes", "noise"):
        kernel = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, k=kernel, n=name: calls.append(n) or k(*a))
    conv = na.convert(nn.Conv2d(16, 32, 3), na.get_rule("brsf")).to(
        memory_format=torch.channels_last)
    x = torch.randn(4, 16, 12, 12).to(memory_format=torch.channels_last).requires_grad_()
    conv(x).sum().backward()
    W, F = conv.weight.detach(), conv.feedback
    assert not W.is_contiguous() and F.stride() == W.stride()
    assert calls == ["signed_uniform_bytes"] * 2  # (at conversion, then in the backward)
    assert torch.equal(torch.sign(F), torch.sign(W))
    level = F.abs() / (1 / math.sqrt(16 * 9)) * 256 - 0.5  # (k + 1/2) b / 256, b = 1/sqrt(fan_in)
    assert (level - level.round()).abs().max() < 1e-3 and len(level.round().unique()) > 200
    noise = draws.noise_like(torch.empty(8, 16, 32, 32).to(memory_format=torch.channels_last),
                             "normal", 1.0)
    assert calls[-1] == "noise" and noise.is_contiguous(memory_format=torch.channels_last)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02


def test_random_words_are_splitmix64_seeded_by_torch():
    """The words equal SplitMix64 (Steele et al. 2014) computed with Python integers, for the
    seed torch's default generator gives; the same torch seed gives the same words."""
    from neuralign.draws import random_words

    M = 2**64 - 1

    def splitmix64(seed, i):
        z = (seed + i * 0x9E3779B97F4A7C15) & M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    torch.manual_seed(3)
    words = random_words(1000)
    torch.manual_seed(3)
    seed = int(torch.randint(2**62, ()))
    for i in (0, 1, 2, 500, 999):
        assert int(words[i]) & M == splitmix64(seed, i)
    torch.manual_seed(3)
    assert torch.equal(random_words(1000), words)
    # in the kept workspace, whose counter made for 1000 words serves 600 too
    torch.manual_seed(3)
    assert torch.equal(random_words(1000, workspace=True), words)
    torch.manual_seed(3)
    short = random_words(600)
    torch.manual_seed(3)
    assert torch.equal(random_words(600, workspace=True), short)


def test_brsf_under_torch_compile_draws_the_same_magnitudes_as_eager():
    """Compiled, brsf's draw is an opaque op running the eager draw (SplitMix64 from 2^15
    words up): no graph break, and the same seed gives eager's F, fresh every batch."""
    def run(compiled: bool):
        torch.manual_seed(0)
        model = na.convert(nn.Sequential(nn.Linear(600, 500), nn.ReLU(), nn.Linear(500, 10)),
                           "brsf")
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        out = []
        for _ in range(2):
            forward(torch.randn(4, 600, requires_grad=True)).sum().backward()
            out.append([m.feedback.clone() for m in (model[0], model[2])])
        return model, out

    torch._dynamo.reset()
    model, got = run(True)
    _, want = run(False)
    for a, b in zip(got, want, strict=True):
        for fa, fb in zip(a, b, strict=True):
            assert torch.equal(fa, fb)
    assert (got[0][0] != got[1][0]).float().mean() > 0.99  # fresh magnitudes
    assert torch._dynamo.explain(model)(torch.randn(4, 600)).graph_break_count == 0
