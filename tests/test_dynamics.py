"""The feedback recipe (``na.feedback_optimizer``): each step against its closed form, the
curvature normalisation (scale-free steps), Kolen-Pollack's exact tracking, noise and
normalisation, state, and training stability under several forward optimizers."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import neuralign as na
from neuralign import terms as T
from neuralign.dynamics import curvature

LEARNED = [r for r in na.list_rules() if na.get_rule(r).learns]


def _linear(rule, seed=0, **kw):
    torch.manual_seed(seed)
    return na.convert(nn.Linear(6, 4).double(), rule, **kw)


def test_sa_step_is_the_closed_form_on_the_current_weight():
    layer = _linear(na.get_rule("sa", self=2.0, decay=0.5))  # F* = 4 W
    opt = na.feedback_optimizer(layer, rate=0.3)
    assert not layer.feedback.requires_grad  # nothing of sa is computed in the backward
    with torch.no_grad():
        layer.weight.mul_(1.5)  # as if W had just taken its step
    F0, W = layer.feedback.detach().clone(), layer.weight.detach()
    opt.step()
    torch.testing.assert_close(layer.feedback.detach(), F0 + 0.3 * (4 * W - F0))


def test_catalog_sa_moves_half_way_per_step():
    layer = _linear("sa")
    opt = na.feedback_optimizer(layer)
    F0 = layer.feedback.detach().clone()
    opt.step()
    torch.testing.assert_close(layer.feedback.detach(), 0.5 * F0 + 0.5 * layer.weight.detach())


@pytest.mark.parametrize("rule", ["aa", "ia", na.Rule(terms={"sparse": 1.0, "null": 0.5,
                                                             "amp": 1.0, "decay": 0.2})])
def test_activity_step_is_minus_rate_over_curvature_times_the_rule_gradient(rule):
    torch.manual_seed(0)
    layer = _linear(rule)
    opt = na.feedback_optimizer(layer, rate=0.7)
    x = torch.randn(32, 6, dtype=torch.float64)
    F0 = layer.feedback.detach().clone()
    state = torch.random.get_rng_state()
    layer(x).sum().backward()
    kappa = float(curvature(layer, opt.state[layer.feedback]))
    assert kappa > 0
    opt.step()
    # the full rule gradient, from the rule's own (plain) backward on the same noise
    ref = copy.deepcopy(layer)
    ref._spec.reset()
    with torch.no_grad():
        ref.feedback.copy_(F0)
    ref.feedback.requires_grad_(True)
    torch.random.set_rng_state(state)
    ref(x).sum().backward()
    torch.testing.assert_close(layer.feedback.detach(), F0 - 0.7 / kappa * ref.feedback.grad)


@pytest.mark.parametrize("rule", ["aa", "ia", na.Rule(terms={"sparse": 1.0, "null": 0.5,
                                                             "amp": 1.0, "decay": 0.2,
                                                             "self": 0.3})])
def test_a_data_curvature_read_off_the_cpu_steps_as_the_host_s_float(rule, monkeypatch):
    """On CPU the recipe reads the data curvature as a float; on an accelerator it stays a 0-d
    tensor (no host synchronisation) and the step's arithmetic is tensor ops: the same step."""
    from neuralign import dynamics

    def run():
        torch.manual_seed(0)
        model = na.convert(nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5)), rule)
        opt = na.feedback_optimizer(model, rate=0.7)
        F0 = model[2].feedback.detach().clone()
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 30)).square().sum().backward()
            opt.step()
        assert (model[2].feedback - F0).abs().max() > 1e-3  # (steps were taken)
        return [model[0].feedback.detach(), model[2].feedback.detach()]

    on_host = run()
    kinds = []

    def on_device(layer, state=None):  # what curvature gives off the CPU
        c = layer.rule.terms
        kappa = c.get("decay", 0.0) + c.get("sparse", 0.0) * state["curv_in"] + \
            c.get("null", 0.0) * state["curv_out"]
        kinds.append(type(kappa))
        return kappa

    monkeypatch.setattr(dynamics, "curvature", on_device)
    for got, want in zip(run(), on_host, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert set(kinds) == {torch.Tensor}


def test_the_power_iteration_s_host_branch_is_the_graph_s_where():
    """The observer's next vector: on CPU with one block a host branch, elsewhere (and
    under torch.compile) ``torch.where``: the same values, bit for bit, for a positive, a
    zero and a NaN norm, and per block for several."""
    from neuralign.dynamics import _normalised

    def where(h, lam, u):
        return torch.where(lam > 0, h / lam.clamp_min(torch.finfo(lam.dtype).tiny), u)

    torch.manual_seed(0)
    u = torch.randn(1, 7)
    for lam in (torch.tensor(3.7), torch.tensor(0.0), torch.tensor(float("nan"))):
        h = torch.randn(1, 7) if lam > 0 else torch.zeros(1, 7)
        assert torch.equal(_normalised(h.clone(), lam, u), where(h, lam, u))
    h = torch.randn(3, 7)
    h[1] = 0
    lam = h.norm(dim=1, keepdim=True)
    u = torch.randn(3, 7)
    got = _normalised(h.clone(), lam, u)
    assert torch.equal(got, where(h, lam, u)) and torch.equal(got[1], u[1])


def test_curvature_estimate_is_the_top_eigenvalue_of_the_sample_gram():
    torch.manual_seed(0)
    layer = _linear(na.Rule(terms={"sparse": 1.0, "amp": 1.0}))
    opt = na.feedback_optimizer(layer)
    x = torch.randn(500, 6, dtype=torch.float64) * torch.tensor([5.0, 1, 1, 1, 1, 0.5],
                                                                 dtype=torch.float64)
    for _ in range(5):  # the same batch: power iteration converges
        layer(x).sum().backward()
    top = torch.linalg.eigvalsh(x.T @ x / len(x))[-1]
    # five backward calls before a step: their curvatures add up, as their gradients do
    torch.testing.assert_close(opt.state[layer.feedback]["curv_in"], 5 * top, rtol=1e-3, atol=0)
    opt.step()  # the step resets them; one call gives the eigenvalue itself
    opt.zero_grad()
    layer(x).sum().backward()
    torch.testing.assert_close(opt.state[layer.feedback]["curv_in"], top, rtol=1e-6, atol=0)


def test_angle_measurements_leave_the_curvature_alone():
    """backprop_angles runs the rule's backward as a measurement: the recipe's curvature (which
    adds up over a step's backward calls) must not count it."""
    torch.manual_seed(0)
    model = na.convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), "aa")
    opt = na.feedback_optimizer(model)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    nn.functional.cross_entropy(model(x), y).backward()
    before = [opt.state[layer.feedback]["curv_in"].clone() for _, layer in na.feedback_layers(model)]
    na.metrics.backprop_angles(model, lambda: nn.functional.cross_entropy(model(x), y))
    after = [opt.state[layer.feedback]["curv_in"] for _, layer in na.feedback_layers(model)]
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


def test_conv_curvatures_match_the_dense_hessian():
    """sparse: the top eigenvalue of the per-sample patch Gram; null: bounded by the overlap
    times the outputs' Gram (checked against the Hessian of the loss form), for convolutions
    and transposed convolutions."""
    torch.manual_seed(0)
    convs = [lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1, bias=False),
             lambda: nn.Conv1d(4, 6, 3, padding=1, groups=2, bias=False),  # block per group
             # (no output_padding here: torch's double backward of conv_transpose refuses it)
             lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, groups=2, bias=False)]
    for make, terms in [(m, t) for m in convs for t in ({"sparse": 1.0, "amp": 1.0},
                                                        {"null": 1.0, "amp": 1.0})]:
        conv = na.convert(make().double(), na.Rule(terms=terms))
        opt = na.feedback_optimizer(conv)
        x = torch.randn(4, conv.in_channels, 9, dtype=torch.float64)
        for _ in range(150):  # power iteration on one batch: converged
            conv(x).sum().backward()
        opt.step()  # (the curvatures add up until a step; one more call gives its own)
        conv(x).sum().backward()
        name = "sparse" if "sparse" in terms else "null"

        def loss(f, name=name, conv=conv, x=x):
            return T.loss(name, conv._spec.ops, x, conv.weight.detach(), f.view_as(conv.weight))

        H = torch.autograd.functional.hessian(loss, conv.weight.detach().flatten().clone())
        top = torch.linalg.eigvalsh(H)[-1]
        est = opt.state[conv.feedback]["curv_in" if name == "sparse" else "curv_out"]
        if name == "sparse":  # power iteration: from below, to within its eigengap's pace
            assert top * (1 - 1e-3) <= est <= top * (1 + 1e-9), (float(top), float(est))
        else:  # an upper bound within the overlap factor
            assert top <= est <= conv._spec.ops.overlap * top + 1e-9, (float(top), float(est))


def test_steps_are_scale_free():
    """The same network on inputs 1000 times larger: the same sequence of F (aa's curvature
    grows with the square of the activity, and so does its gradient)."""
    runs = []
    for scale in (1.0, 1000.0):
        torch.manual_seed(0)
        model = na.convert(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double(),
                           "aa")
        with torch.no_grad():
            model[0].weight.div_(scale)  # the same function of the scaled input
        opt = na.feedback_optimizer(model)
        for _ in range(5):
            x = torch.randn(16, 5, dtype=torch.float64)
            opt.zero_grad()
            model(x * scale).square().sum().backward()
            opt.step()
        runs.append(model[2].feedback.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("forward", ["sgd", "adam"])
def test_kp_feedback_receives_exactly_the_weight_update(forward):
    torch.manual_seed(0)
    model = na.convert(nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3)), "kp")
    groups = na.param_groups(model)
    opt_w = (torch.optim.SGD(groups["forward"], lr=0.1, momentum=0.9, weight_decay=1e-3)
             if forward == "sgd" else torch.optim.Adam(groups["forward"], lr=1e-2))
    opt_f = na.feedback_optimizer(model)
    layer = model[0]
    for _ in range(30):
        x = torch.randn(32, 10)
        F0, W0 = layer.feedback.detach().clone(), layer.weight.detach().clone()
        opt_w.zero_grad()
        opt_f.zero_grad()
        F.cross_entropy(model(x), x[:, :3].argmax(1)).backward()
        opt_w.step()
        opt_f.step()
        dW = layer.weight.detach() - W0
        # F's update: W's update, and the difference shrinks by 1 - rate (0.1)
        torch.testing.assert_close(layer.feedback.detach() - F0, dW - 0.1 * (F0 - W0),
                                   rtol=1e-5, atol=1e-6)
    assert na.metrics.angle(layer.weight, layer.feedback) < 5.0


def test_kp_follows_a_loaded_model_state():
    model = na.convert(nn.Sequential(nn.Linear(4, 3)), "kp")
    opt = na.feedback_optimizer(model)
    other = na.convert(nn.Sequential(nn.Linear(4, 3)), "kp")
    model.load_state_dict(other.state_dict())
    opt.step()
    gap = other[0].feedback - other[0].weight
    torch.testing.assert_close(model[0].feedback - model[0].weight, 0.9 * gap.detach())


def test_update_noise_and_normalisation_are_part_of_the_step():
    rule = na.get_rule("sa", update_noise=0.3, normalize=2.0)
    layer = _linear(rule)
    opt = na.feedback_optimizer(layer, rate=0.5, generator=torch.Generator().manual_seed(5))
    F0, W = layer.feedback.detach().clone(), layer.weight.detach()
    opt.step()
    eps = torch.randn(F0.shape, generator=torch.Generator().manual_seed(5), dtype=F0.dtype)
    want = F0 + 0.5 * (W - F0) + 0.5 * 0.3 * eps  # lr_F = rate / curvature = 0.5
    want = want * 2.0 / want.norm()
    torch.testing.assert_close(layer.feedback.detach(), want)


def test_state_dict_round_trip_continues_exactly():
    def make():
        torch.manual_seed(0)
        model = na.convert(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), "aa",
                           layer_rules={"2": "kp"})
        return model, na.feedback_optimizer(model)

    def train(model, opt, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(8, 5, generator=g)).square().sum().backward()
            opt.step()

    a, oa = make()
    train(a, oa, 3, 1)
    b, ob = make()
    b.load_state_dict(a.state_dict())
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    train(a, oa, 3, 2)
    train(b, ob, 3, 2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_release_gives_the_layers_back_to_the_plain_backward():
    layer = _linear("sa")
    opt = na.feedback_optimizer(layer)
    assert not layer.feedback.requires_grad
    opt.release()
    layer(torch.randn(3, 6, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(layer.feedback.grad, layer.feedback - layer.weight)


def test_a_model_without_learned_feedback_gets_an_empty_recipe():
    model = na.convert(nn.Sequential(nn.Linear(4, 3)), "fa")
    opt = na.feedback_optimizer(model)
    assert [g["params"] for g in opt.param_groups] == [[]]
    opt.zero_grad()
    opt.step()


@pytest.mark.parametrize("rate", [0.0, 1.5, -0.1, True, "fast"])
def test_bad_rates_are_rejected(rate):
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        na.feedback_optimizer(_linear("sa"), rate=rate)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        na.get_rule("sa", rate=rate)


def test_a_learning_rate_scheduler_scales_the_rate():
    layer = _linear("sa")
    opt = na.feedback_optimizer(layer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    F0 = layer.feedback.detach().clone()
    opt.step()
    sched.step()
    torch.testing.assert_close(layer.feedback.detach(), F0 + 0.1 * (layer.weight.detach() - F0))


# -- stability: the recipe under several forward optimizers --------------------------------------
def _mlp():
    layers = [nn.Linear(20, 32), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 4))  # 6 weight layers


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def _task(conv, n=512, seed=0):
    """A learnable 4-class problem: labels from a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g) if conv else torch.randn(n, 20, generator=g)
    teacher = torch.randn(x[0].numel(), 4, generator=g)
    return x, (x.flatten(1) @ teacher).argmax(1)


FORWARD = {"sgd-0.1": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
           "sgd-0.01": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
           "adam-1e-3": lambda p: torch.optim.Adam(p, lr=1e-3)}
#: End-to-end angle bounds (degrees), after 150 steps. kp: F − W has shrunk by 0.9^150, so
#: the updates are backprop's (measured 0.0). sa: F moves half way to W each step, so it trails
#: W by about one step; the angle is as large as one step of W is against W (measured: at most
#: 5.6, under SGD 0.1 with momentum, the fastest-moving W here). aa has no such bound: it
#: corrects F along each input direction in proportion to the input's variance there, and at
#: the initialisation of these deep ReLU nets the hidden activations are nearly
#: one-dimensional (dominated by their mean), so F hardly moves elsewhere and the end-to-end
#: angle is 30-90 degrees (docs/fidelity.md). What aa controls, its lag on the data (variance-
#: weighted), is checked instead: it must shrink.
E2E_BOUND = {"kp": 0.1, "sa": 10.0}


@pytest.mark.slow
@pytest.mark.parametrize("forward", list(FORWARD))
@pytest.mark.parametrize("net", ["mlp6", "cnn"])
@pytest.mark.parametrize("rule", LEARNED)
def test_recipe_keeps_training_finite_under_any_forward_optimizer(rule, net, forward):
    conv = net == "cnn"
    x, y = _task(conv)
    torch.manual_seed(1)
    model = na.convert(_cnn() if conv else _mlp(), rule)
    opt_w = FORWARD[forward](na.param_groups(model)["forward"])
    opt_f = na.feedback_optimizer(model)
    lag0 = na.metrics.feedback_lags(model, lambda: model(x[:128]))
    losses = []
    for step in range(150):
        i = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(x[i]), y[i])
        opt_w.zero_grad()
        opt_f.zero_grad()
        loss.backward()
        opt_w.step()
        opt_f.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(losses))), losses[-5:]
    if rule in E2E_BOUND:
        angles = na.metrics.backprop_angles(model, lambda: F.cross_entropy(model(x[:128]),
                                                                           y[:128]))
        assert max(angles.values()) < E2E_BOUND[rule], (rule, net, forward, angles)
    if rule == "aa":
        lag = na.metrics.feedback_lags(model, lambda: model(x[:128]))
        mean = sum(lag.values()) / len(lag)
        assert mean < 0.6 * sum(lag0.values()) / len(lag0), (lag0, lag)


def _activity_mlp(rule):
    torch.manual_seed(0)
    return na.convert(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)), rule)


@pytest.mark.parametrize("rule", ["aa", "wm", "ia"])
def test_the_recipe_writes_each_step_s_f_grad_into_the_last_one_s_memory(rule):
    """zero_grad keeps the F.grad it drops and the next backward writes into it (a Linear
    layer's product takes ``out=``): the same values as in fresh memory, bit for bit."""
    kept, fresh = _activity_mlp(rule), _activity_mlp(rule)
    opts = [na.feedback_optimizer(m) for m in (kept, fresh)]
    ptrs = []
    for step in range(3):
        x = torch.randn(8, 20, generator=torch.Generator().manual_seed(step))
        for m, opt in zip((kept, fresh), opts, strict=True):
            opt.zero_grad()
            if m is fresh:
                opt._spares.clear()  # nothing kept: the backward takes fresh memory
            torch.manual_seed(step)  # (the same mirror noise)
            m(x).sum().backward()
        for a, b in zip(kept, fresh, strict=True):
            if hasattr(a, "feedback"):
                assert torch.equal(a.feedback.grad, b.feedback.grad)
        ptrs.append([m.feedback.grad.data_ptr() for m in (kept[0], kept[2])])
        for opt in opts:
            opt.step()
    assert ptrs[0] == ptrs[1] == ptrs[2]
    assert torch.equal(kept[2].feedback, fresh[2].feedback)


@pytest.mark.parametrize("hold", ["reference", "view"])
def test_a_kept_f_grad_that_the_caller_still_holds_is_not_overwritten(hold):
    model = _activity_mlp("aa")
    opt = na.feedback_optimizer(model)
    model(torch.randn(8, 20)).sum().backward()
    grad = model[2].feedback.grad
    held = grad if hold == "reference" else grad.view(-1)
    before, ptr = held.clone(), grad.data_ptr()
    del grad
    opt.zero_grad()
    model(torch.randn(8, 20)).sum().backward()
    assert torch.equal(held, before)  # the caller's tensor keeps last step's values
    assert model[2].feedback.grad.data_ptr() != ptr


def test_a_released_recipe_keeps_no_f_grad():
    model = _activity_mlp("aa")
    opt = na.feedback_optimizer(model)
    model(torch.randn(8, 20)).sum().backward()
    opt.zero_grad()
    assert opt._spares
    opt.release()
    assert not opt._spares and model[2]._spec.spare is None


def test_sa_layers_stepped_together_match_the_per_layer_step_bit_for_bit():
    """The recipe steps every plain sa layer in one foreach call per rate; layers with
    anything more (an estimator, update noise, normalisation) keep the per-layer step."""
    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        return na.convert(m, "sa", layer_rules={"4": na.get_rule("sa", update_noise=0.1)})
    together, alone = model(), model()
    opts = [na.feedback_optimizer(m, generator=torch.Generator().manual_seed(1))
            for m in (together, alone)]
    assert set(opts[0]._lerp) == {together[0].feedback, together[2].feedback}
    opts[1]._lerp.clear()  # every layer through the per-layer step
    for step in range(3):
        for m, opt in zip((together, alone), opts, strict=True):
            with torch.no_grad():
                for i in (0, 2, 4):
                    m[i].weight.add_(0.01 * (step + 1))  # as if W had just taken its step
            opt.step()
    for i in (0, 2, 4):
        assert torch.equal(together[i].feedback, alone[i].feedback)


def test_only_layers_that_write_into_kept_memory_keep_their_f_grad():
    """A convolution's product cannot be written into given memory: its F.grad is freed at
    zero_grad as torch's would be, not kept alive for nothing."""
    torch.manual_seed(0)
    model = na.convert(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4)), "aa")
    opt = na.feedback_optimizer(model)
    model(torch.randn(5, 2, 4, 4)).sum().backward()
    opt.zero_grad()
    assert list(opt._spares) == [model[2].feedback]
    assert model[0]._spec.spare is None and model[0].feedback.grad is None


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), (6,)),
    # a convolution on a single output position: its products go tap by tap (ConvOps._taps)
    (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                           nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(4, 3)),
     (2, 2, 2))], ids=["mlp", "conv"])
@pytest.mark.parametrize("name", ["aa", "ia", "wm"])
def test_the_recipe_compiles_without_graph_breaks_and_matches_eager(name, make, shape):
    """Under torch.compile the curvature estimate's backward writes only tensors, so a model
    with the recipe compiles without a graph break, and its steps (8 power iterations at the
    first backward, then 1: a recompile) give eager's F and power-iteration vectors; the
    mirror noise (ia, wm) is eager's draw, so the same seed gives the same F."""
    def run(compiled: bool):
        torch.manual_seed(0)
        model = na.convert(make(), name)
        opt = na.feedback_optimizer(model)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        for _ in range(3):
            x = torch.randn(5, *shape)
            opt.zero_grad()
            forward(x).square().sum().backward()
            opt.step()
        return model, opt

    torch._dynamo.reset()
    want, want_opt = run(False)
    got, got_opt = run(True)
    for (n, a), b in zip(got.named_parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    for fb, state in got_opt.state.items():
        if "u_in" in state:  # (wm has no data curvature)
            assert got_opt._observers[fb].iters == 1 and state["observed"] == 3
    for a, b in zip(got_opt.state.values(), want_opt.state.values(), strict=True):
        for key in ("u_in", "u_out") if "u_in" in a else ():
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert torch._dynamo.explain(got)(torch.randn(5, *shape)).graph_break_count == 0
