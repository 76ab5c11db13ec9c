"""Recurrent layers: cells and multi-layer RNN/GRU/LSTM converted; with F = W torch's outputs
and gradients, with any F the errors go back through time through F; revert, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuralign as na
from runs import train_with_recipe

D = torch.float64
I, H, T, B = 5, 7, 6, 3


def _flat(out) -> list[torch.Tensor]:
    items = out if isinstance(out, tuple) else (out,)
    return [t for item in items for t in (item if isinstance(item, tuple) else (item,))]


def _randn(*shape):
    return torch.randn(*shape, dtype=D)


CASES = [
    ("rnncell", lambda: nn.RNNCell(I, H), lambda: (_randn(B, I), _randn(B, H))),
    ("rnncell-relu-nohx", lambda: nn.RNNCell(I, H, nonlinearity="relu"), lambda: (_randn(B, I),)),
    ("grucell", lambda: nn.GRUCell(I, H), lambda: (_randn(B, I), _randn(B, H))),
    ("grucell-nobias-unbatched", lambda: nn.GRUCell(I, H, bias=False), lambda: (_randn(I),)),
    ("lstmcell", lambda: nn.LSTMCell(I, H), lambda: (_randn(B, I), (_randn(B, H), _randn(B, H)))),
    ("lstmcell-unbatched", lambda: nn.LSTMCell(I, H), lambda: (_randn(I), (_randn(H), _randn(H)))),
    ("rnn-3layers-relu", lambda: nn.RNN(I, H, num_layers=3, nonlinearity="relu"),
     lambda: (_randn(T, B, I),)),
    ("gru-bidirectional-2layers", lambda: nn.GRU(I, H, num_layers=2, bidirectional=True),
     lambda: (_randn(T, B, I), _randn(4, B, H))),
    ("gru-batch-first", lambda: nn.GRU(I, H, batch_first=True), lambda: (_randn(B, T, I),)),
    ("gru-unbatched-nobias", lambda: nn.GRU(I, H, bias=False), lambda: (_randn(T, I),)),
    ("lstm-bidirectional-batch-first", lambda: nn.LSTM(I, H, num_layers=2, bidirectional=True,
                                                       batch_first=True),
     lambda: (_randn(B, T, I), (_randn(4, B, H), _randn(4, B, H)))),
    ("lstm-unbatched", lambda: nn.LSTM(I, H), lambda: (_randn(T, I),)),
]
IDS = [c[0] for c in CASES]


def _pair(make, rule):
    torch.manual_seed(0)
    plain = make().double()
    return plain, na.convert(plain, rule)


@pytest.mark.parametrize("name,make,inputs", CASES, ids=IDS)
def test_feedback_equal_to_weight_is_torchs_forward_and_gradients(name, make, inputs):
    plain, conv = _pair(make, na.get_rule("sa", init="weight"))
    torch.manual_seed(1)
    args = inputs()
    for a, b in zip(_flat(plain(*args)), _flat(conv(*args)), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    leaves = [t.detach().clone().requires_grad_() for t in _flat(args)]
    def rebuild(ts):  # the inputs' structure again, with the leaves
        it = iter(ts)
        return tuple(tuple(next(it) for _ in a) if isinstance(a, tuple) else next(it) for a in args)
    params = list(plain.parameters())
    conv_params = [p for n, p in conv.named_parameters() if not n.endswith("feedback")]
    assert len(conv_params) == len(params)
    outs = _flat(plain(*rebuild(leaves)))
    dys = [torch.randn_like(t) for t in outs]
    want = torch.autograd.grad(outs, leaves + params, dys)
    got = torch.autograd.grad(_flat(conv(*rebuild(leaves))), leaves + conv_params, dys)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def _through(x, W, b, Fb):
    """x Wᵀ + b forward, errors back through Fb (autograd alone)."""
    y = x @ Fb.T + (x @ (W - Fb).T).detach()
    return y if b is None else y + b


def test_errors_go_back_through_time_through_feedback():
    """A GRU with random F: the input's gradient is that of a reference GRU written with
    autograd, whose input and hidden maps send errors through their F."""
    plain, conv = _pair(lambda: nn.GRU(I, H), "fa")
    x = _randn(T, B, I).requires_grad_()
    out, _ = conv(x)
    dy = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, dy)

    xr = x.detach().clone().requires_grad_()
    Fi, Fh = conv.ih_l0_feedback.feedback.detach(), conv.hh_l0_feedback.feedback.detach()
    Wi, Wh = plain.weight_ih_l0.detach(), plain.weight_hh_l0.detach()
    bi, bh = plain.bias_ih_l0.detach(), plain.bias_hh_l0.detach()
    h, outs = torch.zeros(B, H, dtype=D), []
    for t in range(T):
        i_r, i_z, i_n = _through(xr[t], Wi, bi, Fi).chunk(3, -1)
        h_r, h_z, h_n = _through(h, Wh, bh, Fh).chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        h = (1 - z) * torch.tanh(i_n + r * h_n) + z * h
        outs.append(h)
    ref = torch.stack(outs)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (want,) = torch.autograd.grad(ref, xr, dy)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (backprop,) = torch.autograd.grad(plain(xr)[0], xr, dy)
    assert not torch.allclose(got, backprop, rtol=1e-3, atol=1e-6)  # F is not W


def test_revert_names_and_refusals():
    plain, conv = _pair(lambda: nn.LSTM(I, H, num_layers=2, bidirectional=True), "kp")
    assert [n for n, _ in na.feedback_layers(conv)] == [
        f"{k}_l{layer}{d}_feedback" for layer in range(2) for d in ("", "_reverse")
        for k in ("ih", "hh")]
    back = na.revert(conv)
    assert type(back) is nn.LSTM and not list(na.feedback_layers(back))
    x = _randn(T, B, I)
    torch.testing.assert_close(back(x)[0], plain(x)[0], rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="proj_size"):
        na.convert(nn.LSTM(I, H, proj_size=3), "sa")
    packed = nn.utils.rnn.pack_padded_sequence(x, [T, T - 1, 2])
    with pytest.raises(NotImplementedError, match="PackedSequence"):
        conv(packed)


def test_a_gru_classifier_trains_with_the_recipe_and_dropout():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(1, 16, num_layers=2, dropout=0.2, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            return self.out(self.gru(x)[0][:, -1])

    for rule in ["sa", "aa", "kp", "ia", "dfa"]:
        torch.manual_seed(0)
        model = na.convert(Net(), rule, on_unsupported="raise")
        x, y = torch.randn(32, 10, 1), torch.randint(0, 3, (32,))
        assert torch.isfinite(train_with_recipe(model, x, y, steps=5, lr=1e-2))
        assert na.bypassed_layers(model, lambda model=model, x=x: model(x)) == []
