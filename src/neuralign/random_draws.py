"""The random draws: mirror noise and brsf's magnitudes, from torch's generator.

Every draw is torch's own (the default generator of the tensor's device) into fresh memory,
one code path on every device and at every size: ``torch.manual_seed`` and the saved RNG
state govern them, and the same seed gives the same numbers whatever else is installed.
Under ``torch.compile`` each draw runs as an opaque custom op that makes this same eager draw,
so compiled and eager runs draw the same numbers from the same seed (inductor would otherwise
replace them with its own generator's)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["noise_like", "UniformMagnitudes"]


def noise_like(x: Tensor, dist: str, std: float, after: Tensor | None = None) -> Tensor:
    """Fresh noise of ``x``'s shape, dtype, device and memory format: ``N(0, std²)``, or
    (``dist='uniform'``) uniform with that standard deviation, ``U(-√3 std, √3 std)``.

    Args:
        x: the tensor whose shape, dtype, device and layout the noise takes (its values are
            not read).
        dist: ``'normal'`` or ``'uniform'``.
        std: the standard deviation.
        after: under ``torch.compile``, a tensor of the backward (the output's gradient)
            that the draw waits for. AOTAutograd's partitioner would otherwise move a draw
            that needs nothing of the backward into the forward graph and save it, an
            activation-sized tensor (seen under DistributedDataParallel, where the forward
            then drew every step's noise, and probing steps drew it twice). Eager ignores it.

    Returns:
        A new tensor like ``x``.
    """
    out = torch.empty_like(x)
    if torch.compiler.is_compiling():
        torch.ops.neuralign.noise_(out, dist, std, after)
        return out
    return _draw_noise(out, dist, std)


def _draw_noise(out: Tensor, dist: str, std: float) -> Tensor:
    if dist == "normal":
        return out.normal_(0.0, std)
    half_width = std * math.sqrt(3.0)
    return out.uniform_(-half_width, half_width)


@torch.library.custom_op("neuralign::noise_", mutates_args=("out",))
def _noise_op(out: Tensor, dist: str, std: float, after: Tensor | None) -> None:
    """:func:`noise_like`'s draw into ``out``, as an op that ``torch.compile`` keeps whole
    (a mutating op: two draws of one shape are never merged into one); ``after`` is only
    waited for."""
    _draw_noise(out, dist, std)


@_noise_op.register_fake
def _(out: Tensor, dist: str, std: float, after: Tensor | None) -> None:
    return None


class UniformMagnitudes:
    """Draws ``|U(-b, b)|``, that is ``U(0, b)``, into a tensor, on 256 levels: the midpoints
    ``(k + ½) b / 256`` of 256 equal bins, from one random byte an entry; with ``sign``,
    ``copysign(draw, sign)`` (brsf's F). The grid is as fine as a bfloat16's mantissa; the
    mean is exact and the variance ``b²/12 (1 - 2^-16)``.

    The bytes are those of torch's full-range ``random_`` on int64 words, eight entries a
    word: much cheaper than ``uniform_``, one 32-bit draw an entry, which set brsf's cost.
    They are drawn into fresh memory every call, in ``out``'s logical order (so a
    channels_last F gets the same values as a contiguous one).

    Args:
        bound: ``b``, the init's own bound.
    """

    def __init__(self, bound: float):
        self.bound = bound
        self.step = bound / 256
        # byte s in [-128, 128) -> (s + 128.5) step, in one pass: offset + step * s (a 0-d
        # CPU tensor, which any device's op takes)
        self.offset = torch.tensor(128.5 * self.step)

    def __call__(self, out: Tensor, sign: Tensor | None = None) -> Tensor:
        """Fills ``out`` with fresh magnitudes, signed by ``sign`` (``out``'s shape) if given.

        Returns:
            ``out``.
        """
        if torch.compiler.is_compiling():
            # an opaque op that runs this same draw, eagerly, inside the compiled graph
            torch.ops.neuralign.uniform_magnitudes_(out, self.bound, sign)
            return out
        n = out.numel()
        words = torch.empty((n + 7) // 8, dtype=torch.int64, device=out.device)
        s = words.random_(-2**63, None).view(torch.int8)[:n].view(out.shape)
        torch.add(self.offset, s, alpha=self.step, out=out)
        return out if sign is None else torch.copysign(out, sign, out=out)


@torch.library.custom_op("neuralign::uniform_magnitudes_", mutates_args=("out",))
def _uniform_magnitudes_op(out: Tensor, bound: float, sign: Tensor | None) -> None:
    """:class:`UniformMagnitudes` as an op that ``torch.compile`` keeps whole."""
    UniformMagnitudes(bound)(out, sign)


@_uniform_magnitudes_op.register_fake
def _(out: Tensor, bound: float, sign: Tensor | None) -> None:
    return None
