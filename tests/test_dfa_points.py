"""dfa feedback points (Launay et al. 2020): D e injected at block outputs, backprop inside the
blocks, the error taken at the model's output or at the read-out's input (``error_at``)."""

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import neuralign as na


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


class Net(nn.Module):
    """Tokens [N, T, 3] -> logits [N, 5, T] (per position) or [N, 5] (mean-pooled)."""

    def __init__(self, per_position=True):
        super().__init__()
        self.per_position = per_position
        self.embed = nn.Linear(3, 8)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.blocks(self.embed(x))
        return self.head(h).transpose(1, 2) if self.per_position else self.head(h.mean(1))


def _data(per_position, n=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, 3, dtype=torch.float64, generator=g)
    y = torch.randint(5, (n, 6) if per_position else (n,), generator=g)
    return x, y


@pytest.mark.parametrize("per_position", [True, False])
@pytest.mark.parametrize("error_at", [None, "head"])
def test_gradients_equal_a_written_out_reference(per_position, error_at):
    torch.manual_seed(0)
    plain = Net(per_position).double()
    model = na.convert(plain, "dfa", points=["blocks.?"], error_at=error_at)
    x, y = _data(per_position)
    F.cross_entropy(model(x), y).backward()
    # the reference, on the plain model: e at the output (or the head's input), D_k e
    # injected at block k's output (per position, or D e / P at each of the P positions)
    h0 = plain.blocks[0](plain.embed(x))
    h1 = plain.blocks[1](h0)
    pooled = h1.mean(1)
    out = plain.head(h1).transpose(1, 2) if per_position else plain.head(pooled)
    loss = F.cross_entropy(out, y)
    if error_at is None:
        e, = torch.autograd.grad(loss, out, retain_graph=True)
        e = e.transpose(1, 2) if per_position else e  # [N, T, 5] or [N, 5]
    else:
        e, = torch.autograd.grad(loss, h1 if per_position else pooled, retain_graph=True)

    def injected(name, h):
        v = e @ model.get_submodule(name).dfa_point.feedback
        return v if per_position else (v / h.shape[1])[:, None].expand_as(h)

    names = {id(p): n for n, p in plain.named_parameters()}
    ref = {}
    for name, h, below in (("blocks.1", h1, plain.blocks[1]),
                           ("blocks.0", h0, nn.ModuleList([plain.blocks[0], plain.embed]))):
        params = list(below.parameters())
        grads = torch.autograd.grad(h, params, injected(name, h), retain_graph=True)
        ref.update({names[id(p)]: g for p, g in zip(params, grads, strict=True)})
    for n, g in zip(("weight", "bias"), torch.autograd.grad(loss, list(plain.head.parameters())),
                    strict=True):
        ref[f"head.{n}"] = g
    got = dict(model.named_parameters())
    assert set(ref) == set(got)
    for name, g in ref.items():
        torch.testing.assert_close(got[name].grad, g, rtol=1e-12, atol=1e-12, msg=name)
    assert model.blocks[0].dfa_point.feedback.shape == ((8 if error_at else 5), 8)


def test_the_signal_replaces_the_gradient_from_above():
    """A block learns from D e at its output alone: what the block above sends down is
    dropped (here scaled by 1000 on the way, with no effect); exact_backprop gives backprop."""
    torch.manual_seed(0)
    plain = Net().double()
    model = na.convert(plain, "dfa", points=["blocks.?"])
    x, y = _data(True)
    F.cross_entropy(model(x), y).backward()
    g0 = model.blocks[0].a.weight.grad.clone()
    model.zero_grad()
    hook = model.blocks[1].register_full_backward_hook(
        lambda module, grad_in, grad_out: tuple(1000 * g for g in grad_in))
    F.cross_entropy(model(x), y).backward()
    hook.remove()
    torch.testing.assert_close(model.blocks[0].a.weight.grad, g0, rtol=1e-12, atol=1e-12)
    assert (model.blocks[1].a.weight.grad != 0).any()
    # under exact_backprop the points pass the gradient on: plain backprop
    model.zero_grad()
    plain.zero_grad()
    with na.exact_backprop(model):
        F.cross_entropy(model(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=n)
    angles = na.metrics.backprop_angles(model, lambda: F.cross_entropy(model(x), y))
    assert set(angles) == {"blocks.0", "blocks.1"} and all(float(a) > 1 for a in angles.values())


def test_layers_stay_on_backprop_unless_layer_rules_say_otherwise():
    model = na.convert(Net(), "dfa", points=["blocks.?"], error_at="head")
    assert list(na.feedback_layers(model)) == []
    assert [n for n, _ in na.feedback_points(model)] == ["blocks.0", "blocks.1"]
    mixed = na.convert(Net(), "dfa", points=["blocks.?"], layer_rules={"embed": "fa"})
    assert [n for n, _ in na.feedback_layers(mixed)] == ["embed"]
    # error_at's module gives e: it stays on backprop under a per-layer dfa too
    per_layer = na.convert(Net(), "dfa", error_at="head")
    assert "head" not in dict(na.feedback_layers(per_layer))
    assert "blocks.0.a" in dict(na.feedback_layers(per_layer))


def test_error_at_alone_gives_the_read_out_input_error_to_dfa_layers():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 7), nn.Tanh(),
                          nn.Linear(7, 3)).double()
    model = na.convert(plain, "dfa", error_at="4")
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(3, (5,))
    F.cross_entropy(model(x), y).backward()
    h0 = torch.tanh(plain[0](x))
    h1 = torch.tanh(plain[2](h0))
    e, = torch.autograd.grad(F.cross_entropy(plain[4](h1), y), h1)  # the read-out's input's
    assert model[2].feedback.shape == (7, 6)  # D: [the 7 values of e, in_channels]
    delta0 = (e @ model[2].feedback) * (1 - h0**2)
    delta1 = e * (1 - h1**2)
    torch.testing.assert_close(model[0].weight.grad, delta0.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[2].weight.grad, delta1.T @ h0, rtol=1e-12, atol=1e-12)


def test_copy_pickle_state_dict_and_revert():
    torch.manual_seed(0)
    model = na.convert(Net().double(), "dfa", points=["blocks.?"], error_at="head")
    x, y = _data(True)
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        other.zero_grad()
        F.cross_entropy(other(x), y).backward()
        for n, p in other.named_parameters():
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0, msg=n)
    # a fresh conversion (other seeds) loads D from the state dict, made or not
    fresh = na.convert(Net().double(), "dfa", points=["blocks.?"], error_at="head")
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    F.cross_entropy(fresh(x), y).backward()
    for n, p in fresh.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0, msg=n)
    plain = na.revert(model)
    assert list(na.feedback_points(plain)) == []
    assert set(plain.state_dict()) == set(Net().state_dict())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())


def test_a_transformer_language_model_trains_with_points():
    """The character LM's blocks (torch's TransformerEncoderLayer) as feedback points, e at
    the head's input: the loss falls, and every block's parameters get a gradient."""
    from neuralign.models import CharTransformer

    torch.manual_seed(0)
    model = na.convert(CharTransformer(12, 16, dim=16, depth=2, heads=2), "dfa",
                       points=["layers.?"], error_at="head")
    x = (torch.randint(12, (32, 1)) + torch.arange(16)) % 12  # counting: y is x + 1
    y = (x + 1) % 12
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]  # (2.72 -> 1.39 here; backprop reaches 0.09)
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.layers[0].parameters())


@pytest.mark.parametrize("kwargs", [{"points": ["layers.?"], "error_at": "head"},
                                    {"error_at": "head"}])
def test_compiled_equals_eager(kwargs):
    """Under torch.compile the points and the error capture run eagerly (graph breaks)."""
    from neuralign.models import CharTransformer

    torch.manual_seed(0)
    model = na.convert(CharTransformer(12, 16, dim=16, depth=2, heads=2), "dfa", **kwargs)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager")
    x = torch.randint(12, (2, 16))
    for _ in range(2):  # (the second pass: dfa layers' taps once the output's shape is known)
        model.zero_grad()
        twin.zero_grad()
        F.cross_entropy(model(x), x).backward()
        F.cross_entropy(compiled(x), x).backward()
        for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=n)


def test_bad_points_and_error_at_are_clear_errors():
    with pytest.raises(ValueError, match="rule is 'fa'"):
        na.convert(Net(), "fa", points=["blocks.?"])
    with pytest.raises(ValueError, match=r"points \['nope\*'\] match no module"):
        na.convert(Net(), "dfa", points=["nope*"])
    with pytest.raises(ValueError, match="inside other matched modules"):
        na.convert(Net(), "dfa", points=["blocks.*"])
    with pytest.raises(ValueError, match="error_at 'heads' is not a module"):
        na.convert(Net(), "dfa", error_at="heads")
    with pytest.raises(ValueError, match="overlap"):
        na.convert(Net(), "dfa", points=["head"], error_at="head")
    plain = Net()
    with pytest.raises(ValueError, match="'embed' is a layer converted with rule dfa"):
        na.convert(plain, "dfa", points=["embed"], layer_rules={"embed": "dfa"}, inplace=True)
    assert type(plain.embed) is nn.Linear and not list(na.feedback_points(plain))  # untouched
    with pytest.raises(ValueError, match="already converted"):
        na.convert(na.convert(Net(), "dfa", points=["blocks.?"]), "dfa", points=["blocks.?"])
    with pytest.raises(ValueError, match="single layer"):
        na.convert(nn.Linear(3, 3), "dfa", points=["x"])

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x):
            return self.inner(x), x

    model = na.convert(nn.Sequential(Pair()), "dfa", points=["0"])
    with pytest.raises(TypeError, match="return one tensor; Pair returned tuple"):
        model(torch.randn(2, 3, requires_grad=True))
    # the error taken below a point: the point's backward finds no error yet
    bad = na.convert(Net(), "dfa", points=["blocks.1"], error_at="embed")
    with pytest.raises(RuntimeError, match="did not run after it"):
        F.cross_entropy(bad(torch.randn(2, 6, 3)), torch.randint(5, (2, 6))).backward()


def test_report_has_a_row_per_point():
    torch.manual_seed(0)
    model = na.convert(Net().double(), "dfa", points=["blocks.?"], error_at="head")
    x, y = _data(True)
    report = na.report(model, lambda: F.cross_entropy(model(x), y))
    rows = {r.name: r for r in report.layers}
    assert set(rows) == {"blocks.0", "blocks.1"}
    angles = na.metrics.backprop_angles(model, lambda: F.cross_entropy(model(x), y))
    # the local angle: D e against the gradient that arrived from above, written out
    h1 = model.blocks[1](model.blocks[0](model.embed(x)))
    e, = torch.autograd.grad(F.cross_entropy(model.head(h1).transpose(1, 2), y), h1)
    local = {"blocks.1": math.degrees(math.acos(F.cosine_similarity(
        (e @ model.blocks[1].dfa_point.feedback).flatten(), e.flatten(), dim=0)))}
    for name, row in rows.items():
        assert row.error_via == "D (point)" and row.kind == "DFAPoint on Block"
        assert row.backprop_angle == pytest.approx(float(angles[name]), abs=1e-9)
        assert 0 < row.local_angle < 180
    assert rows["blocks.1"].local_angle == pytest.approx(local["blocks.1"], abs=1e-9)
    assert str(report).startswith("neuralign report: 0 feedback layer(s), 2 dfa feedback point(s)")
