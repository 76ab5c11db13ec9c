"""Weight estimation: the ``self`` term's W, estimated at the synapse (Route II of Kunin et al.).

Symmetric alignment's ``self`` term needs W at the feedback synapse. That is biologically
plausible only if a process there can estimate W from what it observes. Two estimators give
a learned feedback layer an estimate Ŵ of its W (the buffer ``weight_estimate``), and a rule
with ``estimate=`` reads Ŵ in its ``self`` term wherever it would read W. Each estimator sees
only the upstream units' activity and the downstream units' drive, never W: the layer's map
is reached only through ``drive(s)``, the downstream drive that activity ``s`` causes (what a
downstream neuron's membrane potential shows). The estimation phase runs every
``estimate.every`` steps of the feedback recipe, on ``estimate.samples`` trials, with the
network's input switched off: the units are driven by noise alone.

``rdd``: regression discontinuity (Lansdell & Kording 2018/2023, "Spiking allows neurons to
estimate their causal effect"; Guerguiev, Kording & Richards 2020, "Spike-based causal inference
for weight alignment"). Each trial gives every upstream unit a running variable ``z`` (its drive
relative to threshold) and spikes, and the downstream drive is ``y = W n + ε`` (n the spike
counts, ε of std ``drive_noise``). A unit's causal effect on each downstream unit is the jump of
``y`` at the unit's threshold: on the trials where ``z`` falls within ``window · noise`` of
threshold, ``y`` is fitted by a line on each side (regressors 1, z, s, s·z with s = [z > 0], in
one least-squares fit per unit), and the coefficient of ``s`` is the estimate. Because the fit
is linear in ``y``, it is ``Σ_t c_t y_tᵀ`` with weights ``c`` that depend on the unit's own
trials only: one matrix product for all units (``ops.outer``), vectorised over units, no loop.
The units (``unit``):

- ``threshold``: a noisy drive ``z`` of std ``noise`` around threshold, and one spike when it
  exceeds it. The estimator needs only this: a threshold crossing and the resulting spike's
  effect.
- ``lif``: leaky integrate-and-fire neurons driven by noise, simulated for ``steps`` time steps
  per trial (Lansdell & Kording's windows; Guerguiev et al.'s 30 ms at 1 ms steps, membrane time
  constant ``tau``). ``z`` is the maximum over the window of the membrane potential without
  resets, and a unit may spike more than once. The extra spikes far from threshold are noise in
  every other unit's fit, so ``lif`` needs more trials than ``threshold`` for the same error.

``perturb``: perturbation. Noise ``ξ`` of std ``noise`` is injected as the layer's input and the
downstream drive ``y = W ξ + ε`` regressed on it: ``Ŵ = E[y ξᵀ] / σ²``. This is weight mirror's
``amp`` term on mirror noise, read as an estimator: wm's amp gradient is ``−E[y ξᵀ] = −σ² W``,
so where weight mirror moves F along it, ``perturb`` takes it, divided by σ², as Ŵ.

For convolutions both estimators run on an input of the kernel's extent, and each kernel entry
averages the estimates of every (input, output) position pair it connects.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .ops import LayerOps
from .rules import WeightEstimate

__all__ = ["rdd", "perturb", "estimate", "input_shape", "estimate_layer", "estimate_weights"]

Drive = Callable[[Tensor], Tensor]


def input_shape(ops: LayerOps, kernel_shape: torch.Size) -> tuple[int, ...]:
    """An input of one example that every kernel entry reads: a Linear layer's features; a
    convolution's (or transposed convolution's) channels over its dilated kernel extent."""
    meta = torch.empty(kernel_shape, device="meta")
    channels = ops.in_channels(meta)
    dim = len(kernel_shape) - 2
    if dim <= 0:
        return (channels,)
    dilation = getattr(ops, "dilation", (1,) * dim)
    return (channels, *[d * (k - 1) + 1 for d, k in zip(dilation, kernel_shape[2:], strict=True)])


def _pair_counts(ops: LayerOps, shape: tuple[int, ...], out: Tensor) -> Tensor:
    """Per kernel entry, how many (input, output) position pairs of one example it connects."""
    ones_in = torch.ones((1, *shape), dtype=out.dtype, device=out.device)
    ones_out = torch.ones((1, *out.shape[1:]), dtype=out.dtype, device=out.device)
    return ops.outer(ones_in, ones_out).clamp_min(1)


def _measure(drive: Drive, s: Tensor, est: WeightEstimate, generator) -> Tensor:
    y = drive(s)
    if est.drive_noise:
        y = y + est.drive_noise * torch.randn(y.shape, generator=generator, dtype=y.dtype,
                                              device=y.device)
    return y


def _threshold_units(shape: tuple[int, ...], est: WeightEstimate, generator, dtype,
                     device) -> tuple[Tensor, Tensor]:
    """Thresholded noisy units: per trial, a drive ``z`` of std ``noise`` around threshold
    (threshold at 0) and one spike where it exceeds it. Returns (z, spikes)."""
    z = torch.randn((est.samples, *shape), generator=generator, dtype=dtype, device=device)
    z.mul_(est.noise)
    return z, (z > 0).to(dtype)


def _lif_units(shape: tuple[int, ...], est: WeightEstimate, generator, dtype,
               device) -> tuple[Tensor, Tensor]:
    """Leaky integrate-and-fire units, every trial a window of ``est.steps`` time steps, all
    trials and units at once (the loop is over time steps only). Threshold at 0; the membrane
    relaxes with time constant ``tau`` towards a mean drive one ``noise`` below threshold,
    driven by white noise scaled so that its stationary std is ``noise``, and a spike resets it
    one ``noise`` below the mean (Guerguiev et al.'s threshold 1, rest 0, reset −1, in units of
    the noise). Each trial starts from the stationary distribution.

    Returns the running variable of Lansdell & Kording: ``z``, the maximum over the window of
    the drive ``u`` (the membrane potential without resets), and the spike counts. Until its
    first spike a unit's membrane is ``u``, so it spiked in the window exactly when ``z > 0``;
    just above threshold it spiked once (after the reset the membrane stays below ``u``)."""
    a = 1.0 / est.tau
    mean = -est.noise
    kick = est.noise * math.sqrt(a * (2.0 - a))  # the stationary std is then `noise`
    full = (est.samples, *shape)
    u = torch.randn(full, generator=generator, dtype=dtype, device=device)
    u.mul_(est.noise).add_(mean)
    v = u.clone()
    z = torch.full(full, -math.inf, dtype=dtype, device=device)
    counts = torch.zeros(full, dtype=dtype, device=device)
    for _ in range(est.steps):
        xi = torch.randn(full, generator=generator, dtype=dtype, device=device).mul_(kick)
        u.add_(mean - u, alpha=a).add_(xi)
        v.add_(mean - v, alpha=a).add_(xi)
        torch.maximum(z, u, out=z)
        spike = v > 0
        counts.add_(spike)
        v.masked_fill_(spike, mean - est.noise)  # the reset, in place
    return z, counts


UNITS = {"threshold": _threshold_units, "lif": _lif_units}


def rdd(ops: LayerOps, drive: Drive, kernel_shape: torch.Size, est: WeightEstimate,
        generator: torch.Generator | None = None, dtype=torch.float32,
        device: torch.device | str = "cpu") -> Tensor:
    """Ŵ by regression discontinuity on ``est.samples`` trials of the spiking units
    ``est.unit`` (module docstring), in the kernel's layout."""
    shape = input_shape(ops, kernel_shape)
    z, spikes = UNITS[est.unit](shape, est, generator, dtype, device)
    y = _measure(drive, spikes, est, generator)
    s = (z > 0).to(dtype)  # spiked in the trial
    w = (z.abs() < est.window * est.noise).to(dtype)  # the trials near threshold
    # Per unit, the normal equations of the fit with regressors (1, z, s, s·z) on the trials
    # near threshold. With s ∈ {0, 1}, the 4 × 4 Gram matrix Σ_t w x xᵀ has six distinct
    # sums: Σ w z^k and Σ w s z^k for k = 0, 1, 2 (no [trials, units, 4] tensor).
    ws = w * s
    a0, a1, a2 = w.sum(0), (w * z).sum(0), (w * z * z).sum(0)
    b0, b1, b2 = ws.sum(0), (ws * z).sum(0), (ws * z * z).sum(0)
    G = torch.stack([torch.stack(r, -1) for r in ((a0, a1, b0, b1), (a1, a2, b1, b2),
                                                  (b0, b1, b0, b1), (b1, b2, b1, b2))], -2)
    G = G + 1e-6 * est.samples * torch.eye(4, dtype=dtype, device=device)  # (a ridge)
    e_s = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=dtype, device=device)
    r = torch.linalg.solve(G, e_s.expand(G.shape[:-1]))  # (G⁻¹)'s s row (G is symmetric)
    # c_t = w_t (r0 + r1 z_t + r2 s_t + r3 s_t z_t): the jump is Σ_t c_t y_t
    r0, r1, r2, r3 = r.unbind(-1)
    c = w * (r0 + r1 * z) + ws * (r2 + r3 * z)
    return ops.outer(c, y) / _pair_counts(ops, shape, y)


def perturb(ops: LayerOps, drive: Drive, kernel_shape: torch.Size, est: WeightEstimate,
            generator: torch.Generator | None = None, dtype=torch.float32,
            device: torch.device | str = "cpu") -> Tensor:
    """Ŵ = E[y ξᵀ] / σ² from ``est.samples`` perturbations ``ξ`` (module docstring)."""
    shape = input_shape(ops, kernel_shape)
    xi = torch.randn((est.samples, *shape), generator=generator, dtype=dtype, device=device)
    xi.mul_(est.noise)
    y = _measure(drive, xi, est, generator)
    return ops.outer(xi, y) / (_pair_counts(ops, shape, y) * est.samples * est.noise ** 2)


#: The estimators by method name (rules.ESTIMATORS adds "exact", which needs none).
METHODS = {"rdd": rdd, "perturb": perturb}


def estimate(ops: LayerOps, drive: Drive, kernel_shape: torch.Size, est: WeightEstimate,
             generator: torch.Generator | None = None, dtype=torch.float32,
             device: torch.device | str = "cpu") -> Tensor:
    """Ŵ by ``est.method`` (``rdd`` or ``perturb``)."""
    if est.method not in METHODS:
        raise ValueError(f"no estimator {est.method!r}; valid: {', '.join(METHODS)}")
    return METHODS[est.method](ops, drive, kernel_shape, est, generator, dtype, device)


@torch.no_grad()
def estimate_layer(layer, generator: torch.Generator | None = None) -> int:
    """One estimation phase for a feedback layer whose rule has an estimator: its
    ``weight_estimate`` becomes a fresh Ŵ (with ``estimate.memory``, a mix of the previous
    one and the fresh one). Returns the phase's cost in trials.

    Here, and only here, the layer's W enters: as the simulated physics of the synapse, inside
    ``drive`` (the downstream drive that upstream activity causes). The estimators receive
    ``drive``, never W."""
    est = layer.rule.estimate
    ops, W = layer._spec.ops, layer.weight.detach()

    def drive(s: Tensor) -> Tensor:
        return ops.apply(s, W)

    fresh = estimate(ops, drive, W.shape, est, generator, W.dtype, W.device)
    kept = layer.weight_estimate
    if est.memory and bool(kept.any()):  # (all zeros: no phase yet)
        kept.lerp_(fresh, 1.0 - est.memory)
    else:
        kept.copy_(fresh)
    return est.samples


def estimate_weights(model: torch.nn.Module, generator: torch.Generator | None = None) -> int:
    """One estimation phase for every feedback layer of ``model`` whose rule has an
    estimator (the feedback recipe runs them every ``estimate.every`` steps itself; with an
    optimizer of your own, call this on that schedule). Returns the trials used."""
    from .convert import feedback_layers

    return sum(estimate_layer(layer, generator) for _, layer in feedback_layers(model)
               if getattr(layer.rule, "estimate", None) is not None)
