"""Direct feedback alignment (Nøkland 2016): the network's output error, sent to every layer.

A ``dfa`` layer sends down ``D e`` instead of ``apply_T(dy, F)``, where ``e`` is the gradient of
the loss with respect to the network's output and ``D`` a fixed random matrix (the layer's
``feedback`` buffer, ``[outputs, in_channels]``: the layout of a Linear map from the layer's
input channels to the outputs, initialised as such a layer's weight). Every layer's input must
hold the examples on its first dimension, as the output does; a layer that sees another
layout (sequence first) is refused in the backward.

Positions, two cases:

* **The output has the input's positions**: an output ``[N, C, *S]`` (the layout
  ``cross_entropy`` takes: a language model's ``[N, vocab, T]`` logits, a segmentation map)
  and a layer whose input has the same positions ``S`` (a Linear layer's ``[N, *S, C_in]``,
  a convolution's ``[N, C_in, *S]``). Each position gets ``D e_s``, its own error, with ``D``
  of ``[C, in_channels]``: the per-token DFA of Launay et al. (2020) for transformers.
* **Otherwise** ``e`` is flattened per example (``outputs`` is its size), and each of the
  input's P positions receives ``D e / P``: what backprop would send through a global average
  pooling followed by D. Without the 1/P, a convolution's weight gradient, a sum over
  positions, would be P times a Linear layer's (a LeNet-5 under SGD diverged in its first
  steps).

Whatever lies below (a nonlinearity, batch norm) applies its own derivative, so the layer
underneath receives ``(D e / P) ⊙ f'(a)`` at its output and updates
``outer(x, (D e / P) ⊙ f'(a))``: Nøkland's rule, in one ordinary backward.

How ``e`` reaches the layers: :func:`mark_output` puts two forward hooks on the root module. The
pre-hook opens a fresh slot for the pass (each layer's Function keeps a reference to it); the
post-hook passes the output through :class:`CaptureError`, whose backward, which autograd runs
before any layer's, writes ``e`` into the slot. Several forward passes before one backward
each keep their own ``e``.

Under ``torch.compile`` a layer's backward is traced with the forward, before any ``e``
exists, and a write into the slot from a backward would break the graph. So in a compiled
pass, once an earlier pass has shown the output's shape, each layer returns a second output,
a *tap* (an expanded zero of the output's shape), and ``CaptureError``'s backward returns
``e`` as every tap's gradient: the error reaches the layers through the graph itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DFAState", "CaptureError", "mark_output", "unmark_output"]


class DFAState:
    """Shared by a model's dfa layers and its output marker: the slot of the current pass;
    under ``torch.compile``, the pass's taps and the output's shape after the examples."""

    def __init__(self):
        self.current: dict | None = None
        self.taps: list[Tensor] | None = None
        self.tail: tuple[int, ...] | None = None


class CaptureError(torch.autograd.Function):
    """Identity on the network output; its backward gives the output error ``e`` to the
    layers: through the pass's slot, or, given taps, as the gradient of each tap."""

    @staticmethod
    def forward(ctx, out, slot, *taps):  # (with ctx: no per-call argument binding)
        ctx.slot, ctx.taps = slot, [t.shape for t in taps]
        return out.clone()

    @staticmethod
    def backward(ctx, e):
        if not ctx.taps:
            ctx.slot["e"] = e
            return e, None
        for shape in ctx.taps:
            if shape != e.shape:
                raise examples_error(e.shape[0], f"a layer's input {shape[0]}")
        return (e, None, *[e] * len(ctx.taps))


class _OpenSlot:
    def __init__(self, state: DFAState):
        self.state = state

    def __call__(self, module, args):
        state = self.state
        state.current = {} if torch.is_grad_enabled() else None
        # Compiled, a layer's backward is traced with the forward, before the output's backward
        # could fill the slot: so from the second pass on (the output's shape known) each
        # layer returns a tap, an expanded zero of the output's shape, whose gradient the
        # output's backward sets to e. The slot is not written, and the graph does not break.
        compiled = torch.compiler.is_compiling() and state.current is not None
        state.taps = [] if compiled and state.tail is not None else None


class _CaptureOutput:
    def __init__(self, state: DFAState):
        self.state = state

    def __call__(self, module, args, output):
        state = self.state
        slot = state.current
        if slot is None:
            return None
        if not isinstance(output, Tensor):
            raise TypeError(f"rule dfa needs the model to return one tensor (the output whose "
                            f"error every layer receives), got {type(output).__name__}")
        if output.dim() == 0:
            raise TypeError("rule dfa needs the model's output to hold the examples on its first "
                            "dimension (each example's error goes to its own inputs), got a 0-d "
                            "tensor: return the outputs and compute the loss outside the model")
        if output.dim() > 1:
            state.tail = tuple(output.shape[1:])
        taps, state.taps = state.taps or [], None
        return CaptureError.apply(output, slot, *taps)


def mark_output(model: nn.Module, state: DFAState) -> None:
    """Hook ``model`` so that its output error reaches the dfa layers sharing ``state``."""
    model.register_forward_pre_hook(_OpenSlot(state))
    model.register_forward_hook(_CaptureOutput(state))


def unmark_output(model: nn.Module) -> None:
    """Remove :func:`mark_output`'s hooks."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, _OpenSlot | _CaptureOutput)]:
            del hooks[key]


def examples_error(outputs: int, inputs: str) -> RuntimeError:
    """The output's examples (``outputs``) do not pair with a layer's (``inputs`` says whose,
    and how many)."""
    return RuntimeError(
        f"dfa: the model's output has {outputs} examples on its first dimension, {inputs}: "
        f"dfa pairs each example's output error with its input, so both must hold the "
        f"examples first (a sequence-first layout does not)")


def missing_error() -> RuntimeError:
    return RuntimeError(
        "a dfa layer found no output error: its model's output was not marked. Convert the "
        "whole model with neuralign.convert (it marks the root module's output), and run the "
        "layer inside that model's forward")
