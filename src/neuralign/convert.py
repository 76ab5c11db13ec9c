"""Model surgery: convert any model's layers to feedback layers, and inspect or undo it."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import importlib
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .dfa import DFAState, mark_output, mark_point, unmark_output
from .layers import FEEDBACK_CLASSES, DFAPoint, FeedbackLayer
from .rules import Rule, get_rule

__all__ = ["DEFAULT_MAPPING", "UnsupportedLayerError", "convert", "revert", "feedback_layers",
           "feedback_points", "bypassed_layers", "param_groups", "exact_backprop", "after_step"]

log = logging.getLogger(__name__)

#: torch layer class -> feedback layer class; exact types are matched. It is the registry of
#: :func:`neuralign.layers.register_layer` itself, so a registered layer family is converted
#: by default; pass another dict as ``mapping`` for a one-off choice.
DEFAULT_MAPPING: dict[type[nn.Module], type[FeedbackLayer]] = FEEDBACK_CLASSES

#: Layers whose parameters act elementwise (their "transpose" is themselves): no weight
#: transport to avoid, so they are left alone without a report.
ELEMENTWISE = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.PReLU,
               nn.Embedding, nn.EmbeddingBag, nn.RMSNorm)

POLICIES = ("warn", "ignore", "raise")

#: library -> the neuralign module that registers its layer families (on import). ``convert``
#: imports it when the library itself is imported, so a model of that library converts whole
#: without a step of the user's, and ``import neuralign`` never imports the library.
INTEGRATIONS = {"transformers": "neuralign.integrations.hf",
                "timm": "neuralign.integrations.timm"}


def _register_integrations() -> None:
    for library, module in INTEGRATIONS.items():
        if library in sys.modules:
            importlib.import_module(module)  # (a string: the integration imports this module)


class UnsupportedLayerError(TypeError):
    """A layer with parameters that convert cannot give feedback weights."""


def _rule_for(name: str, rule: Rule, layer_rules: Mapping[str, str | Rule]) -> Rule:
    chosen = rule
    for pattern, r in layer_rules.items():  # the last matching pattern wins
        if fnmatch.fnmatchcase(name, pattern):
            chosen = get_rule(r)
    return chosen


def convert(
    model: nn.Module,
    rule: str | Rule,
    layer_rules: Mapping[str, str | Rule] | None = None,
    mapping: Mapping[type[nn.Module], type[FeedbackLayer]] | None = None,
    inplace: bool = False,
    on_unsupported: str = "warn",
    generator: torch.Generator | None = None,
    points: Sequence[str] | None = None,
    error_at: str | None = None,
) -> nn.Module:
    """Replace every layer of a type in ``mapping`` by its feedback layer.

    Args:
        model: any module.
        rule: a catalog name (see ``list_rules()``) or a :class:`Rule`.
        layer_rules: module-name glob pattern -> rule, e.g. ``{"fc": "bp", "layer4.*": "sa"}``;
            the last matching pattern wins; ``"bp"`` keeps a layer plain. A module registered
            at several places becomes one feedback layer at all of them (the tie is kept), and
            its names must get the same rule.
        mapping: torch class -> feedback class (default :data:`DEFAULT_MAPPING`).
        inplace: convert ``model`` itself instead of a deep copy.
        on_unsupported: what to do with other layers that hold parameters directly and are not
            elementwise: ``'warn'`` (log a warning), ``'ignore'`` or ``'raise'``.
        generator: random generator for the feedback initialisations.
        points: direct feedback alignment at block outputs (rule ``dfa`` only; Launay et al.
            2020): module-name glob patterns; each matching module's output becomes a
            feedback point (:class:`~neuralign.layers.DFAPoint`) that sends ``D e`` down in
            place of the gradient from above. Layers are then kept on backprop (the blocks
            learn from the signal injected at their outputs) unless ``layer_rules`` give them
            a rule.
        error_at: rule ``dfa`` only: the name of the module (the read-out) at whose *input*
            the error ``e`` is taken, instead of at the model's output; that module trains
            by backprop.

    Returns:
        The converted model (a copy unless ``inplace``); weights, hooks, device and
            train/eval state are kept.

    Raises:
        ValueError: ``model`` already holds feedback layers (converting twice would keep the
            old rule on them): convert the plain model, or ``revert`` it first.
    """
    if mapping is None:
        _register_integrations()
    converted = [n or "(the model itself)" for n, _ in [*feedback_layers(model),
                                                         *feedback_points(model)]]
    if converted:
        raise ValueError(f"the model is already converted (feedback layers: "
                         f"{', '.join(converted[:5])}{' ...' if len(converted) > 5 else ''}); "
                         f"to change its rule, convert the plain model, or "
                         f"neuralign.revert(model) first")
    if on_unsupported not in POLICIES:
        raise ValueError(f"unknown on_unsupported {on_unsupported!r}; valid: {', '.join(POLICIES)}")
    rule = get_rule(rule)
    layer_rules = {k: get_rule(v) for k, v in (layer_rules or {}).items()}
    mapping = DEFAULT_MAPPING if mapping is None else mapping
    points = list(points or ())
    hosts = _point_hosts(model, rule, points, error_at)
    if not inplace:
        model = copy.deepcopy(model)
    if type(model) in mapping:  # a bare layer
        r = _rule_for("", rule, layer_rules)
        if r.kind != "bp":
            model = mapping[type(model)].from_module(model, r, generator)
        return _mark_dfa(model)
    # Plan, then apply: every problem is found, and every new layer built, before the model
    # changes, so an error never leaves a half-converted model (which matters with inplace).
    # A module registered at several places (nn.Sequential(lin, act, lin)) is one layer: it is
    # converted once, and its feedback layer takes every place, so the places keep sharing W
    # and share F too.
    places = _places(model, lambda m: type(m) in mapping)
    names: dict[int, list[str]] = {}
    for name, module in places:
        names.setdefault(id(module), []).append(name)
    found = [name for name, _ in places]
    unsupported = [f"{name}: {type(m).__name__}" for name, m in model.named_modules()
                   if name and _holds_weights(m) and not _inside(name, found)]
    used = {p for p in layer_rules for name in found if fnmatch.fnmatchcase(name, p)}
    unused = sorted(set(layer_rules) - used)
    if unused:
        raise ValueError(f"layer_rules patterns {unused} match no convertible layer; "
                         f"convertible layers: {[n for n, _ in _convertible(model, mapping)]}")
    # with feedback points the layers learn by backprop unless layer_rules say otherwise; the
    # error_at module (what gives e) always does
    default = get_rule("bp") if points else rule
    plan: list[tuple[list[str], nn.Module, Rule]] = []
    for name, module in places:
        if name != names[id(module)][0]:
            continue  # a later place of a module already planned
        rules = {n: get_rule("bp") if error_at is not None and _inside(n, [error_at])
                 else _rule_for(n, default, layer_rules) for n in names[id(module)]}
        if len(set(rules.values())) > 1:
            raise ValueError(
                f"{' and '.join(map(repr, rules))} are one module, registered at {len(rules)} places, and "
                f"layer_rules give them different rules "
                f"({', '.join(f'{n}: {r.name}' for n, r in rules.items())}); a module has one "
                f"rule: give all its names the same one")
        plan.append((names[id(module)], module, rules[name]))
    for where, module, r in plan:
        on_point = [w for w in where if w in hosts]
        if on_point and r.kind != "bp":
            raise ValueError(f"points: {on_point[0]!r} is a layer converted with rule {r.name} "
                             f"({type(module).__name__}); put feedback points on the blocks "
                             f"around layers, or keep it on backprop (layer_rules "
                             f"{{{on_point[0]!r}: 'bp'}})")
    if unsupported and on_unsupported != "ignore":
        msg = (f"{len(unsupported)} layer(s) hold parameters but have no feedback layer, so "
               f"their backward still uses their own weights ({'; '.join(unsupported)}); "
               f"register a layer family (neuralign.layers.register_layer) to convert them")
        if on_unsupported == "raise":
            raise UnsupportedLayerError(msg)
        log.warning(msg)
    new = [(where, module, r, None if r.kind == "bp"
            else mapping[type(module)].from_module(module, r, generator))
           for where, module, r in plan]
    for where, module, r, layer in new:
        shown = " and ".join(where)
        if layer is None:
            log.info("%s: %s kept (rule bp)", shown, type(module).__name__)
            continue
        for name in where:
            _put(model, name, layer)
        log.info("%s: %s -> %s (rule %s)", shown, type(module).__name__, type(layer).__name__,
                 r.name)
    modules = dict(model.named_modules())
    for name in hosts:
        host = modules[name]
        like = next((p for p in host.parameters() if p.is_floating_point()), torch.empty(0))
        host.add_module("dfa_point", DFAPoint(rule, generator).to(like.device, like.dtype))
        log.info("%s: feedback point (rule %s)", name, rule.name)
    return _mark_dfa(model, None if error_at is None else modules[error_at])


def _point_hosts(model: nn.Module, rule: Rule, points: list[str],
                 error_at: str | None) -> list[str]:
    """The names of the modules that ``points`` (globs) match, checked with ``error_at``."""
    if not points and error_at is None:
        return []
    if rule.kind != "dfa":
        raise ValueError(f"points and error_at place direct feedback alignment's error (rule "
                         f"'dfa'); the rule is {rule.name!r}")
    names = [n for n, _ in model.named_modules() if n]
    if not names:
        raise ValueError("points and error_at name modules inside a model; a single layer has "
                         "none")
    shown = f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
    hosts = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in points)]
    unused = [p for p in points if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unused:
        raise ValueError(f"points {unused} match no module; the model's modules: {shown}")
    nested = [h for h in hosts if _inside(h, [o for o in hosts if o != h])]
    if nested:
        raise ValueError(f"points match {nested}, inside other matched modules (a glob's * "
                         f"crosses dots: 'blocks.*' matches 'blocks.0.fc' too); name the "
                         f"blocks alone, e.g. 'blocks.?' or their full names")
    if error_at is not None:
        if error_at not in names:
            raise ValueError(f"error_at {error_at!r} is not a module of the model (a name, not "
                             f"a pattern); the model's modules: {shown}")
        clash = [h for h in hosts if _inside(h, [error_at]) or _inside(error_at, [h])]
        if clash:
            raise ValueError(f"error_at {error_at!r} and the feedback points {clash} overlap: "
                             f"the error is taken at the read-out's input, above every point")
    return hosts


def feedback_points(model: nn.Module) -> Iterator[tuple[str, DFAPoint]]:
    """``(module name, point)`` for every dfa feedback point of ``model`` (see ``convert``'s
    ``points``), in module order: the name is the module whose output the point takes (the
    point is its ``dfa_point``)."""
    for name, m in model.named_modules():
        point = m._modules.get("dfa_point")
        if isinstance(point, DFAPoint):
            yield name, point


def _mark_dfa(model: nn.Module, error_at: nn.Module | None = None) -> nn.Module:
    """Give the model's dfa layers and feedback points one shared state and hook the root's
    output error (or ``error_at``'s input error) to it."""
    layers = [layer for _, layer in feedback_layers(model) if layer.rule.kind == "dfa"]
    points = list(feedback_points(model))
    if layers or points:
        unmark_output(model)
        state = DFAState()
        for layer in layers:
            layer._spec.dfa = state
        for name, point in points:
            point.state = state
            mark_point(model.get_submodule(name))
        mark_output(model, state, error_at)
    return model


def _places(model: nn.Module, match: Callable[[nn.Module], bool]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every place of a submodule for which ``match`` holds, outside
    the ones found before it (their children are their business), in module order; a module
    registered at two places comes twice, once with each name."""
    found: list[tuple[str, nn.Module]] = []
    names: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if name and match(module) and not _inside(name, names):
            found.append((name, module))
            names.append(name)
    return found


def _inside(name: str, folders: list[str]) -> bool:
    """``name`` is one of ``folders`` or a submodule of one."""
    return any(name == f or name.startswith(f + ".") for f in folders)


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    """Register ``module`` at the place ``name`` (dotted) of ``model``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _convertible(model, mapping):
    return [(n, m) for n, m in model.named_modules() if type(m) in mapping or _converted(m)]


def _holds_weights(module: nn.Module) -> bool:
    """Holds parameters of its own that transport weights (not elementwise, not converted)."""
    return not isinstance(module, ELEMENTWISE) and not _converted(module) and any(
        True for _ in module.parameters(recurse=False))


def revert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Back to plain torch layers: forward weights kept (the same values), feedback dropped.

    Args:
        model: a converted model (or a single feedback layer).
        inplace: revert ``model`` itself instead of a deep copy.

    Returns:
        The model with every feedback layer replaced by its torch layer, sharing the
            feedback layer's Parameters, hooks and state (a copy unless ``inplace``).
    """
    if not inplace:
        model = copy.deepcopy(model)
    unmark_output(model)
    for name, _ in list(feedback_points(model)):
        del model.get_submodule(name)._modules["dfa_point"]
    if _converted(model):
        return model.to_module()  # type: ignore[operator]
    plain: dict[int, nn.Module] = {}  # a layer at several places goes back as one module
    for name, layer in _places(model, _converted):
        if id(layer) not in plain:
            plain[id(layer)] = layer.to_module()  # type: ignore[operator]
        _put(model, name, plain[id(layer)])
    return model


def _converted(module: nn.Module) -> bool:
    """A feedback layer, or a converted container of them (multi-head attention)."""
    return isinstance(module, FeedbackLayer) or type(module) in FEEDBACK_CLASSES.values()


def bypassed_layers(model: nn.Module, forward: Callable[[], object]) -> list[str]:
    """The feedback layers that ``forward()`` (a forward pass of ``model``) never calls.

    A model that reads a layer's ``weight`` itself (``F.linear(x, self.fc.weight)``: weight
    tying, or torchvision's Swin attention, which calls its ``qkv`` and ``proj`` layers'
    weights functionally) bypasses the feedback layer: that weight's error goes down through
    W, by plain backprop, whatever the rule.

    Args:
        model: a converted model.
        forward: runs one forward pass of ``model`` (called once, under ``torch.no_grad()``;
            in training mode, batch norm's running statistics move as in any forward).

    Returns:
        The qualified names of the feedback layers whose forward did not run, in module
            order; empty when every converted layer ran.

    Examples:
        >>> model = na.convert(net, "sa")
        >>> na.bypassed_layers(model, lambda: model(x))
        []
    """
    called: set[str] = set()
    hooks = [layer.register_forward_pre_hook(lambda m, a, name=name: called.add(name))
             for name, layer in feedback_layers(model)]
    # a converted container (attention) runs its projections itself, or is torch's own module
    # under no_grad: calling it counts for them
    for name, module in model.named_modules():
        if _converted(module) and not isinstance(module, FeedbackLayer):
            inner = [f"{name}.{n}" if name else n for n, _ in feedback_layers(module)]
            hooks.append(module.register_forward_pre_hook(
                lambda m, a, inner=inner: called.update(inner)))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    return [name for name, _ in feedback_layers(model) if name not in called]


def feedback_layers(model: nn.Module) -> Iterator[tuple[str, FeedbackLayer]]:
    """``(qualified name, layer)`` for every feedback layer of ``model``, in module order
    (the name is ``""`` for a bare converted layer).

    Examples:
        >>> [name for name, _ in na.feedback_layers(model)]
        ['0', '2']
    """
    for name, m in model.named_modules():
        if isinstance(m, FeedbackLayer):
            yield name, m


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's parameters in two groups, for two optimizers.

    Returns:
        ``{'forward': [...], 'feedback': [...]}``, every parameter once: ``feedback`` holds
            the learned feedback weights (F of wm, ia, sa, aa, kp and custom rules),
            ``forward`` everything else (weights, biases, normalisation layers).

    Examples:
        >>> groups = na.param_groups(model)
        >>> opt_w = torch.optim.SGD(groups["forward"], lr=0.1)
    """
    feedback_ids = {id(layer.feedback) for _, layer in feedback_layers(model)}
    groups: dict[str, list[nn.Parameter]] = {"forward": [], "feedback": []}
    for p in model.parameters():
        groups["feedback" if id(p) in feedback_ids else "forward"].append(p)
    return groups


@contextlib.contextmanager
def exact_backprop(model: nn.Module):
    """A context in which the model's feedback layers send errors through W and its dfa
    feedback points pass the gradient on: plain backprop, with no rule work and no gradient
    for F. The previous state is restored on exit. It is the
    reference of :func:`neuralign.metrics.backprop_angles`.

    Examples:
        >>> with na.exact_backprop(model):
        ...     loss_fn(model(x), y).backward()   # backprop's gradients
    """
    layers = [layer for _, layer in feedback_layers(model)]
    points = [point for _, point in feedback_points(model)]
    saved = [layer._exact_backprop for layer in layers]
    saved_points = [point.exact_backprop for point in points]
    try:
        for layer in layers:
            layer._exact_backprop = True
        for point in points:
            point.exact_backprop = True
        yield model
    finally:
        for layer, s in zip(layers, saved, strict=True):
            layer._exact_backprop = s
        for point, s in zip(points, saved_points, strict=True):
            point.exact_backprop = s


def after_step(model: nn.Module, lr: float | torch.optim.Optimizer,
               generator: torch.Generator | None = None) -> None:
    """Update noise and normalisation, to call after each feedback optimizer step.

    For each feedback layer whose rule asks for it: ``F += lr · N(0, σ²)`` (update noise), then
    rescale F to its fixed norm (normalisation).

    Args:
        model: the converted model.
        lr: the feedback learning rate, or the feedback optimizer (its first group's ``lr``).
        generator: draws the update noise; give every rank the same seed under
            DistributedDataParallel so feedback weights stay identical.

    Example::

        loss.backward(); opt_w.step(); opt_f.step()
        na.after_step(model, opt_f)
    """
    if isinstance(lr, torch.optim.Optimizer):
        lr = float(lr.param_groups[0]["lr"])
    for _, layer in feedback_layers(model):
        layer.perturb_feedback(float(lr), generator)
        layer.normalize_feedback()
