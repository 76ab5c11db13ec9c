"""Building a training run from its config: each step one function, so that the trainer
itself is the loop (``Trainer.__init__`` calls these in order)."""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

import neuralign as na

from ..data import DataBundle, DataInfo, build_data
from ..models import build_model
from ..terms import TERMS
from . import distributed
from .config import (
    RULE_SHORTHANDS,
    Config,
    ConfigError,
    LayerRuleConfig,
    RuleConfig,
    TrainConfig,
    check_ranges,
    check_run_name,
    layer_rule_config,
)
from .events import Callback
from .optim import (
    build_feedback_optimizer,
    build_joint_optimizer,
    build_optimizer,
    build_schedule,
)

log = logging.getLogger(__name__)

__all__ = ["build_rule", "rule_overrides", "build_layer_rules", "device_from", "setup_process",
           "build_data_for", "build_network", "build_optimizers", "check_rates",
           "wrap_distributed", "build_schedules", "describe", "layer_rates", "standard_callbacks"]


def build_rule(cfg: LayerRuleConfig, base: na.Rule | None = None, key: str = "rule"
               ) -> na.Rule:
    """The :class:`neuralign.Rule` of a rule config: the catalog entry ``cfg.name`` with every
    field the config sets over it (:func:`neuralign.get_rule`). ``name: custom`` starts from no
    rule (the fields set make it); a ``rule.layers`` entry without a name starts from ``base``,
    the run's rule. A catalog entry with ``convention: paper`` starts from the authors'
    coefficients (``get_rule(name, convention="paper")``). ``key`` names the config section in
    errors."""
    unknown = [t for t in cfg.terms if t not in TERMS]
    if unknown:
        raise ConfigError(f"{key}.terms: unknown term {unknown[0]!r}; valid terms: "
                          f"{', '.join(TERMS)}")
    try:
        if cfg.name == "custom":
            if not (cfg.terms or cfg.kp or cfg.kind not in (None, "learned")):
                raise ConfigError(f"{key}.name=custom needs {key}.terms, e.g. "
                                  f"{key}.terms={{amp: 1.0, null: 1.0, decay: 1.0}}")
            return na.Rule(name="custom", **rule_overrides(cfg, None, key))
        if cfg.name is None and base is not None:
            return na.get_rule(base, **rule_overrides(cfg, base, key))
        if cfg.name not in na.list_rules():
            raise ConfigError(f"unknown {key}.name {cfg.name!r}; valid: "
                              f"{', '.join(na.list_rules())}, custom")
        # (a named rule under the paper's convention starts from the authors' coefficients)
        start = na.get_rule(cfg.name, **({"convention": cfg.convention} if cfg.convention
                                          else {}))
        return na.get_rule(start, **rule_overrides(cfg, start, key))
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{key}: {e}") from None


def rule_overrides(cfg: LayerRuleConfig, start: na.Rule | None, key: str = "rule"
                   ) -> dict[str, Any]:
    """The fields of :class:`neuralign.Rule` that ``cfg`` sets, as overrides of ``start``'s
    (None: a rule of its own): a section's fields set go over ``start``'s value (mirror noise,
    weight estimate), a mapping's entries over its entries (terms), any other value set
    replaces it; None leaves ``start``'s own."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(na.Rule):
        if f.name == "name":  # the rule's label: the catalog entry's, or custom
            continue
        value, own = getattr(cfg, f.name), getattr(start, f.name, None)
        if dataclasses.is_dataclass(value):
            given = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
            given.update(_shorthands(cfg, f.name, given, key))
            if given:
                out[f.name] = {**(dataclasses.asdict(own) if own is not None else {}), **given}
        elif isinstance(value, Mapping):
            if value:
                out[f.name] = {**(own or {}), **value}
        elif value is not None:
            out[f.name] = value
    return out


def _shorthands(cfg: LayerRuleConfig, section: str, given: dict[str, Any], key: str
                ) -> dict[str, Any]:
    """The fields of ``section`` that shorthand keys set (``noise_std``: ``noise.std``)."""
    out = {}
    for short, (where, sub) in RULE_SHORTHANDS.items():
        value = getattr(cfg, short)
        if where == section and value is not None:
            if sub in given:
                raise ConfigError(f"{key}.{short} is short for {key}.{where}.{sub}, and both "
                                  f"are set: set one")
            out[sub] = value
    return out


def build_layer_rules(cfg: RuleConfig, rule: na.Rule) -> dict[str, na.Rule]:
    """The rule of each ``rule.layers`` glob: a catalog name, or a mapping of rule keys built as
    :func:`build_rule` builds ``rule`` (without a ``name``: ``rule``, the run's, with its
    changes)."""
    return {glob: build_rule(layer_rule_config(entry, f"rule.layers.{glob}"), rule,
                             f"rule.layers.{glob}")
            for glob, entry in cfg.layers.items()}


def device_from(name: str) -> torch.device:
    """The device ``train.device`` names (``auto``: CUDA when available, else the CPU); a
    :class:`ConfigError` for a device that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    # (torch knows more device types, e.g. meta, which holds no data: none of them trains)
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"train.device={name!r} is not a device to train on; valid: auto, "
                          f"cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"train.device={name!r}, but CUDA is not available on this "
                              f"machine; use train.device=cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"train.device={name!r}, but this machine has {count} CUDA "
                              f"device(s): cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name!r}, but MPS is not available on this machine; "
                          f"use train.device=cpu (or auto)")
    return device


def setup_process(cfg: Config, run_dir: str | Path | None) -> tuple[int, int, torch.device, Path]:
    """Join the process group under torchrun, name the run, pick the device; checks the
    settings that depend on them. Returns ``(rank, world_size, device, run_dir)``."""
    tc = cfg.train
    check_ranges(cfg)  # (a file's or an override's values were checked as they were set)
    distributed.init()  # under torchrun: one process of several (DDP)
    if not tc.name:  # (rank 0's clock names the run on every rank)
        tc.name = f"{cfg.data.name}-{cfg.model.name}-{cfg.rule.name}-{distributed.timestamp()}"
    if run_dir is None:
        check_run_name(tc.name)
    folder = Path(run_dir) if run_dir is not None else Path(tc.runs_dir) / tc.name
    rank, world = distributed.rank(), distributed.world_size()
    device = distributed.local_device(device_from(tc.device))
    if world > 1 and cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size is the global batch, split over the {world} "
                          f"processes: it must be a multiple of {world}, got "
                          f"{cfg.data.batch_size}")
    if tc.sync_batchnorm and world > 1 and device.type != "cuda":
        raise ConfigError("train.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm has "
                          "no CPU kernels); on CPU leave it false")
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return rank, world, device, folder


def build_data_for(cfg: Config, device: torch.device, rank: int, world: int,
                   data: DataBundle | None = None) -> DataBundle:
    """The run's data (``data`` if prebuilt), this process's share of it, on its device."""
    data = data if data is not None else build_data(cfg.data, pin_memory=device.type == "cuda")
    if world > 1:
        data.shard(rank, world)
    if device.type == "cuda":
        for loader in (data.train, data.val, data.test):
            if hasattr(loader, "to"):
                loader.to(device)
    return data


def build_network(cfg: Config, rule: na.Rule, info: DataInfo, device: torch.device,
                  layer_rules: Mapping[str, na.Rule] | None = None) -> torch.nn.Module:
    """The model for the data, converted with the rule and its per-layer exceptions
    (``layer_rules``; default :func:`build_layer_rules` of ``cfg.rule``)."""
    if layer_rules is None:
        layer_rules = build_layer_rules(cfg.rule, rule)
    plain = build_model(cfg.model, info.input_shape, info.num_classes)
    model = na.convert(plain, rule, layer_rules=dict(layer_rules),
                       on_unsupported=cfg.rule.on_unsupported, points=cfg.rule.points,
                       error_at=cfg.rule.error_at or None).to(device)
    # a converted layer whose weight the model reads itself still trains by backprop: say so
    # (one forward in training mode, as the run will call it; random streams and buffers such
    # as batch norm's running statistics are left as they were)
    x = torch.zeros(2, *info.input_shape, device=device, dtype=info.dtype)
    buffers = [b.clone() for b in model.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        bypassed = na.bypassed_layers(model, lambda: model(x))
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers, strict=True):
            b.copy_(saved)
    if bypassed:
        log.warning("%d converted layer(s) never run their own forward: the model reads their "
                    "weights itself, so their errors go down through W (backprop): %s",
                    len(bypassed), ", ".join(bypassed))
    return model


def build_optimizers(model: torch.nn.Module, cfg: Config, generator: torch.Generator
                     ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """The forward weights' optimizer, and the feedback weights' (the rules' recipe by
    default; None without learned feedback weights). With ``feedback_optim.name: joint`` the
    first is W's and F's together (F its second parameter group, with
    ``feedback_optim.weight_decay``), and the second None. The :class:`Trainer` calls
    :func:`check_rates` first."""
    name = cfg.feedback_optim.name.lower()
    estimated = [n or "(the model)" for n, layer in na.feedback_layers(model)
                 if layer.rule.learns and layer.rule.estimate is not None]
    if estimated and name != "recipe":
        raise ConfigError(
            f"rule.estimate ({', '.join(estimated[:3])}{' ...' if len(estimated) > 3 else ''}):"
            f" the weight estimation phases run in the feedback recipe's step, and with "
            f"feedback_optim.name={name} the self term would read an estimate that is never "
            f"made; use feedback_optim.name=recipe, or no rule.estimate")
    if name == "joint":
        return build_joint_optimizer(model, cfg.optim, cfg.feedback_optim.weight_decay), None
    optimizer = build_optimizer(na.param_groups(model)["forward"], cfg.optim, "optim")
    try:
        feedback = build_feedback_optimizer(model, cfg.feedback_optim, generator)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return optimizer, feedback


def check_rates(cfg: Config) -> None:
    """A :class:`ConfigError` for rates that contradict each other: ``feedback_optim.rate`` is
    one rate for every layer, over the rules' own, so it excludes ``rule.rate`` and the
    ``rule.layers`` entries' rates; a torch optimizer on F reads none of them; and ``joint``
    trains F with the forward optimizer's own settings (``optim``), so it reads none of
    ``feedback_optim``'s but ``weight_decay``."""
    rates = (["rule.rate"] if cfg.rule.rate is not None else []) + [
        f"rule.layers.{glob}.rate" for glob, entry in cfg.rule.layers.items()
        if isinstance(entry, Mapping) and entry.get("rate") is not None]
    name = cfg.feedback_optim.name.lower()
    if name == "joint":
        _check_joint(cfg, rates)
    if not rates:
        return
    if name != "recipe":
        raise ConfigError(f"{', '.join(rates)}: a rule's rate is the recipe's; with "
                          f"feedback_optim.name={name} set feedback_optim.lr instead")
    if cfg.feedback_optim.rate is not None:
        raise ConfigError(f"feedback_optim.rate sets every layer's rate, over the rules' own, "
                          f"and {', '.join(rates)} set(s) rules' own: set feedback_optim.rate "
                          f"alone for one rate everywhere, or rule.rate and the layers' rates "
                          f"alone for each layer its own")


def _check_joint(cfg: Config, rates: list[str]) -> None:
    """With ``feedback_optim.name: joint`` F moves by the forward optimizer: a
    :class:`ConfigError` naming the keys set that it would ignore (``feedback_optim``'s
    keys changed from their defaults, but ``weight_decay``; the rules' rates)."""
    from .config import FeedbackOptimConfig

    default = FeedbackOptimConfig(name="joint")
    ignored = [f"feedback_optim.{f.name}" for f in dataclasses.fields(default)
               if f.name != "weight_decay"
               and getattr(cfg.feedback_optim, f.name) != getattr(default, f.name)]
    if ignored or rates:
        raise ConfigError(
            f"{', '.join(ignored + rates)}: with feedback_optim.name=joint F is trained by the "
            f"forward optimizer, with its learning rate, momentum and schedule (optim.lr, "
            f"optim.momentum, optim.schedule, ...); feedback_optim.weight_decay is the one "
            f"feedback_optim key it reads (F's weight decay, default 0)")


def wrap_distributed(model: torch.nn.Module, cfg: Config, device: torch.device, rank: int,
                     world: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(model, net)``: the module that trains is DDP around the model when distributed (the
    model itself, with its plain state-dict keys, is what metrics and checkpoints use)."""
    if world == 1:
        return model, model
    from torch.nn.parallel import DistributedDataParallel

    if cfg.train.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Parameters and buffers are identical already (same seed); DDP broadcasts rank 0's anyway.
    # Every learned F that needs a gradient gets one from each backward; the others (the
    # recipe's sa, kp) do not require grad, and fixed or derived feedback are buffers: no
    # find_unused_parameters.
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # mirror noise (and brSF's magnitudes, CPU augmentation) independent per rank
    if rank > 0:
        torch.manual_seed(distributed.rank_seed(cfg.train.seed, rank))
    return model, net


def compile_network(net: torch.nn.Module, backend: str) -> Callable[..., Any]:
    """``net`` under ``torch.compile`` with ``backend`` (``train.compile``), or as it is when
    the backend is empty; a :class:`ConfigError` for a backend torch does not have."""
    if not backend:
        return net
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"train.compile={backend!r} is not a torch.compile backend; valid: "
                          f"'' (off), aot_eager, {', '.join(torch._dynamo.list_backends())}")

    # dynamo keys its caches on code objects, and all models of a class share their forward's:
    # one run's graphs would count against the next run's recompile limit (a comparison
    # trains every rule in one process, and from the ninth on they ran eager). A code object
    # of this run's own keeps its cache to itself.
    def call(*args):
        return net(*args)

    own = types.FunctionType(call.__code__.replace(), call.__globals__, closure=call.__closure__)
    return torch.compile(own, backend=backend)


def build_schedules(optimizer: torch.optim.Optimizer, feedback: torch.optim.Optimizer | None,
                    cfg: Config, steps_per_epoch: int) -> tuple[Any, Any]:
    """The learning-rate schedules of both optimizers (the feedback one None without F)."""
    epochs = cfg.train.epochs
    try:
        schedule = build_schedule(optimizer, cfg.optim.schedule, steps_per_epoch, epochs,
                                  "optim.schedule")
        feedback_schedule = (build_schedule(feedback, cfg.feedback_optim.schedule,
                                            steps_per_epoch, epochs, "feedback_optim.schedule")
                             if feedback is not None else None)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return schedule, feedback_schedule


def describe(cfg: Config, model: torch.nn.Module, rule: na.Rule,
             feedback: torch.optim.Optimizer | None, device: torch.device) -> list[str]:
    """What was built, in a line or two (the trainer logs them)."""
    groups = na.param_groups(model)
    layers = sum(1 for _ in na.feedback_layers(model))
    points = sum(1 for _ in na.feedback_points(model))
    lines = [f"model {cfg.model.name}, rule {rule.name}: {layers} feedback layers, "
             f"{f'{points} dfa feedback points, ' if points else ''}"
             f"{sum(p.numel() for p in groups['forward'])} forward and "
             f"{sum(p.numel() for p in groups['feedback'])} learned feedback parameters, "
             f"device {device}"]
    if isinstance(feedback, na.FeedbackOptimizer):
        lines.append("feedback weights: the rules' recipe (neuralign.feedback_optimizer), "
                     + layer_rates(feedback))
    elif feedback is not None:
        lines.append(f"feedback weights: {cfg.feedback_optim.name}, lr "
                     f"{cfg.feedback_optim.lr:g}")
    elif groups["feedback"] and cfg.feedback_optim.name.lower() == "joint":
        lines.append(f"feedback weights: joint, a second parameter group of the forward "
                     f"optimizer ({cfg.optim.name}, lr {cfg.optim.lr:g}, weight decay "
                     f"{cfg.feedback_optim.weight_decay:g})")
    return lines


def layer_rates(feedback: torch.optim.Optimizer) -> str:
    """The rate of each layer of the recipe, one entry per distinct rate: ``rate 0.1`` when
    every layer has it, else ``rate 0.1: conv1, conv2; rate 0.3: fc``."""
    layers: dict[float, list[str]] = {}
    for g in feedback.param_groups:
        if g["params"]:
            layers.setdefault(g["lr"], []).append(g.get("layer") or "(the model)")
    if len(layers) == 1:
        return f"rate {next(iter(layers)):g}"
    return "; ".join(f"rate {r:g}: {', '.join(names)}" for r, names in sorted(layers.items()))


def standard_callbacks(tc: TrainConfig, is_main: bool, quiet: bool = False) -> list[Callback]:
    """The callbacks a run's config asks for; a process other than rank 0 only takes part in
    the checkpoint (its RNG states), rank 0 writes."""
    from .callbacks import Checkpointer, default_callbacks

    return default_callbacks(tc, epoch_lines=not quiet) if is_main else [
        Checkpointer(tc.checkpoint_every)]
