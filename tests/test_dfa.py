"""Direct feedback alignment: each layer's update is outer(x_l, (D_l e) ⊙ f'(a_l))."""

import copy
import math

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import neuralign as na


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(),
                         nn.Linear(6, 3)).double()


def test_mlp_updates_equal_the_closed_form():
    m = na.convert(_mlp(), "dfa")
    x = torch.randn(4, 5, dtype=torch.float64)
    t = torch.randint(0, 3, (4,))
    F.cross_entropy(m(x), t).backward()
    with torch.no_grad():
        h0 = torch.tanh(m[0](x))
        h1 = torch.tanh(m[2](h0))
        out = m[4](h1)
        e = (torch.softmax(out, 1) - F.one_hot(t, 3)) / 4  # dL/d(output), independently
        deltas = [(m[0], (e @ m[2].feedback) * (1 - h0**2), x),  # D_l e ⊙ f'(a_l)
                  (m[2], (e @ m[4].feedback) * (1 - h1**2), h0),
                  (m[4], e, h1)]
    for layer, delta, inp in deltas:
        torch.testing.assert_close(layer.weight.grad, delta.T @ inp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, delta.sum(0), rtol=1e-12, atol=1e-12)
    assert m[4].feedback.shape == (3, 6) and m[2].feedback.shape == (3, 7)  # [outputs, in]
    # no layer sends W^T dy: the middle layers' updates differ from backprop's
    angles = na.metrics.backprop_angles(m, lambda: F.cross_entropy(m(x), t))
    assert angles["4"] < 1e-6 and angles["0"] > 1 and angles["2"] > 1


@pytest.mark.parametrize("conv,shape,flat", [(nn.Conv1d, (2, 3, 9), 20),
                                             (nn.Conv2d, (2, 3, 7, 6), 30)])
def test_conv_layers_project_to_channels_shared_over_positions(conv, shape, flat):
    torch.manual_seed(0)
    m = na.convert(nn.Sequential(conv(3, 4, 3, padding=1), nn.ReLU(), conv(4, 5, 3, stride=2),
                                 nn.Flatten(), nn.Linear(flat, 3)).double(), "dfa")
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = m(x)
    e = torch.randn_like(out)
    out.backward(e)
    D0, D2 = m[0].feedback, m[2].feedback
    assert D0.shape == (3, 3) and D2.shape == (3, 4)
    positions = math.prod(shape[2:])  # each position gets D e / P
    spread = (e @ D0 / positions).view(2, 3, *[1] * (len(shape) - 2)).expand(shape)
    torch.testing.assert_close(x.grad, spread, rtol=1e-12, atol=1e-12)


def test_resnet18_trains_and_state_dict_keeps_D(tmp_path):
    torch.manual_seed(0)
    m = na.convert(torchvision.models.resnet18(num_classes=10), "dfa")
    x, t = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.7 * losses[0], losses
    assert m.layer1[0].conv1.feedback.shape == (10, 64)  # a residual block's conv got D e
    torch.save(m.state_dict(), tmp_path / "m.pt")
    fresh = na.convert(torchvision.models.resnet18(num_classes=10), "dfa")
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    for (_, a), (_, b) in zip(na.feedback_layers(m), na.feedback_layers(fresh), strict=True):
        assert torch.equal(a.feedback, b.feedback)
    copied = copy.deepcopy(fresh)  # a copy keeps its own marker and state
    F.cross_entropy(copied(x), t).backward()
    assert copied.fc.weight.grad is not None and fresh.fc.weight.grad is None


def test_mixing_with_other_rules():
    m = na.convert(_mlp(), "sa", layer_rules={"0": "dfa", "2": "dfa", "4": "bp"})
    x = torch.randn(4, 5, dtype=torch.float64)
    m(x).sum().backward()
    assert type(m[4]) is nn.Linear and m[2].feedback.shape == (3, 7)
    assert m[0].weight.grad is not None


def test_projected_error_has_the_scale_of_a_linear_layer_whatever_the_positions():
    """A conv's weight gradient sums over positions; with D e / P per position it is the same
    whatever the input's spatial size (constant inputs: every position alike)."""
    torch.manual_seed(0)
    norms = []
    for size in (4, 16):
        m = na.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 5, 1),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)),
                       "dfa", generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            m[0].weight.copy_(torch.ones_like(m[0].weight))  # a positive drive: ReLU passes
        x = torch.ones(2, 3, size, size)
        m(x).sum().backward()
        norms.append(m[0].weight.grad.norm())
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=0)


def test_several_forwards_before_one_backward_keep_their_own_error():
    m = na.convert(_mlp(), "dfa")
    x1, x2 = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    (m(x1).sum() + 3 * m(x2).square().sum()).backward()
    g = m[0].weight.grad.clone()
    m.zero_grad()
    m(x1).sum().backward()
    m(x2).square().mul(3).sum().backward()
    torch.testing.assert_close(m[0].weight.grad, g)


def test_clear_errors():
    layer = na.FeedbackLinear(3, 2, rule="dfa")
    model = nn.Sequential(nn.Linear(3, 3), layer)  # never converted: the output is not marked
    with pytest.raises(RuntimeError, match="no output error"):
        model(torch.randn(2, 3)).sum().backward()

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(TypeError, match="return one tensor"):
        na.convert(TwoOutputs(), "dfa")(torch.randn(2, 3))
    with pytest.raises(ValueError, match="no W to copy"):
        na.get_rule("dfa", init="weight")


class _Attend(nn.Module):
    """Self-attention over [N, L, E] (or [L, N, E] inside when not batch_first), pooled."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: [N, L, E]
        h = x if self.batch_first else x.transpose(0, 1)
        h, _ = self.attn(h, h, h, need_weights=False)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_sends_each_example_its_own_error(batch_first):
    """Each projection's D e reaches the example whose error it is: a loss on example 0 alone
    leaves every other example's input gradient at zero, in either layout, and example 0's
    own gradient is not (the projections receive the examples first)."""
    torch.manual_seed(0)
    m = na.convert(_Attend(batch_first).double(), "dfa")
    x = torch.randn(5, 6, 8, dtype=torch.float64, requires_grad=True)
    m(x)[0].sum().backward()
    assert x.grad[1:].abs().max() == 0
    assert x.grad[0].abs().max() > 0
    for name in "qkvo":
        assert getattr(m.attn, f"{name}_feedback").feedback.shape == (3, 8)


def test_a_sequence_first_layer_is_refused():
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):  # x: [N, L, 4]; fc sees [L, N, 4]; the output is [N, 2]
            return self.head(self.fc(x.transpose(0, 1)).mean(0))

    m = na.convert(SequenceFirst(), "dfa")
    with pytest.raises(RuntimeError, match="examples first"):
        m(torch.randn(3, 7, 4, requires_grad=True)).sum().backward()


class _PerToken(nn.Module):
    """Linear layers over [N, T, 5] tokens; logits [N, 3, T] (cross_entropy's layout)."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc1(torch.tanh(self.fc0(x))).transpose(1, 2)


def test_an_output_with_the_inputs_positions_sends_each_position_its_own_error():
    """Per-token DFA (Launay et al. 2020): a layer whose input has the output's positions gets
    D e_t at position t, with D of [outputs, in_channels]; the closed form, independently."""
    torch.manual_seed(0)
    m = na.convert(_PerToken().double(), "dfa")
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    t = torch.randint(0, 3, (4, 6))
    F.cross_entropy(m(x), t).backward()
    with torch.no_grad():
        h = torch.tanh(m.fc0(x))
        out = m.fc1(h)  # [N, T, 3]
        e = (torch.softmax(out, -1) - F.one_hot(t, 3)) / t.numel()  # dL/d(logits), per token
        D = m.fc1.feedback
        delta = (e @ D) * (1 - h**2)  # [N, T, 7]: D e_t ⊙ f'(a_t), position by position
    assert D.shape == (3, 7)
    torch.testing.assert_close(m.fc0.weight.grad, delta.flatten(0, 1).T @ x.flatten(0, 1),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.fc1.weight.grad, e.flatten(0, 1).T @ h.flatten(0, 1),
                               rtol=1e-12, atol=1e-12)
    # a longer sequence keeps the same D (it does not depend on the positions)
    m.zero_grad()
    F.cross_entropy(m(torch.randn(4, 9, 5, dtype=torch.float64)), torch.randint(0, 3, (4, 9))
                    ).backward()
    assert torch.equal(m.fc1.feedback, D)


def test_a_convolution_under_a_dense_output_gets_its_pixels_own_error():
    torch.manual_seed(0)
    m = na.convert(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 1)).double(),
                   "dfa")
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    g = torch.randn(2, 3, 5, 5, dtype=torch.float64)  # the output error, per pixel
    (m(x) * g).sum().backward()
    D = m[1].feedback
    assert D.shape == (3, 4)
    sent = torch.einsum("nchw,ck->nkhw", g, D)  # D e at each pixel
    expected = torch.nn.grad.conv2d_weight(x, m[0].weight.shape, sent, padding=1)
    torch.testing.assert_close(m[0].weight.grad, expected, rtol=1e-12, atol=1e-12)


def _conv_net():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))


@pytest.mark.parametrize("make,shape", [(_conv_net, (4, 2, 4, 4)), (_PerToken, (2, 6, 5))])
def test_compiled_dfa_sends_e_through_taps_without_a_graph_break(make, shape):
    """Compiled, a layer's backward is traced before the output's backward has an error to
    give: from the second pass on (the output's shape known) each dfa layer returns a tap whose
    gradient the output's backward sets to e. No graph break, and the steps are eager's."""
    def run(compiled: bool):
        torch.manual_seed(0)
        model = na.convert(make().double(), "dfa")
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            forward(torch.randn(*shape, dtype=torch.float64)).square().sum().backward()
            opt.step()
        return model

    torch._dynamo.reset()
    want, got = run(False), run(True)
    for (n, a), b in zip(got.named_parameters(), want.parameters(), strict=True):
        assert torch.equal(a, b), n
    x = torch.randn(*shape, dtype=torch.float64)  # (through a function: the root's hooks in
    assert torch._dynamo.explain(lambda x: got(x))(x).graph_break_count == 0  # its frame)


def test_a_sequence_first_layer_is_refused_when_compiled_too():
    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.fc(x.transpose(0, 1)).mean(0))

    m = na.convert(SequenceFirst(), "dfa")
    x = torch.randn(3, 7, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="examples first"):
        m(x).sum().backward()  # (the output's shape is known from here on: taps when compiled)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="examples first"):
        torch.compile(m, backend="aot_eager")(x).sum().backward()


# -- the conv error's scale (rule.dfa_scale) ---------------------------------------------------

def _reference_input_gradient(e, D, shape, scale):
    """What each position of an input of ``shape`` [N, C, *S] receives, written out position by
    position: (D e) / P under 'mean', D e under 'broadcast' (D: [outputs, C])."""
    n, c, *space = shape
    P = math.prod(space)
    expected = torch.zeros(shape, dtype=torch.float64)
    for i in range(n):
        sent = torch.einsum("k,kc->c", e[i], D)  # D e for example i, one value per channel
        for p in range(P):
            index = (i, slice(None), *torch.unravel_index(torch.tensor(p), tuple(space)))
            expected[index] = sent / P if scale == "mean" else sent
    return expected


@pytest.mark.parametrize("scale", ["mean", "broadcast"])
@pytest.mark.parametrize("conv,shape,flat", [(nn.Conv1d, (2, 3, 9), 20),
                                             (nn.Conv2d, (2, 3, 7, 6), 30)])
def test_each_dfa_scale_sends_the_written_out_input_gradient(scale, conv, shape, flat):
    torch.manual_seed(0)
    rule = na.get_rule("dfa", dfa_scale=scale)
    m = na.convert(nn.Sequential(conv(3, 4, 3, padding=1), nn.ReLU(), conv(4, 5, 3, stride=2),
                                 nn.Flatten(), nn.Linear(flat, 3)).double(), rule)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = m(x)
    e = torch.randn_like(out)
    out.backward(e)
    expected = _reference_input_gradient(e, m[0].feedback, shape, scale)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)
    # the second conv's input gets the same form; through ReLU's derivative it is the first
    # conv's output gradient, whose sum over examples and positions is that conv's bias gradient
    h = torch.relu(m[0](x.detach()))
    sent = _reference_input_gradient(e, m[2].feedback, h.shape, scale) * (h > 0)
    torch.testing.assert_close(m[0].bias.grad, sent.transpose(0, 1).flatten(1).sum(1),
                               rtol=1e-12, atol=1e-12)


class _Pooled(nn.Module):
    """Linear layers over [N, T, 5] tokens, mean-pooled over T before a read-out: [N, 3]."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.head = nn.Linear(5, 7), nn.Linear(7, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.fc1(torch.tanh(self.fc0(x))).mean(1))


def test_a_linear_layer_over_leading_dimensions_takes_the_scale_too():
    """[N, T, C] tokens under a pooled output: each token gets D e / T ('mean') or D e."""
    grads = {}
    for scale in ("mean", "broadcast"):
        torch.manual_seed(0)
        model = na.convert(_Pooled().double(), na.get_rule("dfa", dfa_scale=scale),
                           generator=torch.Generator().manual_seed(3))
        x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
        e = torch.randn(2, 3, dtype=torch.float64)
        model(x).backward(e)
        sent = torch.einsum("nk,kc->nc", e, model.fc0.feedback)
        expected = sent[:, None].expand(2, 6, 5) / (6 if scale == "mean" else 1)
        torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)
        grads[scale] = x.grad
    torch.testing.assert_close(grads["broadcast"], 6 * grads["mean"], rtol=1e-12, atol=0)


def test_dfa_scale_bad_values_name_the_valid_ones():
    with pytest.raises(ValueError, match="unknown dfa scale 'sum'; valid: mean, broadcast"):
        na.get_rule("dfa", dfa_scale="sum")
    with pytest.raises(ValueError, match="kind='dfa'"):
        na.get_rule("fa", dfa_scale="broadcast")
    rule = na.get_rule("dfa", dfa_scale="broadcast")
    assert na.Rule.from_dict(rule.to_dict()) == rule and hash(rule) != hash(na.get_rule("dfa"))
    from neuralign.train.build import build_rule
    from neuralign.train.config import load_config
    assert build_rule(load_config(None, ["rule.name=dfa", "rule.dfa_scale=broadcast"]).rule
                      ).dfa_scale == "broadcast"
    with pytest.raises(ValueError, match="valid: mean, broadcast"):
        build_rule(load_config(None, ["rule.name=dfa", "rule.dfa_scale=pool"]).rule)


# -- edge cases, as for every rule ---------------------------------------------------------------

def _small_conv_net(scale):
    torch.manual_seed(0)
    return na.convert(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                                    nn.Linear(36, 5)).double(), na.get_rule("dfa", dfa_scale=scale))


@pytest.mark.parametrize("scale", ["mean", "broadcast"])
def test_a_batch_of_zero_examples(scale):
    m = _small_conv_net(scale)
    x = torch.randn(0, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    F.cross_entropy(m(x), torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    assert x.grad.shape == x.shape
    for layer in (m[0], m[2], m[5]):
        assert layer.weight.grad.abs().max() == 0
    # the next, real batch draws D and trains as usual
    F.cross_entropy(m(torch.randn(4, 2, 5, 5, dtype=torch.float64)), torch.arange(4)).backward()
    assert m[2].feedback.shape == (5, 3)
    assert m[0].weight.grad.abs().max() > 0
    tokens = na.convert(_PerToken().double(), "dfa")  # per-position outputs, no examples
    xt = torch.randn(0, 6, 5, dtype=torch.float64, requires_grad=True)
    F.cross_entropy(tokens(xt), torch.zeros(0, 6, dtype=torch.long), reduction="sum").backward()
    assert xt.grad.shape == xt.shape and tokens.fc0.weight.grad.abs().max() == 0


def test_a_one_dimensional_output_is_one_value_per_example():
    """A regression head returning [N] trains as the same head returning [N, 1]."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).double()
    flat = na.convert(nn.Sequential(*base, nn.Flatten(0)), "dfa",
                      generator=torch.Generator().manual_seed(1))
    column = na.convert(base, "dfa", generator=torch.Generator().manual_seed(1))
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    F.mse_loss(flat(x), y).backward()
    F.mse_loss(column(x), y[:, None]).backward()
    torch.testing.assert_close(flat[0].weight.grad, column[0].weight.grad, rtol=1e-12, atol=0)
    assert flat[0].weight.grad.abs().max() > 0


def test_a_scalar_output_is_refused():
    class OwnLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0, self.fc1 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc1(torch.tanh(self.fc0(x))).square().mean()

    with pytest.raises(TypeError, match="examples on its first dimension"):
        na.convert(OwnLoss(), "dfa")(torch.randn(2, 3))
    with torch.no_grad():  # (no backward coming: nothing to refuse)
        na.convert(OwnLoss(), "dfa")(torch.randn(2, 3))


@pytest.mark.parametrize("scale", ["mean", "broadcast"])
def test_gradient_accumulation_equals_one_big_batch(scale):
    """k micro-batches with loss/k give one big batch's W gradients (float64 rounding)."""
    m = _small_conv_net(scale)
    x, t = torch.randn(12, 2, 5, 5, dtype=torch.float64), torch.randint(0, 5, (12,))
    F.cross_entropy(m(x), t).backward()
    big = {name: p.grad.clone() for name, p in m.named_parameters()}
    m.zero_grad()
    k = 3
    for xs, ts in zip(x.chunk(k), t.chunk(k), strict=True):
        (F.cross_entropy(m(xs), ts) / k).backward()
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, big[name], rtol=1e-12, atol=1e-14, msg=name)
    assert big["2.weight"].abs().max() > 0


@pytest.mark.parametrize("init,bound", [("default", 1 / math.sqrt(64)),  # TinyDFA's normalised
                                        ("uniform", 1.0),                 # TinyDFA's raw draw
                                        ("xavier_uniform", math.sqrt(6 / (64 + 10)))])  # BioTorch
def test_the_literatures_draws_of_D(init, bound):
    """D of [outputs, in_channels] = [10, 64]: uniform in ±bound, the bound the init names."""
    torch.manual_seed(0)
    m = na.convert(nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 10)),
                   na.get_rule("dfa", init=init))
    m(torch.randn(3, 5)).sum().backward()
    D = m[2].feedback
    assert D.shape == (10, 64)
    assert D.abs().max() <= bound and D.abs().max() > 0.9 * bound
    assert abs(D.std().item() - bound / math.sqrt(3)) < 0.15 * bound / math.sqrt(3)


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_the_fidelity_dfa_configs_load(dataset):
    """configs/fidelity/lenet_<dataset>_dfa.yaml: the settings docs/fidelity.md's dfa rows ran."""
    from pathlib import Path

    from neuralign.train.build import build_rule
    from neuralign.train.config import load_config

    path = Path(__file__).parent.parent / "configs" / "fidelity" / f"lenet_{dataset}_dfa.yaml"
    cfg = load_config(path)
    rule = build_rule(cfg.rule)
    assert rule.kind == "dfa" and cfg.model.name == "lenet" and cfg.train.epochs == 100
    assert f"-c configs/fidelity/{path.name}" in path.read_text()
