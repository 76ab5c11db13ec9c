"""Each layer family's linear map and what is derived from it: the only module that knows shapes.

A layer computes ``y = A_W(x) + b``. For its kernel ``K`` (the forward weight ``W`` or the
feedback weight ``F``, both in the forward weight's layout) every layer family provides:

* ``apply(x, K)``: the forward map ``A_K(x)`` (padding included, no bias);
* ``apply_T(y, K, shape)``: its exact adjoint, back in the input space of ``shape``;
* ``outer(x, y)``: the kernel-shaped product, summed over examples and positions, such that
  ``<y, apply(x, K)> == <outer(x, y), K>``;
* the curvature products of the feedback recipe (:meth:`LayerOps.patch_gram`,
  :meth:`LayerOps.output_gram`).

A family writes only its map (:class:`LayerOps` says what that is); the base class derives the
rest with ``torch.func`` (BackPACK's automatic derivatives: slow, exact). The built-in families
(:class:`LinearOps`, :class:`ConvOps`, :class:`ConvTransposeOps`) write fast paths by hand,
private to the class they were written for.

Internally a map is ``core ∘ pad``: ``pad`` is the explicit padding the torch layer applies
before its convolution (non-zero padding modes, or asymmetric ``'same'`` padding), and the
``core_*`` methods act on the padded input. The autograd Function works in that padded space
(it saves the padded input once) and folds gradients back with ``pad_T``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerOps", "LinearOps", "ConvOps", "ConvTransposeOps", "OPS", "ops_for", "DERIVED"]

#: What :class:`LayerOps` derives from a family's map (``core`` and ``forward`` from each
#: other). A family's own version of one of these is a fast path, valid for its own map only.
DERIVED = ("core", "forward", "core_T", "apply_T", "core_outer", "scaled_outer", "backward",
           "bias_grad", "remove_bias", "positions", "from_channels_last", "probe_shape",
           "patch_gram", "output_probe_shape", "output_gram", "overlap")


class LayerOps:
    """Base class: a layer family's linear map, and everything derived from it.

    **What a family writes** (the contract):

    * its map: ``forward(x, W, b)``, the torch layer's own op with bias (bit for bit its
      output), from which ``core(xp, K) = forward(xp, K, None)``; or ``core`` (then
      ``forward`` is ``core`` plus the bias); or both. The map must be linear in the input and
      in the kernel, with the kernel in the layer's weight's layout and the bias added along
      ``channel_dim``. A family that pads explicitly (writes ``pad``, ``pad_T`` and
      ``padded_shape``) writes ``core``, its map on the padded input.
    * ``channel_dim``: the dimension of its input and of its output that holds the channels
      (``-1`` for ``[*, features]``, ``1`` for ``[N, C, *positions]``).
    * the kernel's shape, ``weight_shape``: the constructor's argument, which
      :meth:`from_module` reads from the layer.

    The other layout facts have defaults for torch's kernel layout ``[out, in // groups,
    *kernel]`` (:meth:`out_channels`, :meth:`in_channels`, :meth:`num_samples`). Everything
    in :data:`DERIVED` is then derived from the map: the adjoint and the kernel-shaped product
    as vector-Jacobian products, the bias's from ``channel_dim``, the curvature products as
    the sparse and null terms' Hessians applied to a kernel-shaped probe.

    **Fast paths.** A family may write any method of :data:`DERIVED` itself, for speed.
    Such a shortcut holds for its own class's map only: a subclass that writes its own map
    (``core`` or ``forward``) gets this class's derived version of every method of
    :data:`DERIVED` that it does not write itself, never its parent's shortcut (see
    :meth:`__init_subclass__`; a subclass re-binds a parent's fast path that holds for its map
    too, as :class:`ConvTransposeOps` does).
    """

    #: The dimension of the input and of the output that holds the channels.
    channel_dim: int

    def __init__(self, weight_shape: Sequence[int]):
        self.weight_shape = torch.Size(weight_shape)

    @classmethod
    def from_module(cls, m: Any) -> LayerOps:
        """The ops of the torch layer ``m`` (they keep its weight's shape, nothing else of it)."""
        return cls(m.weight.shape)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The one rule for fast paths: a class that writes its own map starts again from the
        # derived methods (a shortcut written for the parent's map would be silently wrong:
        # a scaled map inherited a curvature 4 times too small).
        super().__init_subclass__(**kwargs)
        if "core" in vars(cls) or "forward" in vars(cls):
            for name in DERIVED:
                if name not in vars(cls):
                    setattr(cls, name, getattr(LayerOps, name))
        if cls.core is LayerOps.core:
            if cls.forward is LayerOps.forward:
                raise TypeError(f"{cls.__name__} has no map: write forward(x, W, b), the torch "
                                f"layer's op, or core(xp, K)")
            if cls.pad is not LayerOps.pad:
                raise TypeError(f"{cls.__name__} pads explicitly: write core(xp, K), its map "
                                f"on the padded input")
        if not hasattr(cls, "channel_dim"):
            raise TypeError(f"{cls.__name__} does not say where its channels are: set "
                            f"channel_dim (-1 for [*, features], 1 for [N, C, *positions])")

    # -- the map ------------------------------------------------------------------------------
    def core(self, xp: Tensor, K: Tensor) -> Tensor:
        """The linear map with kernel ``K`` on an already padded input ``xp``, without bias.
        Derived: :meth:`forward` without bias."""
        return self.forward(xp, K, None)

    def forward(self, x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        """The torch layer's own forward op (bias included): bit for bit its output. Derived:
        :meth:`core` on the padded input, plus the bias (the same up to rounding)."""
        y = self.core(self.pad(x), W)
        return y if b is None else y + self._along_channels(b, y.dim())

    # -- the layout ---------------------------------------------------------------------------
    def pad(self, x: Tensor) -> Tensor:
        """Explicit padding applied before the core map (identity unless overridden)."""
        return x

    def pad_T(self, g: Tensor) -> Tensor:
        """Adjoint of :meth:`pad`."""
        return g

    def padded_shape(self, shape: torch.Size) -> torch.Size:
        """The shape of an input of ``shape`` after :meth:`pad`."""
        return shape

    # (the kernel's layout: Linear and ConvNd: ``[out, in // groups, *kernel]``)
    def out_channels(self, W: Tensor) -> int:
        """The number of output channels (units) of kernel ``W``."""
        return W.shape[0]

    def in_channels(self, W: Tensor) -> int:
        """The number of input channels (features) kernel ``W`` reads."""
        return W.shape[1] * getattr(self, "groups", 1)

    def num_samples(self, x: Tensor | torch.Size, y: Tensor | torch.Size, W: Tensor) -> int:
        """The samples the activity terms average over, from the input ``x`` and the linear
        output ``y`` (tensors or shapes): examples times output positions (a convolution's
        spatial positions, a Linear layer's leading dimensions)."""
        shape = y.shape if isinstance(y, Tensor) else y
        return max(1, math.prod(shape) // self.out_channels(W))

    def _along_channels(self, b: Tensor, dim: int) -> Tensor:
        """``b`` (``[channels]``) viewed to broadcast along ``channel_dim`` of ``dim`` dims."""
        shape = [1] * dim
        shape[self.channel_dim] = -1
        return b.view(shape)

    def positions(self, shape: torch.Size) -> torch.Size:
        """The position dimensions of an input of ``shape``, between the examples and the
        channels (a convolution's spatial ones, a Linear layer's leading ones)."""
        c = self.channel_dim % len(shape)
        return torch.Size(s for d, s in enumerate(shape) if d not in (0, c))

    def from_channels_last(self, v: Tensor, shape: torch.Size) -> Tensor:
        """``v``, laid out ``[N, *positions, C]``, in the layout of an input of ``shape``
        (direct feedback alignment's projected error)."""
        return v.movedim(-1, self.channel_dim).reshape(shape)

    # -- the adjoint and the kernel-shaped product --------------------------------------------
    # (vector-Jacobian products of the map: it is linear, so any point will do, and zeros do)
    def core_T(self, y: Tensor, K: Tensor, xp_shape: torch.Size) -> Tensor:
        """The exact adjoint of :meth:`core`: ``y`` mapped back to a padded input of
        ``xp_shape``."""
        pullback = torch.func.vjp(lambda xp: self.core(xp, K), y.new_zeros(xp_shape))[1]
        return pullback(y)[0]

    def core_outer(self, xp: Tensor, y: Tensor) -> Tensor:
        """The kernel-shaped product of a padded input and an output-shaped ``y``, summed over
        examples and positions: the weight gradient when ``y`` is the output's gradient."""
        pullback = torch.func.vjp(lambda K: self.core(xp, K), xp.new_zeros(self.weight_shape))[1]
        return pullback(y)[0]

    def scaled_outer(self, xp: Tensor, y: Tensor, alpha: float = 1.0,
                     into: Tensor | None = None) -> Tensor:
        """``alpha ·`` :meth:`core_outer`, or, with ``into`` (kernel-shaped), that added into
        ``into`` (returned): the rule's coefficient applied to the kernel-sized product, never
        to the activation-sized ``y``. Here a pass over the kernel; a Linear layer's product
        takes the scale as its own and adds itself into ``into`` (no fresh kernel-sized
        tensor: the feedback recipe's sums, ``RecipeState.grad``)."""
        h = self.core_outer(xp, y)
        if into is not None:
            return into.add_(h, alpha=alpha)
        return h if alpha == 1 else h.mul_(alpha)

    def bias_grad(self, dy: Tensor) -> Tensor:
        """The bias gradient: ``dy`` summed over everything but the output channels."""
        c = self.channel_dim % dy.dim()
        dims = [d for d in range(dy.dim()) if d != c]
        return dy.sum(dims) if dims else dy  # (an empty list would sum over everything)

    def remove_bias(self, out: Tensor, b: Tensor) -> Tensor:
        """``out - b``: the linear output before bias, from the layer's output."""
        return out - self._along_channels(b, out.dim())

    def backward(
        self, dy: Tensor, xp: Tensor, K: Tensor, mask: tuple[bool, bool, bool]
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(apply_T(dy, K) in padded space, outer(x, dy), bias grad)``, each only if masked in."""
        need_x, need_w, need_b = mask
        dxp = self.core_T(dy, K, xp.shape) if need_x else None
        dw = self.core_outer(xp, dy) if need_w else None
        db = self.bias_grad(dy) if need_b else None
        return dxp, dw, db

    # -- the curvature products of the feedback recipe ----------------------------------------
    # The sparse and null terms are quadratic in F: each one's gradient at F = u is its Hessian
    # applied to u (times the samples). Derived here on the whole kernel, exact for any map; a
    # family may probe a smaller space by hand (one output channel per group, the outputs'
    # channels) where its map's structure allows.
    def probe_shape(self, W: Tensor) -> tuple[int, ...]:
        """The shape of the vector :meth:`patch_gram` acts on: blocks along the first
        dimension, each iterated on its own (derived: the whole kernel, one block)."""
        return (1, *W.shape)

    def patch_gram(self, xp: Tensor, u: Tensor) -> Tensor:
        """``Σ_p patch_p patch_pᵀ u`` (summed over examples and positions), per block: the
        sparse term's Hessian, times its samples, applied to ``u`` (of :meth:`probe_shape`).
        Derived: ``outer(x, apply(x, u))`` for ``u`` the whole kernel."""
        return self.core_outer(xp, self.core(xp, u[0]))[None]

    def output_probe_shape(self, W: Tensor) -> tuple[int, ...]:
        """The shape of the vector :meth:`output_gram` acts on (derived: the whole kernel,
        one block)."""
        return (1, *W.shape)

    def output_gram(self, y: Tensor, u: Tensor, xp_shape: torch.Size | None = None) -> Tensor:
        """The null term's curvature product for the outputs ``y`` of a padded input of
        ``xp_shape``, on ``u`` of :meth:`output_probe_shape`: times :attr:`overlap`, its top
        eigenvalue bounds that of the null term's Hessian (times its samples). Derived: that
        Hessian applied to ``u``, the whole kernel, ``outer(apply_T(y, u), y)`` (the overlap
        is 1). The built-in families' is ``Σ_p y_p y_pᵀ u`` over examples and positions, for
        ``u`` of ``[out_channels]``: the outputs' Gram matrix."""
        if xp_shape is None:
            raise ValueError(f"{type(self).__name__}.output_gram needs the input's shape")
        z = self.pad(self.pad_T(self.core_T(y, u[0], xp_shape)))
        return self.core_outer(z, y)[None]

    @property
    def overlap(self) -> int:
        """The factor by which the null term's curvature can exceed :meth:`output_gram`'s
        (1 for the derived, exact one; for a convolution's output Gram, at most how many
        output positions read one input position)."""
        return 1

    # -- the public maps, in the layer's real input space -------------------------------------
    def apply(self, x: Tensor, K: Tensor) -> Tensor:
        """The layer's linear map with kernel ``K``, padding included, without bias."""
        return self.core(self.pad(x), K)

    def apply_T(self, y: Tensor, K: Tensor, shape: torch.Size | None = None) -> Tensor:
        """The exact adjoint of :meth:`apply`: ``y`` mapped back to an input of ``shape``
        (required for convolutions, whose output does not fix the input's size)."""
        if shape is None:
            raise ValueError(f"{type(self).__name__}.apply_T needs the input shape")
        return self.pad_T(self.core_T(y, K, self.padded_shape(torch.Size(shape))))

    def outer(self, x: Tensor, y: Tensor) -> Tensor:
        """``outer(x, y)``, in the kernel's layout: ``outer(x, dy)`` is the weight gradient."""
        return self.core_outer(self.pad(x), y)


def _rows(t: Tensor) -> Tensor:
    """``t`` as ``[rows, features]``, every leading dimension flattened (``reshape(-1, 0)``
    is ambiguous for a layer with no inputs)."""
    return t.flatten(0, -2) if t.dim() > 1 else t[None]


def _linear_outer(xp: Tensor, y: Tensor, alpha: float = 1.0, into: Tensor | None = None
                  ) -> Tensor:
    """``alpha · Σ y xᵀ`` over every leading dimension, added into ``into`` when given (the
    scale is the product's own: no pass of its own)."""
    if y.dim() != 2:  # ([N, features] needs no reshape: a few µs a call on small layers)
        y, xp = _rows(y), _rows(xp)
    if into is not None:
        if into.dtype == xp.dtype:
            return into.addmm_(y.t(), xp, alpha=alpha)
        return into.add_(torch.mm(y.t(), xp), alpha=alpha)  # (under autocast)
    if alpha == 1:
        return torch.mm(y.t(), xp)
    out = xp.new_empty(y.shape[1], xp.shape[1])
    return out.addmm_(y.t(), xp, beta=0, alpha=alpha)  # (beta 0: out's values are not read)


class LinearOps(LayerOps):
    """``nn.Linear`` with any number of leading dimensions (``[*, in] -> [*, out]``). Every
    method here is a fast path for this map (see :class:`LayerOps`)."""

    channel_dim = -1

    def core(self, xp, K):
        return F.linear(xp, K)

    def core_T(self, y, K, xp_shape=None):
        return y.matmul(K)

    def apply_T(self, y, K, shape=None):
        return y.matmul(K)

    def core_outer(self, xp, y):
        return _linear_outer(xp, y)

    def scaled_outer(self, xp, y, alpha=1.0, into=None):
        return _linear_outer(xp, y, alpha, into)

    def bias_grad(self, dy):
        return dy.sum(0) if dy.dim() == 2 else _rows(dy).sum(0)

    def backward(self, dy, xp, K, mask):
        # (on [N, features], the three products inline: on small layers each Python call of
        # the generic backward costs what a small product does)
        if dy.dim() != 2:
            return super().backward(dy, xp, K, mask)
        need_x, need_w, need_b = mask
        return (dy.mm(K) if need_x else None, dy.t().mm(xp) if need_w else None,
                dy.sum(0) if need_b else None)

    # (the sparse term's Hessian is the inputs' Gram for every output unit alike, and the
    # null term's the outputs' Gram for every input feature alike: one unit, one feature)
    def probe_shape(self, W):
        return (1, *W.shape[1:])

    def patch_gram(self, xp, u):
        x2 = xp if xp.dim() == 2 else _rows(xp)
        return x2.t().mv(x2.mv(u[0]))[None]

    def output_probe_shape(self, W):
        return (W.shape[0],)

    def output_gram(self, y, u, xp_shape=None):
        y2 = y if y.dim() == 2 else _rows(y)
        return y2.t().mv(y2.mv(u))

    def remove_bias(self, out, b):
        return out - b

    def from_channels_last(self, v, shape):
        return v.reshape(shape)

    def forward(self, x, W, b):
        return F.linear(x, W, b)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: Most output positions of a convolution whose weight gradient may go tap by tap (ConvOps._taps).
TAPS_MAX_POSITIONS = 1


def _tap_spans(n_in: int, n_out: int, k: int, stride: int, dilation: int, padding: int
               ) -> list[tuple[int, slice, slice]]:
    """Along one dimension, each kernel index ``j`` whose tap reads inside the input, with the
    outputs ``i`` it reads for (``0 <= i·stride + j·dilation − padding < n_in``) and the
    inputs it reads there (a slice with the stride's step)."""
    spans = []
    for j in range(k):
        off = j * dilation - padding
        lo, hi = max(0, -(off // stride)), min(n_out, (n_in - 1 - off) // stride + 1)
        if hi > lo:
            first = lo * stride + off
            spans.append((j, slice(lo, hi), slice(first, first + (hi - lo - 1) * stride + 1,
                                                  stride)))
    return spans


class ConvOps(LayerOps):
    """``nn.Conv1d/2d/3d`` with stride, padding (ints, ``'same'``, ``'valid'``, any
    ``padding_mode``), dilation and groups.

    Args:
        dim: number of spatial dimensions.
        weight_shape: ``[out_channels, in_channels // groups, *kernel]``.
        stride: per spatial dimension.
        padding: symmetric zero padding given to the convolution itself.
        dilation: per spatial dimension.
        pre_pad: an ``F.pad`` tuple applied first (last dimension first), or ``None``.
        pad_mode: ``'constant'``, ``'reflect'``, ``'replicate'`` or ``'circular'`` for ``pre_pad``.
        groups: convolution groups.

    Every method here is a fast path for this map (see :class:`LayerOps`).
    """

    channel_dim = 1

    def __init__(self, dim, weight_shape, stride, padding, dilation, groups, pre_pad=None,
                 pad_mode="constant"):
        super().__init__(weight_shape)
        self.dim = dim
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = groups
        self.pre_pad = tuple(pre_pad) if pre_pad is not None and any(pre_pad) else None
        self.pad_mode = pad_mode
        self._conv = _CONV[dim]
        self._tap_plans: dict[tuple, list | None] = {}  # per (input, output) spatial size
        # along each dimension, taps j*dilation land on one input position from at most
        # ceil(k / (stride / gcd(stride, dilation))) output positions
        self._overlap = math.prod(
            -(-k // (s // math.gcd(s, d)))
            for k, s, d in zip(self.weight_shape[2:], self.stride, self.dilation, strict=True))

    @classmethod
    def from_module(cls, m: nn.modules.conv._ConvNd) -> ConvOps:
        """The exact map of a torch convolution, padding included."""
        dim = len(m.kernel_size)
        if m.transposed:
            raise TypeError(f"{type(m).__name__} is a transposed convolution; not supported")
        if m.padding_mode != "zeros":
            # torch pads explicitly with _reversed_padding_repeated_twice, then convolves unpadded.
            return cls(dim, m.weight.shape, m.stride, (0,) * dim, m.dilation, m.groups,
                       m._reversed_padding_repeated_twice, m.padding_mode)
        if m.padding == "valid":
            return cls(dim, m.weight.shape, m.stride, (0,) * dim, m.dilation, m.groups)
        if m.padding == "same":
            # As ATen does: symmetric padding, and the odd extra one on the right, explicitly.
            left, extra = [], []
            for d, k in zip(m.dilation, m.kernel_size, strict=True):
                total = d * (k - 1)
                left.append(total // 2)
                extra.append(total - 2 * (total // 2))
            pre = []
            for e in reversed(extra):
                pre += [0, e]
            return cls(dim, m.weight.shape, m.stride, left, m.dilation, m.groups, pre, "constant")
        return cls(dim, m.weight.shape, m.stride, m.padding, m.dilation, m.groups)

    # -- padding ------------------------------------------------------------------------------
    def pad(self, x):
        if self.pre_pad is None:
            return x
        return F.pad(x, self.pre_pad, mode=self.pad_mode)

    def padded_shape(self, shape):
        if self.pre_pad is None:
            return shape
        shape = list(shape)
        for i in range(len(self.pre_pad) // 2):
            shape[-1 - i] += self.pre_pad[2 * i] + self.pre_pad[2 * i + 1]
        return torch.Size(shape)

    def pad_T(self, g):
        if self.pre_pad is None:
            return g
        for i in range(len(self.pre_pad) // 2):
            g = _pad_T_dim(g, g.dim() - 1 - i, self.pre_pad[2 * i], self.pre_pad[2 * i + 1],
                           self.pad_mode)
        return g

    # -- core convolution ---------------------------------------------------------------------
    def core(self, xp, K):
        return self._conv(xp, K, None, self.stride, self.padding, self.dilation, self.groups)

    def _conv_backward(self, dy, xp, K, mask, bias=False):
        return torch.ops.aten.convolution_backward(
            dy, xp, K, [K.shape[0]] if bias else None, self.stride, self.padding,
            self.dilation, False, [0] * self.dim, self.groups, list(mask))

    def core_T(self, y, K, xp_shape):
        # Only the input's shape matters for the input gradient: a broadcast empty stands in.
        xp = y.new_empty(1).expand(xp_shape)
        return self._conv_backward(y, xp, K, (True, False, False))[0]

    def core_outer(self, xp, y):
        h = self._outer_by_taps(xp, y)
        if h is not None:
            return h
        K = xp.new_empty(1).expand(self.weight_shape)
        return self._conv_backward(y, xp, K, (False, True, False))[1]

    def _taps(self, in_size: torch.Size, out_size: torch.Size) -> list | None:
        """How the weight gradient goes tap by tap on CPU (:meth:`_tap_plan`), or None for
        oneDNN's: tap by tap where the output has at most ``TAPS_MAX_POSITIONS`` positions
        and the kernel's reads land in the zero padding at least half the time (or it has one
        tap). There oneDNN's weight gradient runs up to ten times slower than the forward
        (resnet18's layer4 at 32 px: a 3x3 kernel on a 1x1 output reads padding with 8 taps
        of 9), and a product per tap skips the padding; on a 2x2 output it does not pay
        (``benchmarks/conv_outer.py``)."""
        key = (tuple(in_size), tuple(out_size))
        if key in self._tap_plans:
            return self._tap_plans[key]
        plan = None
        if math.prod(out_size) <= TAPS_MAX_POSITIONS:
            plan, inside = self._tap_plan(in_size, out_size)
            if math.prod(self.weight_shape[2:]) > 1 and inside > 0.5:
                plan = None
        if not torch.compiler.is_compiling():  # (traced, the plan is made again: no side effect)
            self._tap_plans[key] = plan
        return plan

    def _tap_plan(self, in_size: torch.Size, out_size: torch.Size) -> tuple[list, float]:
        """Every kernel tap that reads inside the input: its index and, per dimension, the
        slices of the outputs it reads for and of the inputs it reads; and the share of the
        kernel's reads (over all outputs) that land inside the input."""
        per_dim = [_tap_spans(*a) for a in zip(in_size, out_size, self.weight_shape[2:],
                                               self.stride, self.dilation, self.padding,
                                               strict=True)]
        inside = math.prod(sum(s.stop - s.start for _, s, _ in d) for d in per_dim)
        plan = [tuple(zip(*taps, strict=True)) for taps in itertools.product(*per_dim)]
        return plan, inside / (math.prod(self.weight_shape[2:]) * math.prod(out_size))

    def _outer_by_taps(self, xp: Tensor, y: Tensor, taps: list | None = None) -> Tensor | None:
        """:meth:`core_outer` (``y`` with any number of channels) as one product per tap over
        the outputs whose tap reads inside the input, ``dW[:, :, j] = Σ y[:, :, outputs]
        x[:, :, inputs]ᵀ``, on CPU where :meth:`_taps` chooses it (or by the given ``taps``);
        else None."""
        if taps is None:
            if self.groups != 1 or xp.device.type != "cpu":
                return None
            taps = self._taps(xp.shape[2:], y.shape[2:])
            if taps is None:
                return None
        c_out, c_in = y.shape[1], xp.shape[1]
        out = y.new_zeros(c_out, c_in, *self.weight_shape[2:])
        for j, outputs, inputs in taps:
            ys = y[(slice(None), slice(None), *outputs)].transpose(0, 1).reshape(c_out, -1)
            xs = xp[(slice(None), slice(None), *inputs)].transpose(0, 1).reshape(c_in, -1)
            out[(slice(None), slice(None), *j)] = ys.mm(xs.t())
        return out

    # (the sparse term's Hessian is the input patches' Gram for every output channel of a
    # group alike: one channel per group. The null term's is bounded by the outputs' Gram
    # times the overlap)
    @property
    def overlap(self):
        return self._overlap

    def probe_shape(self, W):
        return (self.groups, *W.shape[1:])

    def patch_gram(self, xp, u):
        # one output channel per group: conv with u, then the weight gradient in u's shape
        v = self._conv(xp, u, None, self.stride, self.padding, self.dilation, self.groups)
        h = self._outer_by_taps(xp, v)
        return h if h is not None else self._conv_backward(v, xp, u, (False, True, False))[1]

    def output_probe_shape(self, W):
        return (self.out_channels(W),)

    def output_gram(self, y, u, xp_shape=None):
        # (two batched products, no activation-sized temporary: 3-4 times einsum's speed on
        # resnet18's outputs)
        y3 = y.flatten(2)  # [N, C_out, positions]
        if y3.shape[2] == 1:  # (one position: a Linear layer's two products)
            y2 = y3.squeeze(2)
            return y2.t().mv(y2.mv(u))
        # (bmm, not matmul: matmul takes another path traced than eager, with another rounding)
        v = torch.bmm(u.expand(y3.shape[0], 1, -1), y3)  # [N, 1, positions]: u·y at each
        return torch.bmm(y3, v.transpose(1, 2)).sum(0).view(-1)

    def backward(self, dy, xp, K, mask):
        # One call gives the input gradient through K, the weight gradient and the bias gradient
        # (the weight gradient does not depend on the kernel passed in).
        if not any(mask):
            return None, None, None
        dxp, dw, db = self._conv_backward(dy, xp, K, mask, bias=mask[2])
        return dxp if mask[0] else None, dw if mask[1] else None, db if mask[2] else None

    def forward(self, x, W, b):
        return self._conv(self.pad(x), W, b, self.stride, self.padding, self.dilation, self.groups)


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class ConvTransposeOps(ConvOps):
    """``nn.ConvTranspose1d/2d/3d`` with stride, padding, ``output_padding``, dilation and
    groups (torch allows zero padding only). The map is the adjoint of a convolution, so its
    adjoint is that convolution; both, and the weight gradient, come from aten's
    ``convolution_backward`` with ``transposed=True``. The kernel's layout is torch's,
    ``[in_channels, out_channels // groups, *kernel]``.

    Args:
        dim: number of spatial dimensions.
        weight_shape: ``[in_channels, out_channels // groups, *kernel]``.
        stride: per spatial dimension.
        padding: per spatial dimension (taken off the full output).
        output_padding: per spatial dimension (added to one side of the output).
        dilation: per spatial dimension.
        groups: convolution groups.
    """

    def __init__(self, dim, weight_shape, stride, padding, output_padding, dilation, groups):
        super().__init__(dim, weight_shape, stride, padding, dilation, groups)
        self.output_padding = tuple(output_padding)
        self._conv = _CONV_T[dim]
        # each input position feeds one output position per tap: the adjoint reads them all
        self._overlap = math.prod(self.weight_shape[2:])

    # ConvOps's fast paths that hold for this map too: they go through _conv_backward, which
    # is the transposed convolution's here, or read only the output's channels. (A class that
    # writes its own map gets LayerOps's derived version of every other: LayerOps's docstring.)
    core_T = ConvOps.core_T
    backward = ConvOps.backward
    overlap = ConvOps.overlap
    output_probe_shape = ConvOps.output_probe_shape
    output_gram = ConvOps.output_gram

    @classmethod
    def from_module(cls, m: nn.modules.conv._ConvNd,
                    output_padding: tuple[int, ...] | None = None) -> ConvTransposeOps:
        """The exact map of a torch transposed convolution (``output_padding``: the one a
        call's ``output_size`` asks for, instead of the layer's)."""
        return cls(len(m.kernel_size), m.weight.shape, m.stride, m.padding,
                   m.output_padding if output_padding is None else output_padding,
                   m.dilation, m.groups)

    def out_channels(self, W):
        return W.shape[1] * self.groups

    def num_samples(self, x, y, W):
        # Examples times *input* positions: each input position meets each tap once, so that
        # weight mirror's F = W holds (output positions outnumber input ones by the stride).
        shape = x.shape if isinstance(x, Tensor) else x
        return max(1, math.prod(shape) // self.in_channels(W))

    def in_channels(self, W):
        return W.shape[0]

    def probe_shape(self, W):
        return (self.groups, W.shape[0] // self.groups, *W.shape[2:])

    def core(self, xp, K):
        return self._conv(xp, K, None, self.stride, self.padding, self.output_padding,
                          self.groups, self.dilation)

    def _conv_backward(self, dy, xp, K, mask, bias=False):
        return torch.ops.aten.convolution_backward(
            dy, xp, K, [dy.shape[1]] if bias else None, self.stride, self.padding,
            self.dilation, True, self.output_padding, self.groups, list(mask))

    def core_outer(self, xp, y):
        K = xp.new_empty(1).expand(self.weight_shape)
        return self._conv_backward(y, xp, K, (False, True, False))[1]

    def patch_gram(self, xp, u):
        # u: [groups, in // groups, *kernel], one output channel per group as a kernel of
        # [in, 1, *kernel]: the transposed convolution, then its weight gradient in that shape
        uk = u.reshape(-1, 1, *u.shape[2:])
        v = self.core(xp, uk)
        return self._conv_backward(v, xp, uk, (False, True, False))[1].view(u.shape)

    def forward(self, x, W, b):
        return self._conv(x, W, b, self.stride, self.padding, self.output_padding, self.groups,
                          self.dilation)


def _pad_T_dim(g: Tensor, d: int, left: int, right: int, mode: str) -> Tensor:
    """Adjoint of ``F.pad`` along dimension ``d`` (padded size ``n + left + right``)."""
    n = g.shape[d] - left - right
    core = g.narrow(d, left, n)
    if mode == "constant" or (left == 0 and right == 0):
        return core
    core = core.clone()
    lo, hi = g.narrow(d, 0, left), g.narrow(d, left + n, right)
    if mode == "circular":  # padded = [x[-left:], x, x[:right]]
        core.narrow(d, n - left, left).add_(lo)
        core.narrow(d, 0, right).add_(hi)
    elif mode == "reflect":  # padded = [flip(x[1:left+1]), x, flip(x[n-1-right:n-1])]
        core.narrow(d, 1, left).add_(lo.flip(d))
        core.narrow(d, n - 1 - right, right).add_(hi.flip(d))
    elif mode == "replicate":  # padded = [x[0] * left, x, x[-1] * right]
        core.narrow(d, 0, 1).add_(lo.sum(d, keepdim=True))
        core.narrow(d, n - 1, 1).add_(hi.sum(d, keepdim=True))
    else:
        raise ValueError(f"unknown padding mode {mode!r}")
    return core


#: torch layer class -> ``make(module) -> LayerOps``: filled by
#: :func:`neuralign.layers.register_layer`, which ties a torch layer class to its ops and its
#: feedback class in one registration.
OPS: dict[type[nn.Module], Callable[[Any], LayerOps]] = {}


def ops_for(module: nn.Module) -> LayerOps:
    """The ops of a torch layer whose class (or a base class) is registered."""
    for cls in type(module).__mro__:
        make = OPS.get(cls)
        if make is not None:
            return make(module)
    raise TypeError(f"no ops for {type(module).__name__}; registered: "
                    f"{', '.join(c.__name__ for c in OPS)} (neuralign.layers.register_layer "
                    f"adds a layer family)")
