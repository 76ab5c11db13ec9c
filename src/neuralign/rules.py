"""Learning rules for the feedback weights: the :class:`Rule` type and the catalog of named rules.

A rule is data: term coefficients (see :mod:`neuralign.terms`) plus switches. The named rules
are frozen catalog entries, each with its defaults and where they come from; a new rule is a
few lines of data::

    na.Rule(terms={"amp": 1.0, "null": 0.5, "decay": 0.1}, noise={"dist": "normal", "std": 1.0})
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from .terms import ACTIVITY_TERMS, TERMS

__all__ = ["MirrorNoise", "Rule", "RuleInfo", "register", "catalog", "get_rule", "list_rules"]

#: How the feedback weight F comes about.
#: learned: a Parameter trained by the rule's terms (and/or Kolen-Pollack's task share);
#: fixed: a buffer kept at its random init (feedback alignment);
#: usf / brsf / frsf: a buffer derived from sign(W) every step (sign symmetry);
#: dfa: the layer sends down D e, the network's output error e through a fixed random D;
#: bp: no feedback weight at all: the layer is left a plain torch layer.
FEEDBACK_KINDS = ("learned", "fixed", "usf", "brsf", "frsf", "dfa", "bp")
SIGN_KINDS = ("usf", "brsf", "frsf")
#: The random initialisations of F, by name: ``draw(tensor, generator)`` fills the tensor in
#: place (see neuralign.layers.init_feedback).
INITS = {
    # the torch layer's own reset_parameters draw for weight (Linear and ConvNd alike)
    "default": lambda t, g: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g),
    "kaiming_uniform": lambda t, g: nn.init.kaiming_uniform_(t, nonlinearity="relu", generator=g),
    "kaiming_normal": lambda t, g: nn.init.kaiming_normal_(t, nonlinearity="relu", generator=g),
    "xavier_uniform": lambda t, g: nn.init.xavier_uniform_(t, generator=g),
    "xavier_normal": lambda t, g: nn.init.xavier_normal_(t, generator=g),
    # U[-1, 1], no fan: TinyDFA's feedback matrix before its 1/sqrt(size) normalisation
    "uniform": lambda t, g: nn.init.uniform_(t, -1.0, 1.0, generator=g),
}
#: Initialisations of F: the random ones, or ``weight`` (F starts as a copy of W).
FEEDBACK_INITS = (*INITS, "weight")
NOISE_DISTS = ("normal", "uniform")
#: How a dfa layer scales the output error it sends to each of an input's P positions (see
#: :attr:`Rule.dfa_scale`).
DFA_SCALES = ("mean", "broadcast")
#: What the update noise's σ is measured in (see :attr:`Rule.update_noise_units`).
UPDATE_NOISE_UNITS = ("gradient", "weight")
#: How a rule's terms are defined (see :attr:`Rule.convention`).
CONVENTIONS = ("library", "paper")
#: The terms the paper's convention writes without the ½ (their gradient is twice the
#: library's for the same coefficient).
NO_HALF = ("decay", "null", "sparse")


def _valid(what: str, value: Any, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")


@dataclass(frozen=True)
class MirrorNoise:
    """Mirror noise: the activity terms see fresh noise of the input's shape instead of x.

    Args:
        dist: ``'normal'`` or ``'uniform'`` (uniform with the same standard deviation).
        std: standard deviation σ.
    """

    dist: str = "normal"
    std: float = 1.0

    def __post_init__(self):
        _valid("noise distribution", self.dist, NOISE_DISTS)
        if not (isinstance(self.std, int | float) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"mirror noise std must be a positive number, got {self.std!r}")


#: How a rule's non-local term (``self``) gets W: the layer's own, or an estimate made at
#: the synapse (:mod:`neuralign.estimate`).
ESTIMATORS = ("exact", "rdd", "perturb")
#: The spiking units of the ``rdd`` estimator: thresholded noisy units, or leaky
#: integrate-and-fire neurons simulated over a window of time steps.
SPIKING_UNITS = ("threshold", "lif")


@dataclass(frozen=True)
class WeightEstimate:
    """Weight estimation: the ``self`` term reads an estimate Ŵ of W, made by simulated units
    from what a synapse can observe (activities, spikes, drives), instead of W itself.

    Args:
        method: ``'exact'`` (W itself), ``'rdd'`` (regression discontinuity on thresholded
            noisy spiking units) or ``'perturb'`` (input perturbation and regression).
        samples: trials per estimation phase (the estimation budget).
        every: optimizer steps between estimation phases (the first runs before the first
            step).
        noise: std of the noise that drives the upstream units (rdd: around their threshold;
            perturb: the injected input noise).
        window: rdd: half-width of the window around the threshold whose trials enter a unit's
            fit, in units of ``noise``.
        drive_noise: std of the downstream drive's own noise, on top of the upstream units'
            effect (what the estimate must see through).
        unit: rdd's upstream units: ``'threshold'`` (a noisy drive, one spike when it exceeds
            threshold) or ``'lif'`` (leaky integrate-and-fire neurons, simulated for ``steps``
            time steps per trial).
        steps: lif: time steps per trial, the window over which a unit's maximum drive and
            its spikes are taken (Guerguiev et al.: 30 steps of 1 ms).
        tau: lif: the membrane time constant in time steps (Guerguiev et al.: 10 ms).
        memory: the share of the previous estimate each phase keeps, in [0, 1):
            ``Ŵ ← memory·Ŵ + (1 − memory)·(the phase's estimate)``, an estimate carried over
            between phases as Guerguiev et al.'s online fit is. The first phase takes its
            estimate whole; 0 (the default) starts afresh every phase.
    """

    method: str = "exact"
    samples: int = 2000
    every: int = 100
    noise: float = 1.0
    window: float = 0.5
    drive_noise: float = 0.1
    unit: str = "threshold"
    steps: int = 30
    tau: float = 10.0
    memory: float = 0.0

    def __post_init__(self):
        _valid("weight estimator", self.method, ESTIMATORS)
        _valid("spiking unit", self.unit, SPIKING_UNITS)
        if self.unit != "threshold" and self.method != "rdd":
            raise ValueError(f"unit={self.unit!r} is a spiking unit of the rdd estimator; "
                             f"method {self.method!r} has none (leave unit at 'threshold')")
        for name in ("samples", "every", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"estimate {name} must be an integer >= 1, got {v!r}")
        for name, zero_ok in (("noise", False), ("window", False), ("drive_noise", True)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                    or v < 0 or (v == 0 and not zero_ok):
                raise ValueError(f"estimate {name} must be a finite number "
                                 f"{'>= 0' if zero_ok else '> 0'}, got {v!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, int | float) \
                or not math.isfinite(self.tau) or self.tau < 1:
            raise ValueError(f"estimate tau is a membrane time constant in time steps, a finite "
                             f"number >= 1, got {self.tau!r}")
        if isinstance(self.memory, bool) or not isinstance(self.memory, int | float) \
                or not 0 <= self.memory < 1:
            raise ValueError(f"estimate memory is the share of the previous estimate kept, in "
                             f"[0, 1), got {self.memory!r}")


@dataclass(frozen=True)
class Rule:
    """A learning rule for the feedback weights.

    Args:
        terms: term name -> coefficient; names from ``decay, amp, null, sparse, self``.
        kind: how F comes about, one of ``FEEDBACK_KINDS``. (``feedback=`` is its former,
            deprecated name, still accepted; ``rule.feedback`` reads it with a warning.)
        kp: Kolen-Pollack: F's gradient also receives W's task gradient ``outer(x, dy)``.
        noise: mirror noise (a :class:`MirrorNoise`, a dict of its fields, or None).
        update_noise: σ of the noise added after each step of F, in ``update_noise_units``.
        update_noise_units: ``'gradient'`` (the default; the paper's ``ΔB = ∇R + N(0, σ²)``):
            ``F += lr_F · N(0, σ²)``, so each rule's step size ``lr_F`` scales it (the
            recipe's ``rate/κ``, or the feedback optimizer's learning rate). ``'weight'``:
            ``F += σ · rms(W) · N(0, 1)`` at every step, whatever the step size: σ is the noise
            per step as a fraction of W's root-mean-square entry, one axis for every rule and
            dynamics. A gradient-unit σ is ``lr_F · σ / rms(W)`` in weight units.
        normalize: after each step rescale F to a fixed Frobenius norm: ``True`` for its norm
            at initialisation, a number for that norm, ``False`` for none.
        init: how F is initialised, one of ``FEEDBACK_INITS``.
        rate: how fast the feedback recipe (:func:`neuralign.feedback_optimizer`) moves F: the
            fraction of the way to the rule's fixed point covered per step along its stiffest
            direction, in (0, 1]. Only the recipe reads it; an optimizer of your own over
            ``param_groups(model)["feedback"]`` has its own learning rate.
        estimate: where the ``self`` term's W comes from: None (or ``'exact'``) for W
            itself, else a :class:`WeightEstimate`, its method's name (``'rdd'``,
            ``'perturb'``) or a dict of its fields.
        convention: how the terms are defined. ``'library'`` (the default): activity terms
            averaged over examples × positions, decay, null and sparse with a ½, the
            projections before the layer's bias (:mod:`neuralign.terms`). ``'paper'``: the
            authors' definitions (Kunin et al. 2020, ``neuroailab/neural-alignment``,
            ``Alignments/primitives.py`` and ``alignment.py``): activity terms averaged over
            examples and summed over positions and units, decay, null and sparse without the
            ½, the layer's bias added to both projections (their flags' defaults). A named
            rule taken with ``get_rule(name, convention="paper")`` also takes the authors'
            coefficients.
        dfa_scale: ``kind='dfa'`` only: what each of an input's P positions receives when the
            output error is one vector per example. ``'mean'`` (the default): ``D e / P``, what
            backprop sends through a global average pooling followed by D, so a convolution's
            weight gradient has a Linear layer's scale. ``'broadcast'``: ``D e`` at every
            position, no ``1/P`` (BioTorch's convolutional dfa, whose kernel-shaped D sums to
            this where every tap reads). An output with the input's positions (per-token
            logits) gives each position its own ``D e_s`` under either.
        name: a label (the catalog name for named rules).
    """

    terms: Mapping[str, float] = field(default_factory=dict)
    kind: str = "learned"
    kp: bool = False
    noise: MirrorNoise | None = None
    update_noise: float = 0.0
    normalize: bool | float = False
    init: str = "default"
    rate: float = 0.1
    estimate: WeightEstimate | None = None
    convention: str = "library"
    name: str = "custom"
    dfa_scale: str = "mean"
    update_noise_units: str = "gradient"
    feedback: InitVar[str | None] = None  # the deprecated name of ``kind``

    def __post_init__(self, feedback: str | None = None):
        if isinstance(feedback, str):
            warnings.warn("Rule(feedback=...) is deprecated: it is Rule(kind=...)",
                          DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "kind", feedback)
        if not isinstance(self.terms, Mapping):
            raise TypeError(f"terms must be a mapping of term name to coefficient, got {self.terms!r}")
        terms = {}
        for t, c in self.terms.items():
            _valid("term", t, TERMS)
            if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c):
                raise ValueError(f"coefficient of {t!r} must be a finite number, got {c!r}")
            if c:
                terms[t] = float(c)
        object.__setattr__(self, "terms", MappingProxyType(terms))
        if isinstance(self.noise, Mapping):
            unknown = set(self.noise) - {"dist", "std"}
            if unknown:
                raise ValueError(f"unknown noise keys {sorted(unknown)}; valid: dist, std")
            object.__setattr__(self, "noise", MirrorNoise(**self.noise))
        elif self.noise is not None and not isinstance(self.noise, MirrorNoise):
            raise TypeError(f"noise must be a MirrorNoise, a dict or None, got {self.noise!r}")
        estimate = self.estimate
        if isinstance(estimate, str):
            estimate = WeightEstimate(method=estimate)
        elif isinstance(estimate, Mapping):
            unknown = set(estimate) - {f.name for f in dataclasses.fields(WeightEstimate)}
            if unknown:
                raise ValueError(f"unknown estimate keys {sorted(unknown)}; valid: "
                                 f"{', '.join(f.name for f in dataclasses.fields(WeightEstimate))}")
            estimate = WeightEstimate(**estimate)
        elif estimate is not None and not isinstance(estimate, WeightEstimate):
            raise TypeError(f"estimate must be a WeightEstimate, a method name, a dict or None, "
                            f"got {estimate!r}")
        if estimate is not None and estimate.method == "exact":
            estimate = None
        object.__setattr__(self, "estimate", estimate)
        if estimate is not None and not self.terms.get("self"):
            raise ValueError(
                f"estimate={estimate.method!r} replaces W in the self term, and this rule has "
                "none (Kolen-Pollack's share is W's own update, built from activities: nothing "
                "to estimate); use a rule with self, e.g. sa")
        _valid("feedback kind", self.kind, FEEDBACK_KINDS)
        _valid("convention", self.convention, CONVENTIONS)
        _valid("feedback init", self.init, FEEDBACK_INITS)
        _valid("update noise units", self.update_noise_units, UPDATE_NOISE_UNITS)
        if not (isinstance(self.update_noise, int | float) and math.isfinite(self.update_noise)
                and self.update_noise >= 0):
            raise ValueError(f"update_noise is a standard deviation >= 0 (finite), got "
                             f"{self.update_noise!r}")
        if isinstance(self.rate, bool) or not (isinstance(self.rate, int | float)
                                                and 0 < self.rate <= 1):
            raise ValueError(f"rate is the fraction of the way to the fixed point per step, in "
                             f"(0, 1], got {self.rate!r}")
        norm = self.normalize
        if not (isinstance(norm, bool) or (isinstance(norm, int | float) and math.isfinite(norm)
                                           and norm > 0)):
            raise ValueError(f"normalize must be True, False or a positive norm (finite), got "
                             f"{norm!r}")
        if self.kind != "learned":
            switches = [k for k in ("terms", "kp", "noise", "update_noise", "normalize")
                        if getattr(self, k)]
            if switches:
                raise ValueError(
                    f"kind={self.kind!r}: F is never trained, so {', '.join(switches)} "
                    "cannot apply; use kind='learned'")
        elif not (self.terms or self.kp):
            raise ValueError("a learned feedback needs at least one term (valid: "
                             f"{', '.join(TERMS)}) or kp=True; for a fixed one use kind='fixed'")
        _valid("dfa scale", self.dfa_scale, DFA_SCALES)
        if self.kind != "dfa" and self.dfa_scale != "mean":
            raise ValueError(f"dfa_scale={self.dfa_scale!r} scales the output error a dfa layer "
                             f"sends down; kind={self.kind!r} sends none (use kind='dfa')")
        if self.kind == "dfa" and self.init == "weight":
            raise ValueError("dfa's D maps the output error to a layer's input: it has no W to "
                             "copy; choose another init")
        if self.noise is not None and not any(t in self.terms for t in ACTIVITY_TERMS):
            raise ValueError("mirror noise replaces x in the activity terms "
                             f"({', '.join(ACTIVITY_TERMS)}), and this rule has none")

    def __hash__(self):
        return hash((tuple(sorted(self.terms.items())), self.kind, self.kp, self.noise,
                     self.update_noise, self.normalize, self.init, self.rate, self.estimate,
                     self.convention, self.dfa_scale, self.update_noise_units, self.name))

    def __reduce__(self):  # the terms mapping is read-only, and pickles as a dict
        return (Rule.from_dict, (self.to_dict(),))

    def __deepcopy__(self, memo):  # immutable
        return self

    def __eq__(self, other):
        return isinstance(other, Rule) and self.to_dict() == other.to_dict()

    # -- derived properties ---------------------------------------------------------------------
    @property
    def coefficients(self) -> Mapping[str, float]:
        """Each term's coefficient as the library's terms define them (the gradient's factor
        in :mod:`neuralign.terms`): the rule's own under the library's convention; under the
        paper's, decay, null and sparse doubled (the authors write them without the ½)."""
        if self.convention == "library":
            return self.terms
        return {t: 2 * c if t in NO_HALF else c for t, c in self.terms.items()}

    @property
    def paper(self) -> bool:
        """The paper's convention: activity terms summed over positions, and the layer's bias
        in both projections (see :attr:`convention`)."""
        return self.convention == "paper"

    @property
    def learns(self) -> bool:
        """F is a Parameter that receives gradient."""
        return self.kind == "learned"

    @property
    def uses_output(self) -> bool:
        """The backward needs the layer's real output ``y``: null on real data."""
        return self.noise is None and "null" in self.terms

    @property
    def amp_on_data(self) -> bool:
        """amp on real data: the backward reads ``y`` if the forward kept it, else folds amp
        into the kernel, ``outer(x, x (sparse F − amp W)ᵀ)`` (a W-sized temporary instead)."""
        return self.noise is None and "amp" in self.terms

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data (YAML/JSON-safe) that :meth:`from_dict` turns back into this rule."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["terms"] = dict(self.terms)
        d["noise"] = dataclasses.asdict(self.noise) if self.noise else None
        d["estimate"] = dataclasses.asdict(self.estimate) if self.estimate else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Rule:
        """The rule of :meth:`to_dict`'s data; unknown keys are an error."""
        valid = [f.name for f in dataclasses.fields(cls)] + ["feedback"]
        unknown = set(d) - set(valid)
        if unknown:
            raise ValueError(f"unknown rule keys {sorted(unknown)}; valid: {', '.join(valid)}")
        return cls(**d)

    def replace(self, /, **overrides) -> Rule:
        """A copy with overrides: term names set coefficients, plus ``noise_std``,
        ``noise_dist``, and any field of :class:`Rule` (``noise=None`` removes mirror noise)."""
        fields = [f.name for f in dataclasses.fields(self)]
        valid = list(TERMS) + ["noise_std", "noise_dist"] + fields + ["feedback"]
        unknown = [k for k in overrides if k not in valid]
        if unknown:
            raise ValueError(f"unknown rule override(s) {unknown}; valid: {', '.join(valid)}")
        terms = dict(self.terms)
        changes: dict[str, Any] = {}
        noise = self.noise
        for k, v in overrides.items():
            if k in TERMS:
                terms[k] = v
            elif k in ("noise_std", "noise_dist"):
                base = noise or MirrorNoise()
                noise = dataclasses.replace(base, **{k[len("noise_"):]: v})
            elif k == "noise":
                noise = v
            elif k == "terms":
                terms = dict(v)
            elif k == "feedback":  # deprecated name of kind
                warnings.warn("the rule override 'feedback' is deprecated: it is 'kind'",
                              DeprecationWarning, stacklevel=2)
                changes["kind"] = v
            else:
                changes[k] = v
        # (feedback=None: dataclasses.replace would read the deprecated alias otherwise)
        return dataclasses.replace(self, terms=terms, noise=noise, feedback=None, **changes)


def _feedback_kind(self: Rule) -> str:
    warnings.warn("Rule.feedback is deprecated: it is Rule.kind (layer.feedback is the tensor)",
                  DeprecationWarning, stacklevel=2)
    return self.kind


# (after the class is made: as a class attribute it would become the InitVar's default)
Rule.feedback = property(  # type: ignore[attr-defined]
    _feedback_kind, doc="Deprecated name of :attr:`Rule.kind`.")


@dataclass(frozen=True)
class RuleInfo:
    """A catalog entry: a named rule with its defaults and where they come from.

    ``paper`` holds the authors' code defaults for the rule's coefficients under the paper's
    convention (``get_rule(name, convention="paper")``), or None where the authors' code has
    no such rule (then the library's coefficients, translated: ½ the decay, null and sparse).
    """

    name: str
    description: str
    source: str
    rule: Rule
    paper: Mapping[str, float] | None = None


_CATALOG: dict[str, RuleInfo] = {}


def register(name: str, description: str, source: str, paper: Mapping[str, float] | None = None,
             **rule_fields) -> RuleInfo:
    """Add a named rule to the catalog; a duplicate name raises. ``paper``: the term
    coefficients under the paper's convention (see :class:`RuleInfo`)."""
    if name in _CATALOG:
        raise ValueError(f"rule {name!r} is already registered")
    info = RuleInfo(name, description, source, Rule(name=name, **rule_fields),
                    MappingProxyType(dict(paper)) if paper is not None else None)
    _CATALOG[name] = info
    return info


def catalog() -> list[RuleInfo]:
    """All catalog entries, sorted by name."""
    return [_CATALOG[k] for k in sorted(_CATALOG)]


def list_rules() -> list[str]:
    """Names of the catalog's rules, sorted (``bp`` included; rules added with
    :func:`register` too).

    Examples:
        >>> na.list_rules()[:4]
        ['aa', 'bp', 'brsf', 'dfa']
    """
    return sorted(_CATALOG)


def get_rule(name: str | Rule, **overrides) -> Rule:
    """A named rule with its defaults, overridden by ``overrides``.

    Args:
        name: a catalog name (:func:`list_rules`), or a :class:`Rule` to override.
        **overrides: term names set coefficients (``decay=0.5``); ``noise_std``, ``noise_dist``
            and any field of :class:`Rule` too (see :meth:`Rule.replace`). A named rule
            taken with ``convention="paper"`` starts from the authors' coefficients (the
            catalog's ``paper`` entry), which the other overrides then change.

    Returns:
        A new frozen :class:`Rule` (the catalog entry itself when there are no overrides).

    Raises:
        ValueError: an unknown name (the valid ones are listed), term or field.

    Examples:
        >>> dict(na.get_rule("wm", decay=0.5, noise_std=0.5).terms)
        {'amp': 1.0, 'decay': 0.5}
    """
    if isinstance(name, Rule):
        return name.replace(**overrides) if overrides else name
    if name not in _CATALOG:
        raise ValueError(f"unknown rule {name!r}; valid rules: {', '.join(list_rules())}")
    info = _CATALOG[name]
    rule = info.rule
    if overrides.get("convention") == "paper" and rule.convention != "paper" and rule.learns:
        # the authors' coefficients, or the library's translated (½ decay, null and sparse)
        paper = info.paper if info.paper is not None else {
            t: c / 2 if t in NO_HALF else c for t, c in rule.terms.items()}
        rule = rule.replace(convention="paper", terms=paper)
    return rule.replace(**overrides) if overrides else rule


# -- the catalog ----------------------------------------------------------------------------
# Coefficients are ratios: they fix where F settles; how fast F gets there is the recipe's
# `rate` (neuralign.feedback_optimizer), or the learning rate of an optimizer of your own. The
# reference code's coefficients (paper/reference-code-notes.md) write decay, null and sparse
# without the 1/2, so ours for those are twice theirs; both sets below are theirs times 500.
_REF = "reference code (neuroailab/neural-alignment) defaults, decay/null/sparse doubled for the 1/2, x500"
# The rates were chosen by measurement (docs/fidelity.md, "Choosing the rates"): the fastest
# that keeps training stable and, for mirror noise, averages the noise over enough steps.
_RATE = "rate measured in docs/fidelity.md"

register("bp", "Backpropagation: errors go down through W (the layer stays a plain torch layer).",
         "Rumelhart, Hinton & Williams 1986", kind="bp")
register("fa", "Feedback alignment: F fixed at an independent random init.",
         "Lillicrap et al. 2016", kind="fixed")
register("wm", "Weight mirror: amp + decay on mirror noise; F -> (amp*std^2/decay) W = W.",
         f"Akrout et al. 2019; {_REF} (amp 1e-3, decay 1e-3 -> 1:2), rescaled to F = W; {_RATE}",
         terms={"amp": 1.0, "decay": 1.0}, noise=MirrorNoise("normal", 1.0), rate=0.1,
         paper={"amp": 1e-3, "decay": 1e-3})
register("ia", "Information alignment: amp + null + decay on mirror noise; F learns a ridge "
         "reconstruction of x from y.",
         f"Kunin et al. 2020; {_REF} (amp 2e-3, null 1e-3, decay 1e-3); {_RATE}",
         terms={"amp": 1.0, "null": 1.0, "decay": 1.0}, noise=MirrorNoise("normal", 1.0), rate=0.1,
         paper={"amp": 2e-3, "null": 1e-3, "decay": 1e-3})
register("sa", "Symmetric alignment: self + decay; F -> (self/decay) W = W. The recipe moves F "
         "half way there each step (rate 0.5).",
         f"Kunin et al. 2020; {_REF} (self 2e-3, decay 1e-3); {_RATE}",
         terms={"self": 1.0, "decay": 1.0}, rate=0.5, paper={"self": 2e-3, "decay": 1e-3})
register("aa", "Activation alignment: amp + sparse on the data; F -> (amp/sparse) W = W on the "
         "data's span. The recipe reaches it along the data's top direction in one step "
         "(rate 1).", f"Kunin et al. 2020; {_REF} (amp 2e-3, sparse 1e-3); {_RATE}",
         terms={"amp": 1.0, "sparse": 1.0}, rate=1.0, paper={"amp": 2e-3, "sparse": 1e-3})
register("kp", "Kolen-Pollack: F gets W's task gradient plus decay; F - W -> 0 when W has the "
         "same decay. The recipe gives F exactly W's update and shrinks F - W by 10% per step.",
         "Kolen & Pollack 1994, Akrout et al. 2019; reference code decay 1e-3 without the 1/2 "
         f"(gradient 2e-3 F); {_RATE}", terms={"decay": 2e-3}, kp=True, rate=0.1,
         paper={"decay": 1e-3})
register("dfa", "Direct feedback alignment: each layer sends down D e, the network's output error "
         "e through a fixed random D (outputs x in_channels, shared over positions: each of an "
         "input's P positions receives D e / P, or D e with dfa_scale='broadcast'; where the "
         "output has the input's positions, "
         "as a language model's per-token logits, each position receives its own D e).",
         "Nøkland 2016", kind="dfa")
register("usf", "Uniform sign-concordant feedback: F = s sign(W), s the std of F's init.",
         "Liao, Leibo & Poggio 2016; Xiao et al. 2018", kind="usf")
register("brsf", "Batchwise random-magnitude sign-concordant feedback: F = |R| sign(W), R drawn "
         "from F's init distribution every batch.", "Xiao et al. 2018", kind="brsf")
register("frsf", "Fixed random-magnitude sign-concordant feedback: F = |F0| sign(W), F0 fixed.",
         "Xiao et al. 2018", kind="frsf")
