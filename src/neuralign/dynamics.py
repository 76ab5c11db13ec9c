"""Feedback dynamics: each rule's own update recipe for its learned feedback weights.

A rule fixes *where* F settles (its terms are quadratic in F, so it has a fixed point); this
module fixes *how fast and how stably* F gets there, whatever optimizer trains W and whatever
the layer's scale. :func:`feedback_optimizer` returns a :class:`FeedbackOptimizer`, stepped like
a torch optimizer after the forward optimizer's step::

    opt_f = na.feedback_optimizer(model)
    loss.backward(); opt_w.step(); opt_f.step()

**Normalised steps.** Each layer's step is ``F ← F − (rate / κ) ∇R(F)``, where κ is the
curvature of the rule's R in F along its stiffest direction:

| term | curvature |
|---|---|
| decay | 1 |
| self, amp | 0 (linear in F) |
| sparse | top eigenvalue of the per-sample input-patch Gram matrix, E[x xᵀ] |
| null | top eigenvalue of E[y yᵀ], the output Gram matrix (× a conv's overlap) |

(with mirror noise, ``x`` is the noise; a conv's overlap is the number of output positions
that read one input position; a layer family that writes only its map gets both from the
terms' Hessians themselves, :class:`~neuralign.ops.LayerOps`). So ``rate`` is the fraction of
the way to the fixed point covered per step along the stiffest direction, at any layer size,
depth or activity scale, and any rate in (0, 1] is stable (for mirror noise, in expectation over the noise: a
high rate makes F a noisy one-batch estimate). The data curvatures are estimated by power iteration,
one step per backward, from the tensors the backward already holds; under
DistributedDataParallel each product is averaged over processes, like F's gradient, so every
replica takes the single process's step.

**Where each part is computed.** The backward puts only the activity terms' gradient (amp,
null, sparse: what needs the batch) in ``F.grad``; the step adds decay and self from the current
F and W. A rule with no activity term (sa, kp) needs no backward work at all: its F stops
requiring grad and has no ``F.grad``. Symmetric alignment's memory is backprop's plus F, and its
step is one pass, ``F ← F + rate·((self/decay)·W − F)``.

**Kolen-Pollack.** F receives exactly W's update, whatever optimizer, momentum, schedule or
weight decay produced it, and the difference decays: the recipe keeps ``D = F − W`` as state
and sets ``F = W + (1 − rate)·D`` after each step (one pass: it keeps D's scale apart), so
``F − W`` contracts by ``1 − rate`` per step; its memory is backprop's plus F and D. This
is Kolen-Pollack's own dynamics (Akrout et al. 2019: W and B get the same update and the same
decay, so their difference shrinks by the decay alone), exact for any forward optimizer.

Update noise (``F += lr_F·N(0, σ²)`` with ``lr_F = rate/κ``, the step's own learning rate) and
normalisation (rescaling F to a fixed norm) are part of the step.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import native
from .convert import feedback_layers
from .estimate import estimate_layer
from .layers import FeedbackLayer
from .ops import LayerOps
from .terms import ACTIVITY_TERMS

__all__ = ["FeedbackOptimizer", "feedback_optimizer", "curvature"]

#: Power iterations at a layer's first backward (afterwards one per backward).
WARMUP_ITERATIONS = 8


def feedback_optimizer(model: nn.Module, rate: float | None = None,
                       generator: torch.Generator | None = None) -> FeedbackOptimizer:
    """The rules' own update recipe for every learned feedback weight of ``model``.

    Args:
        model: a converted model (the recipe takes over its learned feedback layers: see
            :class:`FeedbackOptimizer`).
        rate: one rate for every layer, in (0, 1]; default: each layer's ``rule.rate``.
        generator: draws the update noise; under DistributedDataParallel give every process the
            same seed, so that F stays identical everywhere.

    Returns:
        A :class:`FeedbackOptimizer` (a ``torch.optim.Optimizer``; with no learned feedback
        weight it holds one empty group and its step does nothing).

    Example::

        opt_w = torch.optim.SGD(na.param_groups(model)["forward"], lr=0.01, momentum=0.9)
        opt_f = na.feedback_optimizer(model)
        for x, y in data:
            opt_w.zero_grad(); opt_f.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt_w.step(); opt_f.step()
    """
    return FeedbackOptimizer(model, rate=rate, generator=generator)


def _check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
        raise ValueError(f"rate is the fraction of the way to the fixed point per step, in "
                         f"(0, 1], got {rate!r}")
    return float(rate)


def _mean_over_processes(t: Tensor) -> Tensor:
    """``t`` averaged over the processes of a distributed run (in place; ``t`` alone otherwise).
    Each process holds an equal share of the global batch, so the mean of the per-process
    per-sample averages is the global batch's."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class _Observer:
    """Called by the backward: one power-iteration step for each data curvature the rule needs
    (the input-patch Gram for sparse, the output Gram for null), added into ``state``.

    The curvatures add up over the backward calls between two steps, as F's gradient does: a
    layer called several times per step (a recurrent layer's hidden map, once per time step;
    gradient accumulation over micro-batches) is stepped by the sum of its calls' gradients, whose
    curvature is at most the sum of theirs. The step resets them.

    Under DistributedDataParallel each product ``H u`` is averaged over the processes (a small
    all-reduce per layer), so the iteration is the single process's on the global batch and
    every process holds the same ``u`` and the same curvature.

    The backward writes only tensors (in place): ``iters``, the power iterations per call, is
    set by the recipe's step (``WARMUP_ITERATIONS`` until the layer's first step, then 1), so
    under ``torch.compile`` the backward has no Python side effect to break the graph on."""

    def __init__(self, state: dict, sparse: bool, null: bool):
        self.state, self.sparse, self.null = state, sparse, null
        self.iters = WARMUP_ITERATIONS if state["observed"] == 0 else 1

    @torch.no_grad()
    def __call__(self, ops, src: Tensor, y: Tensor | None, n: int) -> None:
        # (few small ops: between the step's weight-sized products each costs 5-10 times its
        # time alone. h is the Gram's sum over the n samples, H u times n: its direction is
        # the iteration's, its norm over n the curvature)
        state, iters = self.state, self.iters
        if self.sparse:
            u = state["u_in"]
            u = u if u.dtype == src.dtype else u.to(src.dtype)
            for _ in range(iters):
                h = _mean_over_processes(ops.patch_gram(src, u))  # one block per group
                # (one block, a Linear layer's or an ungrouped convolution's: one op for its
                # norm, where the per-block norms take three)
                lam = h.norm() if h.shape[0] == 1 else \
                    h.flatten(1).norm(dim=1).view(-1, *[1] * (h.dim() - 1))
                u = _normalised(h, lam, u)
            state["u_in"].copy_(u)
            state["curv_in"].add_(lam if lam.dim() == 0 else lam.max(), alpha=1 / n)
        if self.null and y is not None:
            u = state["u_out"]
            u = u if u.dtype == y.dtype else u.to(y.dtype)
            for _ in range(iters):
                h = _mean_over_processes(ops.output_gram(y, u, src.shape))
                lam = h.norm()
                u = _normalised(h, lam, u)
            state["u_out"].copy_(u)
            state["curv_out"].add_(lam, alpha=ops.overlap / n)


def _normalised(h: Tensor, lam: Tensor, u: Tensor) -> Tensor:
    """``h / lam`` (in ``h``'s memory), per block of ``lam``, and ``u`` where ``lam`` is 0:
    the power iteration's next vector. On CPU, with one block, a host branch gives the same
    values with three small ops fewer (under torch.compile, the graph's ``where``)."""
    if lam.is_cpu and lam.numel() == 1 and not torch.compiler.is_compiling():
        return h.div_(lam) if lam.item() > 0 else u
    return torch.where(lam > 0, h.div_(lam.clamp_min(torch.finfo(lam.dtype).tiny)), u)


def curvature(layer: FeedbackLayer, state: dict | None = None) -> float | Tensor:
    """κ of the layer's rule: ``decay + sparse·λ_in + null·λ_out`` (see the module docstring);
    ``λ_in`` and ``λ_out`` are the recipe's estimates in ``state`` (zero before any backward).
    A float, but for a data curvature off the CPU: a 0-d tensor there, read without a host
    synchronisation (on CPU a float costs none, and spares the step a few tensor ops)."""
    c = layer.rule.terms
    kappa: float | Tensor = c.get("decay", 0.0)
    if state is not None:
        for term, key in (("sparse", "curv_in"), ("null", "curv_out")):
            if c.get(term):
                lam = state[key]
                if lam.is_cpu and not torch.compiler.is_compiling():
                    lam = lam.item()
                kappa = kappa + c[term] * lam
    return kappa


def _decay_step(X: Tensor, s: float | Tensor, decay: float, g: Tensor | None) -> None:
    """``X ← (1 − s·decay)·X − s·g`` (``g`` None: the decay alone), for a step ``s`` that is
    a float, or a 0-d tensor of X's dtype (a data curvature's, kept on its device). Two
    torch ops; for a float step with decay and ``g``, one native pass where the kernels take
    ``X`` and ``g`` (float32 on CPU), with the same factors and rounding, so the same X bit
    for bit."""
    if decay and g is not None and not isinstance(s, Tensor):
        lib = native.library()
        # (1 − s·decay, rounded to float32 by the call, as by torch's mul_)
        if lib is not None and native.fits(X, g) and native.scale_add(lib, X, g, 1.0 - s * decay,
                                                                      -s):
            return
    if decay:
        X.mul_(1.0 - s * decay)
    if g is not None:
        if isinstance(s, Tensor):
            X.addcmul_(g, s, value=-1.0)
        else:
            X.add_(g, alpha=-s)


def _holders(t: Tensor) -> tuple[int, ...] | None:
    """Who holds ``t``: Python references, tensor handles, storage handles (None where torch
    does not tell)."""
    try:
        return (sys.getrefcount(t), t._use_count(),  # type: ignore[attr-defined]
                torch._C._storage_Use_Count(t.untyped_storage()._cdata))
    except AttributeError:  # (private torch API)
        return None


def _alone() -> tuple[int, ...] | None:
    t = torch.empty(1)  # held by this local only, as a spare is in FeedbackOptimizer._spare
    return _holders(t)


#: what _holders reports for a tensor that nothing else holds (no reference, no view)
_ALONE = _alone()


class FeedbackOptimizer(torch.optim.Optimizer):
    """The update recipe of every learned feedback weight of a model (see the module docstring).

    One parameter group per layer (``lr`` is the layer's rate, so learning-rate schedulers
    scale it; ``layer`` is its name). Building it takes the layers over: their backward then
    computes only what the recipe needs (F's ``requires_grad`` is switched off where that is
    nothing, as for sa and kp), so build it after moving the model to its device (like any
    optimizer, its state lives there) and before wrapping the model in DistributedDataParallel,
    and use one recipe per model. :meth:`release` gives the layers
    back to their rules' plain backward.

    Args:
        model: a converted model.
        rate: one rate for every layer, in (0, 1]; default each layer's ``rule.rate``.
        generator: draws the update noise.
    """

    def __init__(self, model: nn.Module, rate: float | None = None,
                 generator: torch.Generator | None = None):
        if rate is not None:
            rate = _check_rate(rate)
        self._layer_of: dict[Tensor, FeedbackLayer] = {}
        groups = []
        for name, layer in feedback_layers(model):
            negative = [t for t in ("decay", "sparse", "null") if layer.rule.terms.get(t, 0) < 0]
            if layer.rule.learns and negative:
                raise ValueError(
                    f"{name or 'the model'}: rule {layer.rule.name!r} has negative "
                    f"{', '.join(negative)}: its R(F) has no minimum, so F has nowhere to "
                    f"settle; use coefficients >= 0 for decay, sparse and null")
            if layer.rule.learns:
                self._layer_of[layer.feedback] = layer
                groups.append({"params": [layer.feedback], "layer": name,
                               "lr": layer.rule.rate if rate is None else rate})
        super().__init__(groups or [{"params": [], "layer": "", "lr": 0.0}], {})
        self.generator = generator
        self._spares: dict[Tensor, Tensor] = {}  # last step's F.grad, for the next backward
        # sa-like layers whose whole step is F ← F + rate·(W − F): stepped together
        self._lerp: dict[Tensor, Tensor] = {}
        self._observers: dict[Tensor, _Observer] = {}  # the layers' curvature estimates
        for F, layer in self._layer_of.items():
            self._take_over(F, layer)

    # -- ownership -----------------------------------------------------------------------------
    def _take_over(self, F: Tensor, layer: FeedbackLayer, fresh: bool = True) -> None:
        """Point the layer's backward at the recipe; initialise its state when ``fresh``."""
        rule, spec, state = layer.rule, layer._spec, self.state[F]
        activity = {t: c for t, c in rule.terms.items() if t in ACTIVITY_TERMS}
        c = rule.terms
        if not (activity or rule.kp or rule.estimate is not None or rule.update_noise
                or rule.normalize) and c.get("self", 0.0) == c.get("decay", 0.0) != 0.0:
            self._lerp[F] = layer.weight  # (its step: see _step_layer's sa branch)
        else:
            self._lerp.pop(F, None)
        spec.terms, spec.kp = activity, False
        spec.observe = spec.loaded = None
        self._observers.pop(F, None)
        if not activity:
            F.requires_grad_(False)
            F.grad = None
        elif type(spec.ops).scaled_outer is not LayerOps.scaled_outer:
            # the layer family writes its products into given memory (Linear): keep F.grad's
            spec.spare = lambda F=F: self._spare(F)
        sparse, null = "sparse" in activity, "null" in activity
        if sparse or null:
            if fresh:
                W, ops = layer.weight, layer._spec.ops
                u_in = torch.ones(ops.probe_shape(W), device=W.device, dtype=W.dtype)
                state["u_in"] = u_in.div_(u_in[0].norm())
                u_out = torch.ones(ops.output_probe_shape(W), device=W.device, dtype=W.dtype)
                state["u_out"] = u_out.div_(math.sqrt(u_out.numel()))
                state["curv_in"] = W.new_zeros(())
                state["curv_out"] = W.new_zeros(())
                state["observed"] = 0  # steps taken after a backward
            spec.observe = self._observers[F] = _Observer(state, sparse, null)
        if rule.kp:
            def sync(F=F, W=layer.weight):
                # F − W = scale · delta: the plain decay only shrinks the scale (one pass a step)
                self.state[F]["delta"] = (F - W).detach()
                self.state[F]["delta_scale"] = 1.0

            if fresh:
                sync()
            spec.loaded = sync  # a model state loaded later brings its own F − W

    def release(self) -> None:
        """Give every layer back to its rule's plain backward (every term in ``F.grad``)."""
        for F, layer in self._layer_of.items():
            layer._spec.reset()
            F.requires_grad_(True)
        self._spares.clear()
        self._lerp.clear()
        self._observers.clear()

    # -- F.grad's memory -------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's; with ``set_to_none`` the recipe keeps each ``F.grad`` it drops, and the
        next backward writes F's gradient into that memory if nothing else holds it (a
        reference or a view kept by the caller keeps its values: the backward then takes
        fresh memory). A fresh weight-sized gradient every step, freed at every zero_grad,
        cost the activity rules a round of page faults a step: on the MLP of
        benchmarks/step_time.py, aa's step went from 2.2 to 2.0 times backprop's (15.7 to
        13.3 ms). Only a Linear layer's product writes into the kept memory (``out=``)."""
        if set_to_none:
            for F, layer in self._layer_of.items():
                g = F.grad
                if g is not None and layer._spec.spare is not None and g._base is None \
                        and g.layout == torch.strided:
                    self._spares[F] = g
        super().zero_grad(set_to_none)

    def _spare(self, F: Tensor) -> Tensor | None:
        g = self._spares.pop(F, None)
        if g is None or _ALONE is None or _holders(g) != _ALONE:
            return None
        return g if g.shape == F.shape and g.dtype == F.dtype and g.is_contiguous() else None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for F, layer in self._layer_of.items():  # the hooks follow the loaded state
            self._take_over(F, layer, fresh=False)

    # -- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None  # type: ignore[override]
             ) -> Tensor | None:
        """One recipe step for every layer (after the forward optimizer's step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lerps: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
        for group in self.param_groups:
            for F in group["params"]:
                W = self._lerp.get(F)
                if W is not None:  # one foreach call for them all below (a few µs a layer)
                    Fs, Ws = lerps.setdefault(float(group["lr"]), ([], []))
                    Fs.append(F)
                    Ws.append(W)
                    continue
                layer = self._layer_of[F]
                if layer._spec.terms and F.grad is None:
                    continue  # an activity rule with no backward since the last zero_grad
                state = self.state[F]
                est = layer.rule.estimate
                if est is not None:  # an estimation phase every `every` steps, the first now
                    if state.get("estimate_steps", 0) % est.every == 0:
                        state["estimate_trials"] = state.get("estimate_trials", 0) + \
                            estimate_layer(layer, self.generator)
                    state["estimate_steps"] = state.get("estimate_steps", 0) + 1
                self._step_layer(F, layer, float(group["lr"]), state)
                if "curv_in" in state:  # the next step's curvatures start afresh
                    state["curv_in"].zero_()
                    state["curv_out"].zero_()
                    state["observed"] += 1
                    if F in self._observers:  # one power iteration per backward from now on
                        self._observers[F].iters = 1
        for rate, (Fs, Ws) in lerps.items():
            torch._foreach_lerp_(Fs, Ws, rate)
        return loss

    def _step_layer(self, F: Tensor, layer: FeedbackLayer, rate: float, state: dict) -> None:
        rule = layer.rule
        W = layer.weight.detach()
        # the self term's W: the layer's, or the estimate of it (neuralign.estimate)
        W_self = W if rule.estimate is None else layer.weight_estimate
        c = rule.terms
        decay, self_ = c.get("decay", 0.0), c.get("self", 0.0)
        g_act = F.grad if layer._spec.terms else None
        if rule.kp:
            X = state["delta"]  # the decay acts on F − W: "the same decay on both"
            if set(c) == {"decay"} and not (rule.update_noise or rule.normalize):
                # Kolen-Pollack proper: F = W + (1 − rate)^t (F0 − W0), one pass a step
                scale = state["delta_scale"] * (1.0 - rate)
                state["delta_scale"] = scale if scale > 1e-30 else 0.0
                if state["delta_scale"]:
                    torch.add(W, X, alpha=state["delta_scale"], out=F)
                else:  # F − W has vanished: F is W (a copy reads one tensor, not two)
                    F.copy_(W)
                return
            if state["delta_scale"] != 1.0:
                X.mul_(state["delta_scale"])
                state["delta_scale"] = 1.0
        else:
            X = F
        kappa = curvature(layer, state)
        if not any(c.get(t) for t in ("decay", "sparse", "null")):
            # no curvature (e.g. amp or self alone): a step of `rate` times F's norm
            g = torch.zeros_like(F) if g_act is None else g_act.clone()
            if self_:
                g.sub_(W_self, alpha=self_)
            s = rate * F.norm() / g.norm().clamp_min(torch.finfo(F.dtype).tiny)
            X.sub_(g * s)
        elif isinstance(kappa, float):
            s = rate / max(kappa, torch.finfo(F.dtype).tiny)
            if g_act is None and not rule.kp and self_ and self_ == decay:
                X.lerp_(W_self, rate)  # sa: F ← F + rate·(W − F), one pass
            else:
                _decay_step(X, s, decay, g_act)
                if self_:
                    X.add_(W_self, alpha=s * self_)
        else:  # a data curvature off the CPU (a 0-d tensor): no host synchronisation
            s = rate / kappa.clamp_min(torch.finfo(kappa.dtype).tiny)
            s = s.to(F.dtype)
            _decay_step(X, s, decay, g_act)
            if self_:
                X.addcmul_(W_self, s * self_)
        sigma = rule.update_noise
        if sigma:
            eps = torch.randn(F.shape, generator=self.generator, device=F.device, dtype=F.dtype)
            X.add_(eps.mul_(s * sigma))
        if rule.kp:
            torch.add(W, X, out=F)
        if rule.normalize:
            layer.normalize_feedback()
            if rule.kp:
                torch.sub(F, W, out=X)
