"""Recurrent layers with feedback weights: ``RNNCell``, ``GRUCell``, ``LSTMCell`` and the
multi-layer ``RNN``, ``GRU`` and ``LSTM``.

A recurrent layer holds two weights per layer and direction, the input's (``weight_ih``) and
the hidden state's (``weight_hh``), and calls them inside torch's fused kernels. The converted
layer gives each its own feedback layer (a :class:`~neuralign.attention.Projection` over the
module's own Parameter, so gradients reach the very same Parameters) and runs the cell's gates
in plain torch around them, step by step: errors go back through time, and down to the input,
through F. This is slower than torch's fused (and cuDNN) kernels, by the Python loop over time
steps; with F = W it gives torch's outputs and gradients to float tolerance.

The multi-layer modules take ``num_layers``, ``bidirectional``, ``batch_first``, ``bias``,
``dropout`` (between layers, as torch) and unbatched inputs; ``PackedSequence`` inputs and an
LSTM's ``proj_size`` are refused with an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .attention import Projection
from .layers import FEEDBACK_CLASSES, shared_copy
from .rules import Rule, get_rule

__all__ = ["FeedbackRNNCell", "FeedbackGRUCell", "FeedbackLSTMCell", "FeedbackRNN",
           "FeedbackGRU", "FeedbackLSTM"]

State = Tensor | tuple[Tensor, Tensor]


# -- one step of each cell, from the two projections' outputs ------------------------------------
def _rnn_step(nonlinearity: str) -> Callable[..., State]:
    act = torch.tanh if nonlinearity == "tanh" else torch.relu

    def step(gi: Tensor, hh: Callable[[Tensor], Tensor], h: Tensor) -> Tensor:
        return act(gi + hh(h))

    return step


def _gru_step(gi: Tensor, hh: Callable[[Tensor], Tensor], h: Tensor) -> Tensor:
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = hh(h).chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def _lstm_step(gi: Tensor, hh: Callable[[Tensor], Tensor], hc: tuple[Tensor, Tensor]
               ) -> tuple[Tensor, Tensor]:
    h, c = hc
    i, f, g, o = (gi + hh(h)).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _step_of(module: nn.Module) -> Callable[..., State]:
    if isinstance(module, nn.GRUCell | nn.GRU):
        return _gru_step
    if isinstance(module, nn.LSTMCell | nn.LSTM):
        return _lstm_step
    return _rnn_step(str(module.nonlinearity))


class _Converted:
    """``from_module``/``to_module`` of a recurrent container of projections."""

    torch_cls: type[nn.Module]

    @classmethod
    def from_module(cls, module: nn.Module, rule: str | Rule,
                    generator: torch.Generator | None = None):
        """A converted module sharing ``module``'s Parameters, hooks and state."""
        if type(module) is not cls.torch_cls:
            raise TypeError(f"{cls.__name__}.from_module takes a {cls.torch_cls.__name__}, "
                            f"got {type(module).__name__}")
        if getattr(module, "proj_size", 0):
            raise NotImplementedError(f"{type(module).__name__} with proj_size > 0 has no "
                                      f"feedback version yet")
        new = shared_copy(cls, module)
        rule = get_rule(rule)
        for suffix in cls._suffixes(module):  # type: ignore[attr-defined]
            for kind in ("ih", "hh"):
                weight = getattr(module, f"weight_{kind}{suffix}")
                bias = getattr(module, f"bias_{kind}{suffix}", None)
                setattr(new, f"{kind}{suffix}_feedback",
                        Projection(weight, None, bias, None, rule, generator))
        return new

    def to_module(self) -> nn.Module:
        """The plain torch module, sharing this module's Parameters and state."""
        plain = shared_copy(self.torch_cls, self)  # type: ignore[arg-type]
        for name in list(plain._modules):
            if name.endswith("_feedback"):
                plain._modules.pop(name)
        return plain


class _FeedbackCell(_Converted, nn.Module):
    """A converted ``RNNCell``/``GRUCell``/``LSTMCell``: children ``ih_feedback`` and
    ``hh_feedback``."""

    ih_feedback: Projection
    hh_feedback: Projection

    @staticmethod
    def _suffixes(module: nn.Module) -> list[str]:
        return [""]

    def forward(self, input: Tensor, hx: State | None = None) -> State:
        if not torch.is_grad_enabled():  # no gradient: torch's cell itself
            return self.torch_cls.forward(self, input, hx)  # type: ignore[call-arg]
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        H = self.hh_feedback.in_features
        if hx is None:
            zeros = x.new_zeros(x.shape[0], H)
            state: State = (zeros, zeros) if isinstance(self, FeedbackLSTMCell) else zeros
        else:
            state = hx if batched else (tuple(t.unsqueeze(0) for t in hx)  # type: ignore[assignment]
                                        if isinstance(hx, tuple) else hx.unsqueeze(0))
        out = _step_of(self)(self.ih_feedback(x), self.hh_feedback, state)
        if batched:
            return out
        if isinstance(out, tuple):
            return out[0].squeeze(0), out[1].squeeze(0)
        return out.squeeze(0)


class FeedbackRNNCell(_FeedbackCell, nn.RNNCell):  # type: ignore[misc]
    """``nn.RNNCell`` whose input and hidden weights send errors through feedback weights."""

    torch_cls = nn.RNNCell


class FeedbackGRUCell(_FeedbackCell, nn.GRUCell):  # type: ignore[misc]
    """``nn.GRUCell`` whose input and hidden weights send errors through feedback weights."""

    torch_cls = nn.GRUCell


class FeedbackLSTMCell(_FeedbackCell, nn.LSTMCell):  # type: ignore[misc]
    """``nn.LSTMCell`` whose input and hidden weights send errors through feedback weights."""

    torch_cls = nn.LSTMCell


class _FeedbackRecurrent(_Converted, nn.Module):
    """A converted ``RNN``/``GRU``/``LSTM``: children ``ih_l{k}[_reverse]_feedback`` and
    ``hh_l{k}[_reverse]_feedback`` per layer and direction, run step by step."""

    @staticmethod
    def _suffixes(module: Any) -> list[str]:
        dirs = ["", "_reverse"] if module.bidirectional else [""]
        return [f"_l{k}{d}" for k in range(module.num_layers) for d in dirs]

    def forward(self, input, hx: State | None = None):
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise NotImplementedError(f"{type(self).__name__} takes padded tensors, not a "
                                      f"PackedSequence (pad it with pad_packed_sequence)")
        if not torch.is_grad_enabled():  # no gradient: torch's module itself
            return self.torch_cls.forward(self, input, hx)  # type: ignore[call-arg]
        m: Any = self  # (the torch module's attributes)
        lstm = isinstance(self, FeedbackLSTM)
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if m.batch_first and batched:
            x = x.transpose(0, 1)
        dirs = 2 if m.bidirectional else 1
        H, T, B = m.hidden_size, x.shape[0], x.shape[1]
        if hx is None:
            zeros = x.new_zeros(m.num_layers * dirs, B, H)
            h0, c0 = zeros, zeros
        elif lstm:
            h0, c0 = (t if batched else t.unsqueeze(1) for t in hx)
        else:
            h0 = c0 = hx if batched else hx.unsqueeze(1)  # type: ignore[union-attr]
        step = _step_of(self)
        h_n, c_n = [], []
        for k in range(m.num_layers):
            outs = []
            for d, suffix in enumerate(["", "_reverse"][:dirs]):
                ih = getattr(m, f"ih_l{k}{suffix}_feedback")
                hh = getattr(m, f"hh_l{k}{suffix}_feedback")
                # every time step's input projection in one call, examples first (dfa reads
                # the first dimension as the examples)
                gi = ih(x.transpose(0, 1)).transpose(0, 1)
                i = k * dirs + d
                state: Any = (h0[i], c0[i]) if lstm else h0[i]
                seq: list[Tensor] = [x] * T  # (each entry replaced below)
                for t in (range(T - 1, -1, -1) if d else range(T)):
                    state = step(gi[t], hh, state)
                    seq[t] = state[0] if lstm else state
                outs.append(torch.stack(seq))
                h_n.append(state[0] if lstm else state)
                if lstm:
                    c_n.append(state[1])
            x = outs[0] if dirs == 1 else torch.cat(outs, -1)
            if m.dropout and m.training and k < m.num_layers - 1:
                x = F.dropout(x, m.dropout, training=True)
        out = x.transpose(0, 1) if m.batch_first and batched else x
        hs = [torch.stack(h_n)] + ([torch.stack(c_n)] if lstm else [])
        if not batched:
            out, hs = out.squeeze(1), [h.squeeze(1) for h in hs]
        return out, (hs[0], hs[1]) if lstm else hs[0]


class FeedbackRNN(_FeedbackRecurrent, nn.RNN):  # type: ignore[misc]
    """``nn.RNN`` run cell by cell, each layer's weights sending errors through feedback
    weights."""

    torch_cls = nn.RNN


class FeedbackGRU(_FeedbackRecurrent, nn.GRU):  # type: ignore[misc]
    """``nn.GRU`` run cell by cell, each layer's weights sending errors through feedback
    weights."""

    torch_cls = nn.GRU


class FeedbackLSTM(_FeedbackRecurrent, nn.LSTM):  # type: ignore[misc]
    """``nn.LSTM`` run cell by cell, each layer's weights sending errors through feedback
    weights (``proj_size`` is not supported)."""

    torch_cls = nn.LSTM


for _cls in (FeedbackRNNCell, FeedbackGRUCell, FeedbackLSTMCell, FeedbackRNN, FeedbackGRU,
             FeedbackLSTM):
    FEEDBACK_CLASSES[_cls.torch_cls] = _cls  # type: ignore[assignment]
