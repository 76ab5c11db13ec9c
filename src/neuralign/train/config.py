"""Run configuration: a dataclass per component, a YAML overlay, dotted ``key=value`` overrides.

A configuration is built in three layers: the dataclass defaults, then a YAML file (any subset of
the keys, nested as in :class:`Config`), then command-line overrides such as ``optim.lr=0.1`` or
``optim.schedule.milestones=[30,60,80]`` (values are parsed as YAML; a text key such as
``train.name`` takes the text itself unless quoted). Unknown keys, values of the wrong type and
numbers outside their key's range (:data:`RANGES`) are rejected with a :class:`ConfigError`
that names the key and lists the valid keys or values. Keys of a
mapping field (``rule.layers``, ``rule.terms``, ``model.kwargs``) are free: everything after the
field's name is the key, so ``rule.layers.layer1.*=bp`` sets the glob ``layer1.*``. A section set
to ``null`` goes back to its defaults.

The ``rule`` section is derived from :class:`neuralign.Rule` itself (:class:`RuleConfig`): every
field of a rule is a key, its nested mirror noise and weight estimate are sections of their own.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import DataConfig
from ..models import ModelConfig
from ..rules import Rule

__all__ = [
    "Config",
    "ConfigError",
    "FeedbackOptimConfig",
    "LayerRuleConfig",
    "OptimConfig",
    "RuleConfig",
    "ScheduleConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "check_run_name",
    "check_ranges",
    "Range",
    "RANGES",
    "save_config",
    "config_to_yaml",
    "layer_rule_config",
    "RULE_SHORTHANDS",
]


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type."""


def _config_fields(cls: type, skip: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """``(name, type, field)`` in a config for each field of the dataclass ``cls``: a nested
    dataclass (the rule's mirror noise, its weight estimate) becomes a section of its own
    fields; a mapping (the rule's terms) a dict, whose entries go over the rule's own; any other
    field takes its type or None, which keeps the rule's own value."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        nested = [a for a in typing.get_args(tp) or (tp,) if dataclasses.is_dataclass(a)]
        if nested:
            section = _section(nested[0])
            out.append((f.name, section, field(default_factory=section)))
        elif typing.get_origin(tp) is Mapping:
            out.append((f.name, dict[typing.get_args(tp)], field(default_factory=dict)))
        else:
            out.append((f.name, tp | None, field(default=None)))
    return out


@functools.cache
def _section(cls: type) -> type:
    """The config section of a rule's nested dataclass: its fields, each None by default (the
    rule's own value). A single value instead of a mapping sets its first field, as
    ``rule.estimate=rdd`` sets ``rule.estimate.method``."""
    fields = _config_fields(cls)
    section = dataclasses.make_dataclass(f"{cls.__name__}Config", fields, namespace={
        "__doc__": f"The fields of :class:`neuralign.rules.{cls.__name__}`, each None for the "
                   f"rule's own value.",
        "_scalar": fields[0][0]})
    return section


def _with_rule_fields(cls: type) -> type:
    """``cls`` as a dataclass: its ``name``, then a field for every field of
    :class:`neuralign.Rule` (the rule's label, ``name``, aside), then its other fields."""
    derived = _config_fields(Rule, skip=("name",))
    for name, _, default in derived:
        setattr(cls, name, default)
    own = dict(cls.__annotations__)
    cls.__annotations__ = {"name": own.pop("name"), **{n: tp for n, tp, _ in derived}, **own}
    return dataclass(cls)


#: Shorthand rule keys (from before the rule's sections): key -> (section, its field).
RULE_SHORTHANDS = {"noise_std": ("noise", "std"), "noise_dist": ("noise", "dist")}


@_with_rule_fields
class LayerRuleConfig:
    """A rule in the config: a catalog entry and every field of :class:`neuralign.Rule` over it.

    The fields after ``name`` are :class:`neuralign.Rule`'s own, generated from it (a field added
    to ``Rule`` is a config key with no edit here); each is None by default, which keeps the
    catalog entry's value.

    Attributes:
        name: the catalog rule to start from (``neuralign.list_rules()``), or ``custom`` (none:
            the rule is made of the fields set, ``terms`` at least). In a ``rule.layers``
            entry, None (left out) starts from the run's rule, with its overrides.
        terms: term coefficients over the rule's own (``decay``, ``amp``, ``null``, ``sparse``,
            ``self``; 0 removes a term).
        kind: how F comes about: ``learned``, ``fixed``, ``usf``, ``brsf``, ``frsf``, ``dfa``,
            ``bp``.
        kp: add W's task gradient to F's (Kolen-Pollack's switch).
        noise: mirror noise, a section: ``dist`` (``normal`` or ``uniform``), ``std``.
        update_noise: standard deviation σ of the update noise, in ``update_noise_units``.
        update_noise_units: ``gradient`` (``F += lr_F · N(0, σ²)``, the step size scaling it)
            or ``weight`` (``F += σ · rms(W) · N(0, 1)`` each step: σ relative to W's entries).
        normalize: rescale F after each step to its initial norm (true) or to this norm.
        init: initialisation of F: ``default``, ``kaiming_uniform``, ``kaiming_normal``,
            ``xavier_uniform``, ``xavier_normal``, ``uniform`` (U[-1, 1], no fan scaling) or
            ``weight`` (F starts equal to W).
        rate: the recipe's rate, the fraction of the way to the rule's fixed point per step, in
            (0, 1] (``feedback_optim.rate`` overrides every layer's; see docs/cli.md).
        estimate: where the self term's W comes from, a section of
            :class:`neuralign.rules.WeightEstimate`'s fields (``method``: ``exact``, ``rdd`` or
            ``perturb``; ``samples``, ``every``, ...); ``rule.estimate=rdd`` is short for
            ``rule.estimate.method=rdd``.
        dfa_scale: dfa only: ``mean`` (each of an input's P positions gets ``D e / P``, the
            default) or ``broadcast`` (``D e`` at every position, BioTorch's form).
        noise_std: short for ``noise.std`` (mirror-noise standard deviation).
        noise_dist: short for ``noise.dist`` (mirror-noise distribution).

    ``None`` keeps the rule's own default; a section given ``null`` goes back to its defaults.
    """

    name: str | None = None
    noise_std: float | None = None
    noise_dist: str | None = None


@dataclass
class RuleConfig(LayerRuleConfig):
    """The learning rule (every key of :class:`LayerRuleConfig`) and its per-layer exceptions.

    Attributes:
        name: a rule of ``neuralign.list_rules()``, or ``custom``.
        layers: module-name glob -> the rule of the layers it matches (the last matching glob
            wins): a catalog name (``{fc: bp}`` keeps the read-out exact), or a mapping of the
            keys of :class:`LayerRuleConfig` (``{fc: {name: sa, rate: 0.3}}``; without a
            ``name``, the run's rule with these changes: ``{fc: {rate: 0.3}}``).
        on_unsupported: what ``convert`` does with layer types it cannot convert:
            ``warn``, ``ignore`` or ``raise``.
        points: dfa only: module-name globs whose outputs become feedback points (Launay et
            al. 2020's DFA at block outputs, backprop inside the blocks; ``convert``'s
            ``points``), e.g. ``[layers.0, layers.1]``.
        error_at: dfa only: the module (the read-out) at whose input dfa's error is taken,
            instead of at the model's output (``convert``'s ``error_at``); empty: the output.
    """

    name: str = "ia"
    # (a mapping entry is checked against LayerRuleConfig's keys and kept as the data it sets)
    layers: dict[str, str | LayerRuleConfig] = field(default_factory=dict)
    on_unsupported: str = "warn"
    points: list[str] = field(default_factory=list)
    error_at: str = ""


def layer_rule_config(entry: str | dict[str, Any], key: str = "rule.layers") -> LayerRuleConfig:
    """The :class:`LayerRuleConfig` of a ``rule.layers`` entry (a rule name, or a mapping of
    rule keys)."""
    cfg = LayerRuleConfig()
    _merge(cfg, {"name": entry} if isinstance(entry, str) else entry, f"{key}.")
    return cfg


@dataclass
class ScheduleConfig:
    """A learning-rate schedule, evaluated at every step as a factor of the base rate.

    Attributes:
        name: ``constant``, ``step`` (×gamma at each milestone epoch) or ``cosine`` (to
            ``min_factor`` at the last epoch).
        warmup_epochs: linear warm-up from ``1/steps`` of the rate to the full rate over this
            many epochs (fractions allowed), before the schedule proper.
        milestones: ``step``: epochs at which the rate is multiplied by ``gamma``.
        gamma: ``step``: the factor.
        min_factor: ``cosine``: final rate as a fraction of the base rate.
    """

    name: str = "constant"
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    min_factor: float = 0.0


@dataclass
class OptimConfig:
    """An optimizer (``sgd``, ``adam``, ``adamw``) and its schedule.

    The defaults (Adam, 3e-3) are the default MNIST-1D run's forward optimizer. ``momentum``
    and ``nesterov`` apply to SGD, ``betas`` and ``eps`` to Adam(W). ``weight_decay`` applies to
    the parameters this optimizer owns only.
    """

    name: str = "adam"
    lr: float = 0.003
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class FeedbackOptimConfig(OptimConfig):
    """How the learned feedback weights move.

    ``recipe`` (the default) is the rules' own update recipe, ``neuralign.feedback_optimizer``:
    a normalised step that moves each F a fraction ``rate`` of the way to its rule's fixed point
    per step (default: each rule's own ``rate``), with update noise and normalisation included,
    whatever optimizer trains W; ``lr``, ``momentum``, ``betas`` and ``weight_decay`` do not
    apply to it, ``schedule`` scales the rate. ``sgd``, ``adam`` or ``adamw`` train F with that
    torch optimizer on the rule's gradient instead (the forward optimizer's fields). ``joint``
    trains F with the forward optimizer itself (``optim``: its name, lr, momentum, nesterov and
    schedule), in the same step, as its second parameter group, on the rule's gradient: the
    authors' dynamics. ``weight_decay`` is then F's own weight decay (default 0: decay on the
    forward weights only) and the one key of this section it reads; setting any other (or a
    rule's ``rate``) is an error.
    """

    name: str = "recipe"
    rate: float | None = None


@dataclass
class TrainConfig:
    """The training loop and the run folder.

    Attributes:
        name: run name; the run folder is ``runs_dir/name`` (empty: data-model-rule-time).
        runs_dir: parent folder of run folders.
        epochs: training epochs.
        seed: seed of the model's initialisation, of the data order and of all noise.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` …
        checkpoint_every: write ``checkpoints/last.pt`` every this many epochs (0: only at the
            end); the last epoch is always written.
        angle_every: measure local gradient angles and the end-to-end angle with backprop every
            this many steps (0: never).
        report: at the start of a run, log :func:`neuralign.report` on the first test batch
            (per layer: rule, whether the error went through F, angles, lag, bypassed and
            unconverted layers) and write it to ``report.txt`` in the run folder.
        progress: show a progress bar per epoch (stderr).
        tensorboard: write TensorBoard events to the run folder.
        plots: write PNG plots at the end.
        deterministic: ask torch for deterministic algorithms (slower on GPU).
        overwrite: reuse an existing run folder of the same name (its files are replaced).
        sync_batchnorm: under torchrun on GPUs, BatchNorm statistics over the global batch
            (``torch.nn.SyncBatchNorm``) instead of each process's share.
        compile: ``torch.compile`` the training forward and backward with this backend
            (``inductor``, torch's default; ``aot_eager``, no code generation; empty: off).
            The optimizer steps, evaluation and metrics stay eager. The random draws are the
            eager ones: with ``aot_eager`` a seed gives exactly the eager run; inductor's
            fused kernels round differently.
    """

    name: str = ""
    runs_dir: str = "runs"
    epochs: int = 100
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 1
    angle_every: int = 20
    report: bool = False
    progress: bool = True
    tensorboard: bool = True
    plots: bool = True
    deterministic: bool = False
    overwrite: bool = False
    sync_batchnorm: bool = False
    compile: str = ""


@dataclass
class Config:
    """Everything a run needs; the resolved copy is saved as ``runs/<name>/config.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    feedback_optim: FeedbackOptimConfig = field(default_factory=FeedbackOptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# valid ranges


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: finite numbers from ``low`` to ``high`` (None: no
    bound), each bound included unless ``low_open`` / ``high_open``. A list key's range
    applies to each item."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v: float) -> bool:
        return (isinstance(v, int) or math.isfinite(v)) and (
            self.low is None or v > self.low or (v == self.low and not self.low_open)) and (
            self.high is None or v < self.high or (v == self.high and not self.high_open))

    def describe(self, integer: bool) -> str:
        """``>= 1``, ``in [0, 1)``, ``a finite number > 0``, as the error says it."""
        lo, hi = _bound(self.low), _bound(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        finite = "" if integer else "a finite number "
        if self.low is not None:
            return f"{finite}{'>' if self.low_open else '>='} {lo}"
        return f"{finite}{'<' if self.high_open else '<='} {hi}"


def _bound(x: float | None) -> str:
    return "" if x is None else "2**63" if x == 2**63 else f"{x:g}"


#: Seeds: what torch's generators take, with room for the offsets added to them.
SEED = Range(0, 2**63, high_open=True)

#: The valid range of every numeric key, by config section; a subclass's section inherits its
#: parent's. The rule's keys are the fields of :class:`neuralign.Rule`, which checks them
#: itself.
RANGES: dict[type, dict[str, Range]] = {
    DataConfig: {"batch_size": Range(1), "eval_batch_size": Range(1),
                 "val_split": Range(0, 1, high_open=True), "workers": Range(0),
                 "num_samples": Range(0), "shape": Range(1), "num_classes": Range(2),
                 "seed": SEED},
    ModelConfig: {"widths": Range(1), "channels": Range(1)},
    ScheduleConfig: {"warmup_epochs": Range(0), "milestones": Range(0),
                     "gamma": Range(0, low_open=True), "min_factor": Range(0, 1)},
    OptimConfig: {"lr": Range(0), "momentum": Range(0, 1, high_open=True),
                  "weight_decay": Range(0), "betas": Range(0, 1, high_open=True),
                  "eps": Range(0, low_open=True)},
    FeedbackOptimConfig: {"rate": Range(0, 1, low_open=True)},
    TrainConfig: {"epochs": Range(1), "seed": SEED, "checkpoint_every": Range(0),
                  "angle_every": Range(0)},
}


def _range_of(obj: Any, name: str) -> Range | None:
    for cls in type(obj).__mro__:
        if name in RANGES.get(cls, {}):
            return RANGES[cls][name]
    return None


def _check_range(obj: Any, name: str, value: Any, key: str) -> None:
    """A :class:`ConfigError` naming ``key`` and its range when ``value`` (or an item of it)
    is out of the range of field ``name`` of ``obj``."""
    valid = _range_of(obj, name)
    if valid is None or value is None:
        return
    items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
    for i, v in items:
        if v not in valid:
            at = key if i is None else f"{key}[{i}]"
            raise ConfigError(f"{at} must be {valid.describe(isinstance(v, int))}, got {v!r}")


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """A :class:`ConfigError` for the first value of ``cfg`` (a :class:`Config` or one of its
    sections) outside its key's range (:data:`RANGES`). Values set from files and overrides
    are checked as they are set; the trainer checks the whole config again, for values set
    in Python."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{prefix}{f.name}.")
        else:
            _check_range(cfg, f.name, value, f"{prefix}{f.name}")


# ---------------------------------------------------------------------------------------------
# typed merge


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def yaml_float(value: Any) -> Any:
    """``value`` as a float when it is a string a float reads (YAML 1.1 reads ``1e-3``, with
    no dot, as a string), else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _check(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to ``tp`` (int -> float, number -> str), or a ConfigError."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if sections and isinstance(value, dict):  # (its own errors name the valid keys)
            return _check(value, sections[0], key)
        # bool before float: YAML's true must stay a bool for `bool | float`.
        for a in sorted(args, key=lambda a: a is not bool and a is not type(None)):
            try:
                return _check(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} "
                          f"{value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)} (e.g. [1, 2]), got "
                              f"{type(value).__name__} {value!r}")
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        # YAML reads a key written `null` (the term's name) as None: give it its name back
        return {("null" if k is None else str(k)): _check(v, vt, f"{key}.{k}")
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        # a section inside a mapping (a rule.layers entry): checked against the section's keys,
        # kept as the plain data of what it sets
        section = tp()
        _merge(section, value, f"{key}.")
        return _given(dataclasses.asdict(section))
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{key}: {value} is too large for a float") from None
        value = yaml_float(value)
        if isinstance(value, float):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _given(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without its None values and empty mappings (what a section leaves at its
    defaults)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _given(v)
        if v is not None and v != {}:
            out[k] = v
    return out


def _fields(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _unknown(key: str, prefix: str, obj: Any) -> ConfigError:
    valid = ", ".join(f"{prefix}{k}" for k in _fields(obj))
    where = f" in section {prefix.rstrip('.')!r}" if prefix else ""
    return ConfigError(f"unknown config key {key!r}{where}; valid keys: {valid}")


def _merge(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got "
                          f"{type(data).__name__} {data!r}")
    fields = _fields(obj)
    for k, v in data.items():
        if k not in fields:
            raise _unknown(f"{prefix}{k}", prefix, obj)
        _set(obj, k, v, f"{prefix}{k}")


def _set(obj: Any, name: str, value: Any, key: str) -> None:
    """Field ``name`` of ``obj`` from plain data: a section merges a mapping (``null``: back to
    its defaults; a single value: its first field, where it takes one); a value is checked."""
    cur = getattr(obj, name)
    if not dataclasses.is_dataclass(cur):
        value = _check(value, _fields(obj)[name], key)
        _check_range(obj, name, value, key)
        setattr(obj, name, value)
    elif value is None:
        setattr(obj, name, type(cur)())
    else:
        scalar = getattr(cur, "_scalar", None)
        if scalar is not None and not isinstance(value, dict):
            value = {scalar: value}
        _merge(cur, value, f"{key}.")


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """A :class:`Config` from nested plain data (as in a YAML file), defaults elsewhere."""
    cfg = Config()
    _merge(cfg, data or {})
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain data (YAML/JSON-safe) of a config."""
    return dataclasses.asdict(cfg)


def _parse_value(text: str) -> tuple[Any, bool]:
    """``text`` read as YAML, and whether it was: text that is not YAML stays text."""
    try:
        return (yaml.safe_load(text) if text.strip() else ""), True
    except yaml.YAMLError:
        return text, False


def _quoted(text: str) -> bool:
    t = text.strip()
    return len(t) >= 2 and t[0] == t[-1] and t[0] in "'\""


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A copy of ``cfg`` with dotted ``key=value`` overrides applied: values parsed as YAML,
    except that a text key (``train.name``, ``data.data_dir``, ...) takes the text as it is
    unless it is quoted (``train.name=yes`` is the name ``yes``, not true)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value "
                              f"(e.g. optim.lr=0.1); sections: "
                              f"{', '.join(_fields(cfg))}")
        value, parsed = _parse_value(text)
        parts = key.split(".")
        obj, prefix = cfg, ""
        for i, part in enumerate(parts):
            fields = _fields(obj)
            if part not in fields:
                raise _unknown(prefix + part, prefix, obj)
            cur = getattr(obj, part)
            last = i == len(parts) - 1
            if last:
                if fields[part] is str and not _quoted(text):
                    value = text  # a text key takes the text itself: --name yes, null, 007
                elif not parsed and text.lstrip()[:1] in ("[", "{"):
                    raise ConfigError(
                        f"{key}={text}: not valid YAML (a list or mapping whose items hold "
                        f"YAML's own characters such as ? or : must quote them, e.g. "
                        f"{key}='[\"layers.?\"]', or use plain names)")
                _set(obj, part, value, prefix + part)
            elif dataclasses.is_dataclass(cur):
                obj, prefix = cur, prefix + part + "."
                continue
            elif typing.get_origin(fields[part]) is dict:
                sub = ".".join(parts[i + 1:])
                _, vt = typing.get_args(fields[part])
                new = dict(cur)
                if value is None:
                    new.pop(sub, None)
                else:
                    new[sub] = _check(value, vt, f"{prefix}{part}.{sub}")
                setattr(obj, part, new)
            else:
                raise ConfigError(f"{prefix}{part} is a value, not a section: "
                                  f"cannot set {key!r}")
            break
    return cfg


def check_run_name(name: str, key: str = "train.name") -> str:
    """``name`` if it names a folder under the runs folder: plain folder names, optionally
    nested with ``/`` (``compare`` puts each rule's run at ``NAME/RULE``); never absolute, never
    ``.`` or ``..``, so that no run can write into another run's folder or the runs folder
    itself, and without control characters (a newline). Else a :class:`ConfigError`."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{key} must be a non-empty folder name, got {name!r}")
    parts = name.split("/")
    bad = [part for part in parts if part in ("", ".", "..") or "\\" in part
           or part != part.strip() or not part.isprintable()]
    if name.startswith("/") or bad:
        raise ConfigError(f"{key}={name!r} is not a folder name under the runs folder: use "
                          f"plain names, nested with '/' if you like (e.g. exp1/sa), without "
                          f"'..', '.', empty or absolute parts, surrounding spaces or control "
                          f"characters (a newline, a tab)")
    return name


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        with open(p) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                where = getattr(e, "problem_mark", None)
                at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
                what = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ConfigError(f"config file {str(p)!r} is not valid YAML{at}: {what}"
                                  ) from None
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{path}: {e}") from None
        raise
    return apply_overrides(cfg, overrides or [])


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists inline (``milestones: [30, 60, 80]``)."""


_Dumper.add_representer(
    list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def config_to_yaml(cfg: Config) -> str:
    """The config as YAML text, in :class:`Config`'s order."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False,
                     default_flow_style=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from ..io import write_text

    write_text(path, config_to_yaml(cfg))
