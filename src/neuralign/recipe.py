"""The feedback recipe: each rule's own update of its learned feedback weights.

A rule fixes *where* F settles (its terms are quadratic in F, so it has a fixed point); the
recipe fixes *how fast and how stably* F gets there, whatever optimizer trains W and whatever
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
that read one input position). So ``rate`` is the fraction of the way to the fixed point
covered per step along the stiffest direction, at any layer size, depth or activity scale,
and any rate in (0, 1] is stable (for mirror noise, in expectation over the noise: a high rate
makes F a noisy one-batch estimate). The data curvatures are estimated by power iteration, one
iteration per step, from products the backward makes on tensors it already holds.

**The state lives on the layers.** Each learned feedback layer has a child
:class:`~neuralign.layers.RecipeState` (in the state dict, copied and pickled with the model):
what the backward collects between two steps (the samples, the Gram products of the power
iteration) and what the recipe carries from step to step (the probe vectors, Kolen-Pollack's
``F − W``, the step count). The recipe itself holds only its parameter groups (one per layer;
``lr`` is the layer's rate, so learning-rate schedulers scale it). So a model saved, loaded or
deep-copied continues exactly under a recipe built for it, and the recipe's own state dict
is its groups'.

**What the backward computes.** A layer's backward gives F the rule's full gradient (every term,
and Kolen-Pollack's task share), as any torch optimizer over
``param_groups(model)["feedback"]`` expects, except while a recipe steps the layer: then
``F.grad`` holds the activity terms (amp, null, sparse: what needs the batch) summed over the
samples of the step's backward calls, and the step divides by their number and adds decay and
self from the current F and W (symmetric alignment's F moves towards the W of this step, not
the last). A rule with no activity term (sa, kp) needs no backward work at all: while a recipe
steps it its F does not require grad. Building a recipe marks its layers (a weak reference to
it, which copies and pickles drop: a copy of the model backpropagates the rule's full gradient
until a recipe is built for it); :meth:`FeedbackOptimizer.release` unmarks them. One recipe
steps a layer at a time: building a second while the first exists raises an error.

**Gradient accumulation.** The backward calls between two steps add up as one batch of all
their samples: k micro-batches with ``loss / k`` give the step of one batch k times the size
(W's gradient is unchanged by the split; so is F's step), curvatures included from the layer's
second step on (before the first step, each call's power iterations warm up on its own
batch). Under DistributedDataParallel (``no_sync`` included) the Gram products are averaged
over the processes in the backward, ``F.grad`` by DDP, so every process takes the single
process's step on the global batch. The step consumes ``F.grad`` (sets it to None) and the
collected products; ``zero_grad`` forgets them too.

**Kolen-Pollack.** F receives exactly W's update, whatever optimizer, momentum, schedule or
weight decay produced it, and the difference decays: the recipe keeps ``D = F − W`` on the layer
and sets ``F = W + (1 − rate)·D`` after each step (one pass: the layer keeps D's scale apart), so
``F − W`` contracts by ``1 − rate`` per step; its memory is backprop's plus F and D. This is
Kolen-Pollack's own dynamics (Akrout et al. 2019: W and B get the same update and the same
decay, so their difference shrinks by the decay alone), exact for any forward optimizer.

Update noise (``F += lr_F·N(0, σ²)`` with ``lr_F = rate/κ``, the step's own learning rate) and
normalisation (rescaling F to a fixed norm) are part of the step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .convert import feedback_layers
from .estimate import estimate_layer
from .layers import FeedbackLayer, RecipeState

__all__ = ["FeedbackOptimizer", "feedback_optimizer", "curvature"]


def feedback_optimizer(model: nn.Module, rate: float | None = None,
                       generator: torch.Generator | None = None) -> FeedbackOptimizer:
    """The rules' own update recipe for every learned feedback weight of ``model``.

    Args:
        model: a converted model (the recipe steps its learned feedback layers: see
            :class:`FeedbackOptimizer`).
        rate: one rate for every layer, in (0, 1]; default: each layer's ``rule.rate``.
        generator: draws the update noise; under DistributedDataParallel give every process the
            same seed, so that F stays identical everywhere.

    Returns:
        A :class:`FeedbackOptimizer` (a ``torch.optim.Optimizer``; with no learned feedback
        weight it holds one empty group and its step does nothing).

    Raises:
        ValueError: a rate outside (0, 1]; a rule whose R(F) has no minimum; a layer that
            another recipe, still alive, steps.

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


def _top(gram: Tensor, samples: Tensor, blocks: bool) -> Tensor:
    """The power iteration's eigenvalue estimate: the summed Gram product's norm (with
    ``blocks``, its largest block's), per sample (0-d, the Gram's dtype)."""
    lam = gram.flatten(1).norm(dim=1).max() if blocks else gram.norm()
    return lam / samples.clamp_min(1)


def curvature(layer: FeedbackLayer) -> float | Tensor:
    """κ of the layer's rule: ``decay + sparse·λ_in + null·overlap·λ_out`` (see the module
    docstring), the data curvatures from the products the backward collected since the last
    step (zero before any): a float for a rule without data curvature, else a 0-d tensor
    on the layer's device (read without a host synchronisation)."""
    c, state = layer.rule.terms, layer.recipe_state
    kappa: float | Tensor = c.get("decay", 0.0)
    if c.get("sparse"):
        kappa = kappa + c["sparse"] * _top(state.gram_in, state.samples, True)
    if c.get("null"):
        kappa = kappa + c["null"] * layer._spec.ops.overlap * _top(state.gram_out, state.samples,
                                                                   False)
    return kappa


def _decay_step(X: Tensor, s: float | Tensor, decay: float, g: Tensor | None,
                per_sample: Tensor | None) -> None:
    """``X ← (1 − s·decay)·X − (s / per_sample)·g`` (``g`` None: the decay alone), for a step
    ``s`` that is a float or a 0-d tensor, and ``g`` a sum over ``per_sample`` samples."""
    if decay:
        X.mul_(1.0 - s * decay)
    if g is not None:
        assert per_sample is not None
        X.addcmul_(g, s / per_sample.to(X.dtype), value=-1.0)


class FeedbackOptimizer(torch.optim.Optimizer):
    """The update recipe of every learned feedback weight of a model (see the module docstring).

    One parameter group per layer (``lr`` is the layer's rate, so learning-rate schedulers
    scale it; ``layer`` is its name). Building it marks the layers, whose backward then
    computes only what the recipe needs (F's ``requires_grad`` is switched off where that is
    nothing, as for sa and kp), so build it before wrapping the model in
    DistributedDataParallel. :meth:`release` gives the layers back to their rules' plain
    backward.

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
        groups, taken = [], []
        for name, layer in feedback_layers(model):
            if not layer.rule.learns:
                continue
            negative = [t for t in ("decay", "sparse", "null") if layer.rule.terms.get(t, 0) < 0]
            if negative:
                raise ValueError(
                    f"{name or 'the model'}: rule {layer.rule.name!r} has negative "
                    f"{', '.join(negative)}: its R(F) has no minimum, so F has nowhere to "
                    f"settle; use coefficients >= 0 for decay, sparse and null")
            if layer._recipe is not None and layer._recipe() is not None:
                taken.append(name or "(the model itself)")
            self._layer_of[layer.feedback] = layer
            groups.append({"params": [layer.feedback], "layer": name,
                           "lr": layer.rule.rate if rate is None else rate})
        if taken:
            raise ValueError(
                f"another feedback recipe, still alive, steps {', '.join(taken[:5])}"
                f"{' ...' if len(taken) > 5 else ''}: one recipe per layer (two would take "
                f"turns with its state); step the model with that one, or call its release() "
                f"first")
        super().__init__(groups or [{"params": [], "layer": "", "lr": 0.0}], {})
        self.generator = generator
        # sa-like layers whose whole step is F ← F + rate·(W − F): stepped together
        self._lerp: dict[Tensor, Tensor] = {}
        me = weakref.ref(self)
        for F, layer in self._layer_of.items():
            self._take(F, layer, me)
        # the layers go back to their plain backward at release(), or when this is collected
        self._give_back = weakref.finalize(
            self, _give_back, me, [weakref.ref(layer) for layer in self._layer_of.values()])

    def _take(self, F: Tensor, layer: FeedbackLayer, me: weakref.ref) -> None:
        rule, state = layer.rule, layer.recipe_state
        c = rule.terms
        if not (state.terms or rule.kp or rule.estimate is not None or rule.update_noise
                or rule.normalize) and c.get("self", 0.0) == c.get("decay", 0.0) != 0.0:
            self._lerp[F] = layer.weight  # (its step: see _step_layer's sa branch)
        layer._recipe = me
        if not state.terms:  # nothing of the rule needs the backward
            layer._recipe_froze = layer._recipe_froze or F.requires_grad
            F.requires_grad_(False)
            F.grad = None
        state.reset()
        if rule.kp:
            _sync_kp(layer, state)

    def release(self) -> None:
        """Give every layer back to its rule's plain backward (every term in ``F.grad``); the
        recipe steps nothing afterwards. Deleting the recipe does the same."""
        self._give_back()
        self._lerp.clear()
        self._layer_of.clear()
        for group in self.param_groups:
            group["params"] = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's, and the layers forget what their backward collected for the step."""
        super().zero_grad(set_to_none)
        for layer in self._layer_of.values():
            layer.recipe_state.reset()

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
                layer = self._layer_of[F]
                state = layer.recipe_state
                W = self._lerp.get(F)
                if W is not None:  # one foreach call for them all below (a few µs a layer)
                    Fs, Ws = lerps.setdefault(float(group["lr"]), ([], []))
                    Fs.append(F)
                    Ws.append(W)
                elif state.terms and F.grad is None:
                    continue  # an activity rule with no backward since the last step
                else:
                    est = layer.rule.estimate
                    if est is not None and state.steps % est.every == 0:  # the first one now
                        state.estimate_trials += estimate_layer(layer, self.generator)
                    self._step_layer(F, layer, float(group["lr"]), state)
                state.steps += 1
                state.warm = True
        for rate, (Fs, Ws) in lerps.items():
            torch._foreach_lerp_(Fs, Ws, rate)
        return loss

    def _step_layer(self, F: Tensor, layer: FeedbackLayer, rate: float,
                    state: RecipeState) -> None:
        rule = layer.rule
        W = layer.weight.detach()
        # the self term's W: the layer's, or the estimate of it (neuralign.estimate)
        W_self = W if rule.estimate is None else layer.weight_estimate
        c = rule.terms
        decay, self_ = c.get("decay", 0.0), c.get("self", 0.0)
        g, samples = None, None
        kappa = curvature(layer)
        if state.terms:  # the activity terms' sums: consumed here
            g, samples, F.grad = F.grad, state.samples.clone(), None
            state.advance()
        if rule.kp:
            if state.kp_scale is None:  # (a state dict without it: from F and W now)
                _sync_kp(layer, state)
            X = state.kp_delta  # the decay acts on F − W: "the same decay on both"
            assert state.kp_scale is not None
            if set(c) == {"decay"} and not (rule.update_noise or rule.normalize):
                # Kolen-Pollack proper: F = W + (1 − rate)^t (F0 − W0), one pass a step
                scale = state.kp_scale * (1.0 - rate)
                state.kp_scale = scale if scale > 1e-30 else 0.0
                if state.kp_scale:
                    torch.add(W, X, alpha=state.kp_scale, out=F)
                else:  # F − W has vanished: F is W (a copy reads one tensor, not two)
                    F.copy_(W)
                return
            if state.kp_scale != 1.0:
                X.mul_(state.kp_scale)
                state.kp_scale = 1.0
        else:
            X = F
        s: float | Tensor
        if not any(c.get(t) for t in ("decay", "sparse", "null")):
            # no curvature (e.g. amp or self alone): a step of `rate` times F's norm
            d = torch.zeros_like(F) if g is None or samples is None else g / samples
            if self_:
                d.sub_(W_self, alpha=self_)
            s = rate * F.norm() / d.norm().clamp_min(torch.finfo(F.dtype).tiny)
            X.sub_(d * s)
        elif g is None and not rule.kp and self_ and self_ == decay:
            s = rate / decay
            X.lerp_(W_self, rate)  # sa: F ← F + rate·(W − F), one pass
        else:
            if isinstance(kappa, Tensor):  # a data curvature: stays on the device
                s = rate / kappa.clamp_min(torch.finfo(kappa.dtype).tiny)
            else:
                s = rate / max(kappa, torch.finfo(F.dtype).tiny)
            _decay_step(X, s, decay, g, samples)
            if self_:
                if isinstance(s, Tensor):
                    X.addcmul_(W_self, (s * self_).to(X.dtype))
                else:
                    X.add_(W_self, alpha=s * self_)
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


def _give_back(me: weakref.ref, layers: list[weakref.ref]) -> None:
    """Unmark the layers that the recipe ``me`` marks (see FeedbackOptimizer.release)."""
    for ref in layers:
        layer = ref()
        if layer is None or layer._recipe is not me:
            continue
        layer._recipe = None
        if layer._recipe_froze:
            layer.feedback.requires_grad_(True)
            layer._recipe_froze = False
        layer.recipe_state.reset()


@torch.no_grad()
def _sync_kp(layer: FeedbackLayer, state: RecipeState) -> None:
    """Kolen-Pollack's ``F − W`` from the layer's F and W, unless the state already holds
    the difference that gives F (a copy or a save taken between two steps continues)."""
    F, W, D = layer.feedback, layer.weight.detach(), state.kp_delta
    if state.kp_scale is not None and torch.equal(torch.add(W, D, alpha=state.kp_scale), F):
        return
    torch.sub(F, W, out=D)
    state.kp_scale = 1.0
