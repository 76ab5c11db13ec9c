"""Search spaces: YAML over any config key, checked against the config before any training.

A space file maps dotted config keys to distributions::

    rule.terms.amp:   {type: float, low: 1.0e-3, high: 10.0, log: true}
    rule.noise_std:   {type: log_float, low: 0.1, high: 3.0}
    data.batch_size:  {type: int, low: 32, high: 256, log: true}
    feedback_optim.rate: {type: log_float, low: 0.01, high: 1.0}
    rule.noise_dist:  [normal, uniform]          # a list is short for categorical

Types: ``float`` (``log: true`` for a log scale, or ``step``), ``log_float`` (the same as
``float`` with ``log: true``), ``int`` (``log`` or ``step``) and ``categorical`` (``choices``:
strings, numbers, booleans or null). Every problem of a space — unknown key, unknown type or
field, empty or inverted range, non-positive bound on a log scale, a value the key's type does
not accept, a rule or model that does not exist — is collected and raised as one
:class:`SpaceError` that lists what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..train.config import Config, ConfigError, apply_overrides, yaml_float

__all__ = ["Param", "SearchSpace", "SpaceError", "load_space", "config_keys", "render_value"]

TYPES = ("float", "log_float", "int", "categorical")
_FIELDS = {
    "float": {"type", "low", "high", "log", "step"},
    "log_float": {"type", "low", "high"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
_TYPE_ALIASES = {"log-float": "log_float", "logfloat": "log_float", "loguniform": "log_float",
                 "uniform": "float", "integer": "int", "choice": "categorical"}


class SpaceError(ConfigError):
    """A search space is invalid; the message lists every problem found."""


@dataclass(frozen=True)
class Param:
    """One dimension of a space: a dotted config key and its distribution."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """The value an Optuna trial proposes for this dimension."""
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log,
                                       step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log,
                                     step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def probes(self) -> list[Any]:
        """Values that exercise the whole range: both ends, an interior point, every choice."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return [self.low, self.high]
        mid = self.low + 0.37 * (self.high - self.low)  # not an integer: tests float keys
        return [self.low, self.high, mid]


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of :class:`Param`."""

    params: tuple[Param, ...]

    def suggest(self, trial) -> dict[str, Any]:
        """Dotted config key -> the value the Optuna ``trial`` proposes, for every dimension."""
        return {p.key: p.suggest(trial) for p in self.params}

    def keys(self) -> list[str]:
        """The dotted config keys searched over."""
        return [p.key for p in self.params]

    def to_dict(self) -> dict[str, Any]:
        """The space as plain data in the space-file format (``space.yaml``)."""
        out = {}
        for p in self.params:
            if p.type == "categorical":
                out[p.key] = {"type": p.type, "choices": list(p.choices)}
            else:
                d = {"type": p.type, "low": p.low, "high": p.high, "log": p.log}
                if p.step is not None:
                    d["step"] = p.step
                out[p.key] = d
        return out


def config_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key of a config (mapping fields shown as ``field.<key>``)."""
    cfg = cfg or Config()
    out: list[str] = []

    def walk(obj, prefix):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            elif typing.get_origin(hints[f.name]) is dict:
                out.append(f"{prefix}{f.name}.<key>")
            else:
                out.append(f"{prefix}{f.name}")

    walk(cfg, "")
    return out


def render_value(v: Any) -> str:
    """A value as the YAML text of a ``key=value`` override."""
    if isinstance(v, bool) or v is None:
        return "true" if v is True else "false" if v is False else "null"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (int,)):
        return str(v)
    if isinstance(v, str):
        return yaml.safe_dump(v, default_style='"').strip()
    return yaml.safe_dump(v, default_flow_style=True).strip()


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with each dotted key set to its value."""
    return apply_overrides(cfg, [f"{k}={render_value(v)}" for k, v in params.items()])


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_param(key: str, spec: Any, errors: list[str]) -> Param | None:
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        errors.append(f"{key}: expected a mapping such as {{type: float, low: 0.001, high: 1, "
                      f"log: true}} or a list of choices, got {type(spec).__name__} {spec!r}")
        return None
    kind = spec.get("type")
    kind = _TYPE_ALIASES.get(kind, kind) if isinstance(kind, str) else kind
    if kind not in TYPES:
        errors.append(f"{key}: unknown distribution type {spec.get('type')!r}; valid types: "
                      f"{', '.join(TYPES)}")
        return None
    unknown = sorted(set(spec) - _FIELDS[kind])
    if unknown:
        errors.append(f"{key}: unknown field(s) {', '.join(unknown)} for type {kind}; valid "
                      f"fields: {', '.join(sorted(_FIELDS[kind]))}")
        return None
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            errors.append(f"{key}: categorical needs a non-empty list 'choices', got {choices!r}")
            return None
        bad = [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str)))]
        if bad:
            errors.append(f"{key}: categorical choices must be strings, numbers, booleans or "
                          f"null (Optuna stores nothing else), got {bad!r}")
            return None
        if len(set(map(repr, choices))) != len(choices):
            errors.append(f"{key}: categorical choices repeat: {choices!r}")
            return None
        return Param(key, "categorical", choices=tuple(choices))
    low, high, step = (yaml_float(spec.get(k)) for k in ("low", "high", "step"))
    log = spec.get("log", kind == "log_float")
    if kind == "log_float":
        kind, log = "float", True
    problems = []
    for name, v in (("low", low), ("high", high)):
        if v is None:
            problems.append(f"missing '{name}'")
        elif not _number(v):
            problems.append(f"'{name}' must be a finite number, got {v!r}")
        elif kind == "int" and not (isinstance(v, int) or float(v).is_integer()):
            problems.append(f"'{name}' must be an integer for type int, got {v!r}")
    if not isinstance(log, bool):
        problems.append(f"'log' must be true or false, got {log!r}")
    if step is not None and (not _number(step) or step <= 0):
        problems.append(f"'step' must be a positive number, got {step!r}")
    if problems:
        errors.append(f"{key}: " + "; ".join(problems))
        return None
    if kind == "int":
        low, high = int(low), int(high)
        step = int(step) if step is not None else None
    else:
        low, high = float(low), float(high)
    if not low < high:
        errors.append(f"{key}: empty range: low ({low}) must be smaller than high ({high})")
        return None
    if log and low <= 0:
        errors.append(f"{key}: a log scale needs low > 0, got low={low}")
        return None
    if log and step is not None:
        errors.append(f"{key}: 'step' and 'log' cannot be combined (Optuna)")
        return None
    return Param(key, kind, low, high, bool(log), step)


def _check_config(base: Config, p: Param, errors: list[str]) -> None:
    """Set the key to each probe value and build what can be built without training."""
    import neuralign as na

    from ..data import list_datasets
    from ..models import list_models
    from ..train.build import build_layer_rules, build_rule, check_rates
    from ..train.optim import FEEDBACK_OPTIMIZERS, OPTIMIZERS

    head = p.key.split(".")
    if head[:2] == ["rule", "terms"] and len(head) == 3:
        from ..terms import TERMS

        if head[2] not in TERMS:
            errors.append(f"{p.key}: unknown term {head[2]!r}; valid terms: "
                          f"{', '.join('rule.terms.' + t for t in TERMS)}")
            return
    for v in p.probes():
        try:
            cfg = apply_params(base, {p.key: v})
        except ConfigError as e:
            msg = str(e)
            if "unknown config key" in msg:
                errors.append(f"{p.key}: {msg}. All keys: {', '.join(config_keys())}")
            else:
                errors.append(f"{p.key}: value {v!r} ({p.type}) is not accepted: {msg}")
            return
        try:
            build_layer_rules(cfg.rule, build_rule(cfg.rule))
            check_rates(cfg)
        except (ConfigError, ValueError, TypeError) as e:
            errors.append(f"{p.key}={v!r}: the rule cannot be built: {e}")
            return
        rate = cfg.feedback_optim.rate
        if rate is not None and not 0 < rate <= 1:
            errors.append(f"{p.key}={v!r}: feedback_optim.rate is the fraction of the way to "
                          f"the fixed point per step, in (0, 1]")
            return
        checks = (("data.name", cfg.data.name, list_datasets()),
                  ("model.name", cfg.model.name, list_models()),
                  ("optim.name", cfg.optim.name.lower(), OPTIMIZERS),
                  ("feedback_optim.name", cfg.feedback_optim.name.lower(),
                   FEEDBACK_OPTIMIZERS),
                  ("rule.name", cfg.rule.name, [*na.list_rules(), "custom"]))
        for key, value, valid in checks:
            if p.key == key and value not in valid:
                shown = ", ".join(list(valid)[:30])
                errors.append(f"{p.key}: unknown value {v!r}; valid: {shown}")
                return


def parse_space(data: Any, base: Config, source: str = "space") -> SearchSpace:
    """A :class:`SearchSpace` from plain data, checked against ``base``; raises
    :class:`SpaceError` listing every problem."""
    if not isinstance(data, dict) or not data:
        raise SpaceError(f"{source}: a space is a non-empty mapping of dotted config keys to "
                         f"distributions, e.g. 'rule.terms.amp: {{type: float, low: 0.001, "
                         f"high: 10, log: true}}'; got {data!r}")
    errors: list[str] = []
    params = []
    for key, spec in data.items():
        if not isinstance(key, str) or not key:
            errors.append(f"{key!r}: keys must be dotted config keys such as optim.lr")
            continue
        p = _parse_param(key, spec, errors)
        if p is not None:
            n = len(errors)
            _check_config(base, p, errors)
            if len(errors) == n:
                params.append(p)
    if errors:
        raise SpaceError(f"{source}: invalid search space ({len(errors)} problem"
                         f"{'s' if len(errors) > 1 else ''}):\n  - " + "\n  - ".join(errors)
                         + f"\nValid types: {', '.join(TYPES)} (see docs/protocol.md).")
    return SearchSpace(tuple(params))


def load_space(path: str | Path, base: Config) -> SearchSpace:
    """Read and check a space file."""
    p = Path(path)
    if not p.is_file():
        raise SpaceError(f"space file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"space file {str(p)!r} is not valid YAML: {e}") from None
    if isinstance(data, dict) and set(data) == {"space"}:
        data = data["space"]
    return parse_space(data, base, str(p))
