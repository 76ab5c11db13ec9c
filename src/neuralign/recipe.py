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
``param_groups(model)["feedback"]`` expects, except while a recipe steps the layer: then F
does not require grad, and the backward adds the activity terms (amp, null, sparse: what needs
the batch) summed over the call's samples into the layer's ``recipe_state.grad`` (a Linear
layer's product adds itself there: no fresh weight-sized gradient a step), counts the samples
and adds the curvature products; the step divides by the samples and adds decay and self from
the current F and W (symmetric alignment's F moves towards the W of this step, not the last).
A rule with no activity term (sa, kp) needs no backward work at all. Building a recipe marks
its layers (a weak reference to it, which copies and pickles drop: a copy of the model
backpropagates the rule's full gradient until a recipe is built for it);
:meth:`FeedbackOptimizer.release`, or deleting the recipe, unmarks them. One recipe steps a
layer at a time: building a second while the first exists raises an error.

**Gradient accumulation.** The backward calls between two steps add up as one batch of all
their samples: k micro-batches with ``loss / k`` give the step of one batch k times the size
(W's gradient is unchanged by the split; so is F's step), curvatures included from the layer's
second step on (before the first step, each call's power iterations warm up on its own
batch). Under DistributedDataParallel (``no_sync`` included) DDP leaves F alone; the step sums
what each process collected over the processes, so every process takes the single process's
step on the global batch. The step consumes what was collected; ``zero_grad`` forgets it too.
The step reads the layers' sample counts, one host synchronisation a step.

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

from .autograd import unit_blocks
from .convert import feedback_layers
from .estimate import estimate_layer
from .layers import FeedbackLayer, RecipeState, update_noise_scale

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
        The recipe, a :class:`FeedbackOptimizer` (a ``torch.optim.Optimizer``; with no
            learned feedback weight it holds one empty group and its step does nothing).

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


class _Collected:
    """What the backward calls since the last step collected in one layer's state, read
    on the host: the samples ``n``, and the norms of the summed Gram products (sparse: one
    per block, a tensor ``norms_in`` on the device and their floats; null: one)."""

    def __init__(self, state: RecipeState):
        self.state = state
        self.norms_in = None if state.gram_in is None else state.gram_in.flatten(1).norm(dim=1)
        self.norm_out = None if state.gram_out is None else state.gram_out.norm().view(1)
        self.n, self.host_in, self.host_out = 0, [0.0], 0.0

    def parts(self) -> list[Tensor]:
        assert self.state.samples is not None
        return [t.double() for t in (self.state.samples.view(1), self.norms_in, self.norm_out)
                if t is not None]

    def take(self, values: list[float]) -> None:
        self.n = int(values[0])
        k = 1 if self.norms_in is None else 1 + len(self.norms_in)
        if self.norms_in is not None:
            self.host_in = values[1:k]
        if self.norm_out is not None:
            self.host_out = values[k]

    def curvature(self, layer: FeedbackLayer) -> float:
        c, n = layer.rule.coefficients, max(self.n, 1)
        return (c.get("decay", 0.0) + c.get("sparse", 0.0) * max(self.host_in) / n
                + c.get("null", 0.0) * layer._spec.ops.overlap * self.host_out / n)

    @torch.no_grad()
    def advance(self) -> None:
        """Each probe becomes the direction of its summed Gram product (one power iteration
        a step; a block whose product is zero keeps its probe), and the calls are forgotten."""
        st = self.state
        if self.norms_in is not None and st.gram_in is not None and st.probe_in is not None:
            if min(self.host_in) > 0:
                norms = self.norms_in.view(-1, *[1] * (st.gram_in.dim() - 1))
                torch.div(st.gram_in, norms.to(st.gram_in.dtype), out=st.probe_in)
            else:
                st.probe_in.copy_(unit_blocks(st.gram_in, st.probe_in, True))
        if self.norm_out is not None and st.gram_out is not None and st.probe_out is not None \
                and self.host_out > 0:
            torch.div(st.gram_out, self.host_out, out=st.probe_out)
        st.reset()


def _read(states: list[RecipeState]) -> list[_Collected]:
    """What each state collected, read in one host synchronisation."""
    collected = [_Collected(state) for state in states]
    parts = [c.parts() for c in collected]
    if parts:
        device = parts[0][0].device
        flat = torch.cat([t.to(device) for p in parts for t in p]).tolist()
        start = 0
        for c, p in zip(collected, parts, strict=True):
            k = sum(t.numel() for t in p)
            c.take(flat[start:start + k])
            start += k
    return collected


def curvature(layer: FeedbackLayer) -> float:
    """κ of the layer's rule: ``decay + sparse·λ_in + null·overlap·λ_out`` (see the module
    docstring), the data curvatures from the products the backward collected since the last
    step (zero before any; reading them is a host synchronisation)."""
    state = layer.recipe_state
    if not state.terms:
        return layer.rule.coefficients.get("decay", 0.0)
    return _read([state])[0].curvature(layer)


def _decay_step(X: Tensor, s: float, decay: float, g: Tensor | None, samples: int) -> None:
    """``X ← (1 − s·decay)·X − (s / samples)·g`` (``g`` None: the decay alone), for ``g`` a
    sum over ``samples`` samples."""
    if decay:
        X.mul_(1.0 - s * decay)
    if g is not None:
        X.add_(g, alpha=-s / samples)


def _sum_over_processes(states: list[RecipeState]) -> None:
    """What each process collected, summed over the processes of a distributed run (in
    place), so that every process steps on the global batch."""
    dist = torch.distributed
    if not (states and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1):
        return
    works = [dist.all_reduce(t, async_op=True) for state in states
             for t in state.tensors(RecipeState._COLLECTED).values()]
    for work in works:
        work.wait()


class FeedbackOptimizer(torch.optim.Optimizer):
    """The update recipe of every learned feedback weight of a model (see the module docstring).

    One parameter group per layer (``lr`` is the layer's rate, so learning-rate schedulers
    scale it; ``layer`` is its name). Building it marks the layers, whose backward then
    collects only what the recipe needs, into their ``recipe_state`` (F's ``requires_grad``
    is switched off), so build it before wrapping the model in DistributedDataParallel.
    :meth:`release`, or deleting the recipe, gives the layers back to their rules' plain
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
        c = rule.coefficients
        if not (state.terms or rule.kp or rule.estimate is not None or rule.update_noise
                or rule.normalize) and c.get("self", 0.0) == c.get("decay", 0.0) != 0.0:
            self._lerp[F] = layer.weight  # (its step: see _step_layer's sa branch)
        layer._recipe = me
        # F needs no gradient: what the recipe needs, the backward collects in the state
        layer._recipe_froze = layer._recipe_froze or F.requires_grad
        F.requires_grad_(False)
        F.grad = None
        if state.terms and (state.grad is None or state.grad.shape != F.shape
                            or state.grad.dtype != F.dtype or state.grad.device != F.device):
            state.grad = torch.zeros_like(F)
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
        """As torch's: the layers forget what their backward collected for the step."""
        super().zero_grad(set_to_none)
        for layer in self._layer_of.values():
            if layer.recipe_state.terms:
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
        collecting = [layer.recipe_state for layer in self._layer_of.values()
                      if layer.recipe_state.terms]
        _sum_over_processes(collecting)
        collected = {id(c.state): c for c in _read(collecting)}
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
                elif state.terms and not collected[id(state)].n:
                    continue  # an activity rule with no backward since the last step
                else:
                    est = layer.rule.estimate
                    if est is not None and state.steps % est.every == 0:  # the first one now
                        state.estimate_trials += estimate_layer(layer, self.generator)
                    got = collected.get(id(state))
                    self._step_layer(F, layer, float(group["lr"]), state, got)
                    if got is not None:
                        got.advance()  # (the next probes; the calls consumed)
                state.steps += 1
                if not state.warm:  # (nn.Module's attribute setter: a few µs a call)
                    state.warm = True
        for rate, (Fs, Ws) in lerps.items():
            torch._foreach_lerp_(Fs, Ws, rate)
        return loss

    def _step_layer(self, F: Tensor, layer: FeedbackLayer, rate: float, state: RecipeState,
                    got: _Collected | None) -> None:
        rule = layer.rule
        W = layer.weight.detach()
        # the self term's W: the layer's, or the estimate of it (neuralign.estimate)
        W_self = W if rule.estimate is None else layer.weight_estimate
        c = rule.coefficients
        decay, self_ = c.get("decay", 0.0), c.get("self", 0.0)
        # the activity terms' sum over `samples` samples
        g, samples = (state.grad, got.n) if got is not None else (None, 0)
        kappa = got.curvature(layer) if got is not None else decay
        if rule.kp:
            if state.kp_scale is None:  # (a state dict without it: from F and W now)
                _sync_kp(layer, state)
            X = state.kp_delta  # the decay acts on F − W: "the same decay on both"
            assert X is not None and state.kp_scale is not None
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
            d = torch.zeros_like(F) if g is None else g / samples
            if self_:
                d.sub_(W_self, alpha=self_)
            s = rate * F.norm() / d.norm().clamp_min(torch.finfo(F.dtype).tiny)
            X.sub_(d * s)
        elif g is None and not rule.kp and self_ and self_ == decay:
            s = rate / decay
            X.lerp_(W_self, rate)  # sa: F ← F + rate·(W − F), one pass
        else:
            s = rate / max(kappa, torch.finfo(F.dtype).tiny)
            _decay_step(X, s, decay, g, samples)
            if self_:
                X.add_(W_self, alpha=s * self_)
        if rule.update_noise:
            eps = torch.randn(F.shape, generator=self.generator, device=F.device, dtype=F.dtype)
            X.add_(eps.mul_(update_noise_scale(rule, s, W)))
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
    assert D is not None
    if state.kp_scale is not None and torch.equal(torch.add(W, D, alpha=state.kp_scale), F):
        return
    torch.sub(F, W, out=D)
    state.kp_scale = 1.0
