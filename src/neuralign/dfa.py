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

**Feedback points** (Launay et al. 2020's "macro" DFA for transformers): ``convert(model,
"dfa", points=[...])`` puts a :class:`~neuralign.layers.DFAPoint` at each named module's
output. In the forward it is the identity; in the backward it drops the gradient that arrives
from above and sends ``D e`` instead (the projection above, per position or pooled). Between
two points, and above the last, the network trains by backprop: a block's layers get the true
gradients of the signal injected at its output. ``error_at`` takes ``e`` at a module's *input*
(the read-out's, before the vocabulary projection, as Launay et al. do) instead of at the
model's output; that module then trains by backprop. Its input holds the channels last
(``[N, *S, C]``), as a point's tensor does.

Under ``torch.compile`` a layer's backward is traced with the forward, before any ``e``
exists, and a write into the slot from a backward would break the graph. So in a compiled
pass, once an earlier pass has shown the output's shape, each layer returns a second output,
a *tap* (an expanded zero of the output's shape), and ``CaptureError``'s backward returns
``e`` as every tap's gradient: the error reaches the layers through the graph itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["DFAState", "CaptureError", "PointFunction", "mark_output", "mark_point",
           "unmark_output", "project_error"]


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
            # (a module's input, under error_at, holds its channels last: stored, like the
            # output, channels first, [N, C, *S])
            ctx.slot["e"] = e.movedim(-1, 1) if ctx.slot.get("last") and e.dim() > 2 else e
            return e, None
        for shape in ctx.taps:
            if shape != e.shape:
                raise examples_error(e.shape[0], f"a layer's input {shape[0]}")
        return (e, None, *[e] * len(ctx.taps))


class PointFunction(torch.autograd.Function):
    """Identity on a feedback point's tensor; its backward sends ``D e`` from the pass's output
    error instead of the gradient arriving from above (see :class:`~neuralign.layers.DFAPoint`)."""

    @staticmethod
    def forward(ctx, x, point, slot):
        ctx.point, ctx.slot, ctx.shape = point, slot, x.shape
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        slot = ctx.slot
        if slot is None or "e" not in slot:
            raise missing_error()
        e, shape, point = slot["e"], ctx.shape, ctx.point
        n = shape[0]
        outputs = e.shape[0] if e.dim() > 0 else 1  # (a 1-D e: one value per example)
        if outputs != n:
            raise examples_error(outputs, f"a feedback point's tensor {n} (shape "
                                          f"{tuple(shape)})")
        v = project_error(e.to(dy.dtype), n, tuple(shape[1:-1]),
                          lambda outputs: point.project(outputs, shape[-1]),
                          point.rule.dfa_scale)
        return point.sent(v.reshape(shape), dy), None, None


def project_error(e: Tensor, n: int, positions: tuple[int, ...],
                  project: Callable[[int], Tensor], scale: str) -> Tensor:
    """dfa's error for an input of ``n`` examples with ``positions``, channels last
    (``[n, *positions, C_in]``), from the output error ``e`` (``[N, C, *S]`` or flat per
    example); ``project(outputs)`` is the layer's ``D``, ``[outputs, C_in]``."""
    if e.dim() > 2 and tuple(e.shape[2:]) == tuple(positions):
        # An output with the input's positions ([N, C, *S], the layout cross_entropy takes,
        # e.g. a language model's logits): each position gets D e_p, its own error (Launay et
        # al. 2020's per-token DFA).
        rows = e.flatten(2).transpose(1, 2)  # [N, P, C]
        D = project(e.shape[1]).to(e.dtype)
        return rows.matmul(D).view(n, *positions, D.shape[1])
    # Otherwise each of the P positions of an example's input gets (D e) / P under
    # dfa_scale='mean': what backprop would send through a global average pooling followed by
    # D, so a convolution's weight gradient, a sum over positions, has the scale a Linear
    # layer's would; 'broadcast' sends D e itself to every position (BioTorch's form).
    # (per example, flattened; a 1-D e is one example's, unbatched, or one value per example)
    e = e.reshape(n, math.prod(e.shape[1:]) if e.dim() > 1 else e.numel() // n if n else 1)
    v = e.mm(project(e.shape[1]).to(e.dtype))
    if not positions:  # (a Linear layer's [N, C_in]: D e itself, with no pass over it)
        return v
    if scale == "mean":
        v = v.div_(math.prod(positions))
    return v.view(n, *[1] * len(positions), v.shape[1]).expand(n, *positions, v.shape[1])


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


class _CaptureInput:
    """Under ``error_at``: the module's input through :class:`CaptureError`, so that ``e`` is
    the gradient at the read-out's input."""

    def __init__(self, state: DFAState):
        self.state = state

    @torch.compiler.disable  # (eager under torch.compile, as the points: see DFAPoint)
    def __call__(self, module, args):
        slot = self.state.current
        if slot is None:
            return None
        if not args or not isinstance(args[0], Tensor) or args[0].dim() == 0:
            raise TypeError(f"dfa's error_at module ({type(module).__name__}) must take a "
                            f"tensor with the examples first as its first argument")
        if slot.get("last"):
            raise RuntimeError(f"dfa's error_at module ({type(module).__name__}) ran twice in "
                               f"one forward: the error must be taken at one place")
        slot["last"] = True
        return (CaptureError.apply(args[0], slot), *args[1:])


class _ThroughPoint:
    """Forward hook of a feedback point's module: its output through the point."""

    def __call__(self, module, args, output):
        if not isinstance(output, Tensor):
            raise TypeError(f"a dfa feedback point needs its module to return one tensor; "
                            f"{type(module).__name__} returned {type(output).__name__}")
        return module.dfa_point(output)


class _CloseSlot:
    """Under ``error_at``: the slot closes with the model's forward, so that the error_at
    module called on its own afterwards captures nothing."""

    def __init__(self, state: DFAState):
        self.state = state

    def __call__(self, module, args, output):
        self.state.current = None


def mark_output(model: nn.Module, state: DFAState, error_at: nn.Module | None = None) -> None:
    """Hook ``model`` so that its output error (or, with ``error_at``, the gradient at that
    module's input) reaches the dfa layers and feedback points sharing ``state``."""
    model.register_forward_pre_hook(_OpenSlot(state))
    if error_at is None:
        model.register_forward_hook(_CaptureOutput(state))
    else:
        error_at.register_forward_pre_hook(_CaptureInput(state))
        model.register_forward_hook(_CloseSlot(state))


def mark_point(module: nn.Module) -> None:
    """Pass ``module``'s output through its ``dfa_point``."""
    module.register_forward_hook(_ThroughPoint())


def unmark_output(model: nn.Module) -> None:
    """Remove :func:`mark_output`'s and :func:`mark_point`'s hooks."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items()
                        if isinstance(h, _OpenSlot | _CaptureOutput | _CaptureInput | _CloseSlot
                                         | _ThroughPoint)]:
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
        "a dfa layer or feedback point found no output error: its model's output was not "
        "marked, or (with error_at) the error_at module did not run after it in the forward. "
        "Convert the whole model with neuralign.convert (it marks the root module's output), "
        "run the layer inside that model's forward, and give error_at a module that reads "
        "what every point and dfa layer computes (the read-out)")
