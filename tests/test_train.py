"""Training engine: config, schedules, checkpoints, exact resume, divergence, run folder."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml

import neuralign as na
import runs
from neuralign.rules import MirrorNoise, WeightEstimate
from neuralign.train import (
    Callback,
    ConfigError,
    DivergenceError,
    Trainer,
    apply_overrides,
    build_rule,
    load_checkpoint,
    load_config,
    save_checkpoint,
)
from neuralign.train.build import build_layer_rules
from neuralign.train.config import (
    Config,
    LayerRuleConfig,
    RuleConfig,
    ScheduleConfig,
    config_from_dict,
    config_to_yaml,
)
from neuralign.train.optim import build_schedule

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    """The shared tiny run (``tests/runs.py``), named ``t``."""
    return runs.tiny(tmp_path, "train.name=t", *extra)


# -- config --------------------------------------------------------------------------------------


def test_defaults_are_the_default_run():
    cfg = Config()
    assert (cfg.data.name, cfg.model.name, cfg.rule.name) == ("mnist1d", "cnn1d", "ia")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_configs_load(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.data.name == raw["data"]["name"] and cfg.model.name == raw["model"]["name"]


def test_example_configs_cover_the_issue():
    names = {p.stem for p in CONFIGS}
    assert {"default", "mnist_mlp", "mnist_lenet", "fashion_mnist_mlp", "fashion_mnist_lenet",
            "cifar10_resnet20", "imagenet_resnet18", "imagenet_resnet50"} <= names
    for depth in (18, 50):
        cfg = load_config(Path(CONFIGS[0]).parent / f"imagenet_resnet{depth}.yaml")
        o = cfg.optim
        assert (o.name, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.9, True, 1e-4)
        assert o.schedule.warmup_epochs == 5 and o.schedule.milestones == [30, 60, 80]
        assert cfg.data.batch_size == 256 and cfg.train.epochs == 90
        assert cfg.feedback_optim.weight_decay == 0.0


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lr: 0.5, schedule: {name: step}}\nrule: {name: kp}\n")
    cfg = load_config(f, ["optim.schedule.milestones=[3, 6]", "rule.layers.layer1.*=bp",
                          "rule.terms.decay=0.01", "rule.normalize=true", "train.name=7"])
    assert cfg.optim.lr == 0.5 and cfg.optim.schedule.name == "step"
    assert cfg.optim.schedule.milestones == [3.0, 6.0]
    assert cfg.rule.name == "kp" and cfg.rule.layers == {"layer1.*": "bp"}
    assert cfg.rule.terms == {"decay": 0.01} and cfg.rule.normalize is True
    assert cfg.train.name == "7"
    # YAML 1.1 reads 1e-3 as a string; a float field takes it as a number
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_the_null_term_survives_yaml(tmp_path):
    # YAML reads a key written `null` as None; the term of that name must come through
    f = tmp_path / "c.yaml"
    f.write_text("rule:\n  name: custom\n  terms: {amp: 1, null: 0.5, decay: 0.1}\n")
    from_file = load_config(f)
    inline = load_config(None, ["rule.name=custom", "rule.terms={amp: 1, null: 0.5, decay: 0.1}"])
    for cfg in (from_file, inline):
        assert cfg.rule.terms == {"amp": 1.0, "null": 0.5, "decay": 0.1}
        assert build_rule(cfg.rule).terms["null"] == 0.5


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'.*valid keys: optim.name, optim.lr"),
    ("foo.bar=1", "unknown config key 'foo'.*valid keys: data, model, rule"),
    ("optim.lr=fast", "optim.lr: expected float, got str 'fast'"),
    ("train.epochs=2.5", "train.epochs: expected int"),
    ("train.progress=3", "train.progress: expected bool"),
    ("data.shape=[3, x]", r"data.shape\[1\]: expected int"),
    ("optim=3", "optim: expected a mapping"),
    ("optim.lr.x=3", "not a section"),
    ("no_equals_sign", "not of the form key=value"),
])
def test_bad_overrides_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [override])


def test_bad_yaml_key_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: {name: mlp, depth: 3}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.depth.*valid keys: model.name"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_do_not_mutate():
    cfg = Config()
    new = apply_overrides(cfg, ["optim.lr=1.0", "rule.layers.fc=bp"])
    assert cfg.optim.lr != 1.0 and cfg.rule.layers == {} and new.rule.layers == {"fc": "bp"}


def test_config_round_trip():
    cfg = apply_overrides(Config(), ["rule.terms.amp=2", "optim.betas=[0.8, 0.9]"])
    from neuralign.train.config import config_to_dict

    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))) == cfg


# -- the rule section, derived from neuralign.Rule -----------------------------------------------

# Rules that between them give every field of Rule (and of its nested dataclasses) a value other
# than its default: a field added to Rule needs a value here, and nothing in the config.
_DONORS = [
    ("sa", na.Rule(terms={"self": 0.5, "amp": 2.0, "decay": 1.5}, kp=True,
                   noise=MirrorNoise("uniform", 0.5), update_noise=0.2,
                   update_noise_units="weight", normalize=3.0, init="xavier_normal", rate=0.25,
                   convention="paper",
                   estimate=WeightEstimate("rdd", samples=40, every=7, noise=0.5, window=0.4,
                                           drive_noise=0.0, unit="lif", steps=5, tau=2.0,
                                           memory=0.5))),
    ("fa", na.Rule(kind="frsf", init="weight", rate=0.7)),
    ("dfa", na.Rule(kind="dfa", init="uniform", dfa_scale="broadcast")),
]


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def test_the_donors_set_every_field_of_rule():
    for f in dataclasses.fields(na.Rule):
        if f.name != "name":
            assert any(getattr(d, f.name) != _default(f) for _, d in _DONORS), (
                f"Rule.{f.name}: give one of _DONORS a value other than its default")
    for cls in (MirrorNoise, WeightEstimate):
        for f in dataclasses.fields(cls):
            assert any(isinstance(getattr(d, n), cls) and getattr(getattr(d, n), f.name)
                       != _default(f) for _, d in _DONORS for n in ("noise", "estimate")), f


def test_the_rule_config_has_every_field_of_rule():
    keys = {f.name for f in dataclasses.fields(RuleConfig)}
    assert {f.name for f in dataclasses.fields(na.Rule)} <= keys
    for name, cls in (("noise", MirrorNoise), ("estimate", WeightEstimate)):
        section = getattr(RuleConfig(), name)
        assert [f.name for f in dataclasses.fields(section)] == \
            [f.name for f in dataclasses.fields(cls)]
    for f in dataclasses.fields(LayerRuleConfig):  # None: the catalog's own
        value = getattr(LayerRuleConfig(), f.name)
        assert value in (None, {}) or not _fields_of_section(value), f.name


def _fields_of_section(section) -> dict:
    return {k: v for k, v in dataclasses.asdict(section).items() if v is not None}


def _fields_of(rule: na.Rule) -> dict:
    d = rule.to_dict()
    del d["name"]
    return d


@pytest.mark.parametrize("start,donor", _DONORS, ids=[d.kind for _, d in _DONORS])
@pytest.mark.parametrize("where", ["yaml", "command line", "layer"])
def test_every_field_of_rule_reaches_the_rule(tmp_path, start, donor, where):
    fields = _fields_of(donor)
    for name in ("custom", start):  # from no rule, and over a catalog entry
        if where == "yaml":
            f = tmp_path / "c.yaml"
            f.write_text(yaml.safe_dump({"rule": {"name": name, **fields}}))
            rule = build_rule(load_config(f).rule)
        elif where == "command line":
            rule = build_rule(load_config(None, [f"rule.name={name}"] + [
                f"rule.{k}={json.dumps(v)}" for k, v in fields.items()]).rule)
        else:  # a rule.layers entry, over the run's rule ia
            cfg = load_config(None, [f"rule.layers.fc={json.dumps({'name': name, **fields})}"])
            rule = build_layer_rules(cfg.rule, build_rule(cfg.rule))["fc"]
        assert _fields_of(rule) == fields and rule.name == name


def test_the_rate_is_a_key_of_the_rule(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rule:\n  name: sa\n  rate: 0.3\n")
    for cfg in (load_config(f), load_config(None, ["rule.name=sa", "rule.rate=0.3"])):
        assert build_rule(cfg.rule).rate == 0.3
    t = Trainer(load_config(f, tiny(tmp_path)))
    assert all(layer.rule.rate == 0.3 for _, layer in na.feedback_layers(t.model))
    assert {g["lr"] for g in t.feedback_optimizer.param_groups} == {0.3}


def test_the_shorthand_and_the_older_forms_still_load(tmp_path):
    rule = build_rule(load_config(None, ["rule.name=wm", "rule.noise_std=0.5",
                                         "rule.noise_dist=uniform"]).rule)
    assert rule.noise == MirrorNoise("uniform", 0.5)
    with pytest.raises(ConfigError, match="rule.noise_std is short for rule.noise.std"):
        build_rule(load_config(None, ["rule.noise_std=0.5", "rule.noise.std=2"]).rule)
    # a run folder's config.yaml from before: estimate a method's name, the shorthand keys
    f = tmp_path / "old.yaml"
    f.write_text("rule: {name: sa, terms: {}, noise_std: null, noise_dist: null, "
                 "update_noise: null, normalize: null, init: null, kp: null, estimate: rdd, "
                 "layers: {fc: bp}, on_unsupported: warn}\n")
    cfg = load_config(f, ["rule.estimate.samples=40"])
    assert build_rule(cfg.rule).estimate == WeightEstimate("rdd", samples=40)
    assert build_rule(apply_overrides(cfg, ["rule.estimate=null"]).rule).estimate is None
    assert cfg.rule.layers == {"fc": "bp"}


def test_a_layer_entry_is_checked_and_kept_as_written(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'rule.layers.fc.rat'.*valid keys: "
                                          r"rule.layers.fc.name, rule.layers.fc.terms"):
        load_config(None, ["rule.layers.fc={rat: 0.3}"])
    with pytest.raises(ConfigError, match="rule.layers.fc.rate: expected float"):
        load_config(None, ["rule.layers.fc={rate: fast}"])
    f = tmp_path / "c.yaml"
    f.write_text("rule:\n  layers:\n    fc: {name: sa, rate: 1, noise: {}}\n    'conv*': fa\n")
    cfg = load_config(f)
    assert cfg.rule.layers == {"fc": {"name": "sa", "rate": 1.0}, "conv*": "fa"}
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg


def test_a_layer_entry_reaches_its_layers_only(tmp_path):
    t = Trainer(load_config(None, tiny(
        tmp_path, "rule.name=sa", "rule.update_noise=0.1",
        "rule.layers.fc={rate: 0.2, terms: {decay: 2}}",
        "rule.layers.conv3={name: wm, noise: {std: 0.5}}")))
    rules = {name: layer.rule for name, layer in na.feedback_layers(t.model)}
    # fc: the run's rule (its update noise kept) with the entry's changes
    assert (rules["fc"].name, rules["fc"].rate, rules["fc"].update_noise) == ("sa", 0.2, 0.1)
    assert dict(rules["fc"].terms) == {"self": 1.0, "decay": 2.0}
    # conv3: wm with its own noise; the run's update noise is sa's, not wm's
    assert rules["conv3"].noise == MirrorNoise("normal", 0.5)
    assert (rules["conv3"].name, rules["conv3"].update_noise) == ("wm", 0.0)
    assert rules["conv1"] == rules["conv2"] == t.rule == na.get_rule("sa", update_noise=0.1)
    rates = {g["layer"]: g["lr"] for g in t.feedback_optimizer.param_groups}
    assert rates == {"conv1": 0.5, "conv2": 0.5, "conv3": 0.1, "fc": 0.2}


def test_feedback_optim_rate_overrides_every_layer_and_excludes_the_rules_rates(tmp_path):
    t = Trainer(load_config(None, tiny(tmp_path, "rule.name=sa", "rule.layers.fc=aa",
                                       "feedback_optim.rate=0.05")))
    assert {g["lr"] for g in t.feedback_optimizer.param_groups} == {0.05}
    for extra, named in ((["rule.rate=0.3"], "rule.rate"),
                         (["rule.layers.fc={rate: 0.3}"], "rule.layers.fc.rate")):
        with pytest.raises(ConfigError, match=f"feedback_optim.rate sets every layer's rate.*"
                                              f"{named}"):
            Trainer(load_config(None, tiny(tmp_path, "feedback_optim.rate=0.05", *extra)))
        with pytest.raises(ConfigError, match=f"{named}: a rule's rate is the recipe's; with "
                                              f"feedback_optim.name=sgd set feedback_optim.lr"):
            Trainer(load_config(None, tiny(tmp_path, "feedback_optim.name=sgd", *extra)))


def test_the_trainer_logs_every_layers_rate(tmp_path, caplog):
    # sa's rate 0.5 on the convolutions, aa's 1 on the read-out
    over = tiny(tmp_path, "rule.name=sa", "rule.layers.fc=aa", "train.epochs=1")
    with caplog.at_level(logging.INFO, logger="neuralign"):
        hist = Trainer(load_config(None, over)).fit()
    assert "rate 0.5: conv1, conv2, conv3; rate 1: fc" in caplog.text
    rates = {k: v for k, v in hist[-1].items() if k.startswith("feedback_lr")}
    assert rates == {"feedback_lr": 0.5, "feedback_lr/conv1": 0.5, "feedback_lr/conv2": 0.5,
                     "feedback_lr/conv3": 0.5, "feedback_lr/fc": 1.0}
    header = (tmp_path / "runs" / "t" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"feedback_lr", "feedback_lr/conv1", "feedback_lr/fc"} <= set(header)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neuralign"):  # one rate: said once
        Trainer(load_config(None, tiny(tmp_path, "rule.name=sa", "rule.rate=0.3")))
    assert "neuralign.feedback_optimizer), rate 0.3\n" in caplog.text


# -- schedules -----------------------------------------------------------------------------------


def _factors(cfg: ScheduleConfig, steps_per_epoch=10, epochs=10):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = build_schedule(opt, cfg, steps_per_epoch, epochs)
    out = []
    for _ in range(steps_per_epoch * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out


def test_step_schedule_with_warmup():
    f = _factors(ScheduleConfig(name="step", warmup_epochs=2, milestones=[5, 8], gamma=0.1))
    assert f[0] == pytest.approx(1 / 20) and f[19] == pytest.approx(1.0)  # linear warm-up
    assert f[20] == f[49] == 1.0
    assert f[50] == pytest.approx(0.1) and f[79] == pytest.approx(0.1)
    assert f[80] == pytest.approx(0.01)


def test_cosine_schedule():
    f = _factors(ScheduleConfig(name="cosine", min_factor=0.0))
    assert f[0] == 1.0 and f[50] == pytest.approx(0.5) and f[-1] < 0.001
    assert all(a >= b for a, b in zip(f, f[1:], strict=False))


def test_unknown_schedule():
    with pytest.raises(ValueError, match="valid: constant, step, cosine"):
        _factors(ScheduleConfig(name="exp"))


# -- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)  # the previous file, whole
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary left behind


def test_checkpoint_holds_everything(tmp_path):
    Trainer(load_config(None, tiny(tmp_path, "rule.name=ia"))).fit()
    state = torch.load(tmp_path / "runs/t/checkpoints/last.pt", weights_only=True)
    assert {"model", "optimizer", "feedback_optimizer", "schedule", "feedback_schedule", "rng",
            "epoch", "step", "history", "config"} <= set(state)
    assert state["epoch"] == 2 and state["step"] == 2 * 6
    assert "conv1.weight" in state["model"] and "conv1.feedback" in state["model"]
    assert len(state["history"]) == 2 and state["config"]["rule"]["name"] == "ia"


# -- exact resume --------------------------------------------------------------------------------


class _Interrupt(Callback):
    """Stops the run like Ctrl-C right after epoch ``after`` (its checkpoint is written)."""

    def __init__(self, after: int):
        self.after = after

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch == self.after:
            raise KeyboardInterrupt


def _comparable(history):
    """A run's history for equality: NaN != NaN, and wall time differs."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v)
             for k, v in h.items() if k != "epoch_time_s"} for h in history]


@pytest.mark.parametrize("rule", ["ia", "dfa"])
def test_a_compiled_run_equals_the_eager_one(tmp_path, rule):
    """train.compile: the training forward and backward under torch.compile (aot_eager here,
    no code generation) give the eager run's weights and metrics exactly: the recipe's
    curvature estimate, the mirror noise and the gradient-angle probe compile without a graph
    break (ia); dfa's first pass breaks the graph (its output's shape unknown), the others
    give e through taps."""
    over = tiny(tmp_path, f"rule.name={rule}")
    eager = Trainer(load_config(None, over + ["train.name=eager"]))
    want = eager.fit()
    torch._dynamo.reset()
    compiled = Trainer(load_config(None, over + ["train.name=compiled",
                                                 "train.compile=aot_eager"]))
    got = compiled.fit()
    a, b = eager.model.state_dict(), compiled.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    assert _comparable(got) == _comparable(want)
    assert not math.isnan(got[-1]["gradient_angle"])  # (the probe recorded, compiled)


def test_each_compiled_run_has_dynamo_caches_of_its_own():
    """dynamo keys its caches on code objects: two runs' compiled steps must not share one,
    or a comparison's ninth rule would hit the recompile limit and run eager."""
    from neuralign.train.build import compile_network

    a, b = (compile_network(torch.nn.Linear(2, 2), "aot_eager") for _ in range(2))
    assert a._torchdynamo_orig_callable.__code__ is not b._torchdynamo_orig_callable.__code__
    assert compile_network(net := torch.nn.Linear(2, 2), "") is net


def test_an_unknown_compile_backend_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"train.compile='nope' .*valid: '' \(off\), "
                                          r"aot_eager, .*inductor"):
        Trainer(load_config(None, tiny(tmp_path, "train.compile=nope")))


@pytest.mark.parametrize("rule,extra", [
    ("ia", ["optim.schedule.name=cosine", "optim.schedule.warmup_epochs=0.5"]),
    ("brsf", []),  # fresh random magnitudes every batch: the RNG state must be restored
    ("dfa", []),  # D is made at the first backward: a fresh model must load it
    # Ŵ and the phase counter live in the checkpoint; phases draw from the restored RNG
    ("sa", ["rule.estimate={method: rdd, samples: 300, every: 3}"]),
    ("wm", ["rule.update_noise=0.1", "optim.name=sgd", "feedback_optim.name=sgd",
            "optim.lr=0.05", "feedback_optim.lr=0.01"]),
    # joint: F's momentum lives in the forward optimizer's state, its update noise at W's rate
    ("ia", ["rule.convention=paper", "rule.update_noise=0.1", "optim.name=sgd",
            "optim.nesterov=true", "optim.lr=0.05", "optim.weight_decay=1e-4",
            "optim.schedule={name: step, warmup_epochs: 0.5, milestones: [1]}",
            "feedback_optim.name=joint"]),
])
def test_resume_equals_uninterrupted(tmp_path, rule, extra):
    over = tiny(tmp_path, f"rule.name={rule}", *extra)  # 2 epochs: cut after the first
    full = Trainer(load_config(None, over + ["train.name=full"]))
    full_hist = full.fit()

    cut = Trainer(load_config(None, over + ["train.name=cut"]), callbacks=[_Interrupt(1)])
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    # the interrupted run differs from the full one so far (the test can fail)
    assert not torch.equal(cut.model.conv1.weight, full.model.conv1.weight)
    # a fresh process would perturb the global RNG: do it here too
    torch.manual_seed(12345)
    resumed = Trainer.from_run(tmp_path / "runs" / "cut")
    assert resumed.epoch == 1
    hist = resumed.fit()

    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _comparable(hist) == _comparable(full_hist)
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k])


def test_resume_can_extend_the_run(tmp_path):
    Trainer(load_config(None, tiny(tmp_path))).fit()
    t = Trainer.from_run("t", ["train.epochs=3"], runs_dir=tmp_path / "runs")
    assert len(t.fit()) == 3


# -- divergence ----------------------------------------------------------------------------------


class _Poison(Callback):
    """Writes NaN into a weight during epoch ``epoch`` (so the next step's loss is NaN)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_step_end(self, trainer, step, loss):
        if step == (self.epoch - 1) * len(trainer.data.train) + 2:
            with torch.no_grad():
                trainer.model.fc.weight.fill_(math.nan)


def test_divergence_stops_and_keeps_last_checkpoint(tmp_path):
    t = Trainer(load_config(None, tiny(tmp_path, "train.epochs=3")), callbacks=[_Poison(2)])
    with pytest.raises(DivergenceError) as e:
        t.fit()
    err = e.value
    ckpt = tmp_path / "runs/t/checkpoints/last.pt"
    assert (err.epoch, err.step) == (2, 9) and err.checkpoint == ckpt
    assert "epoch 2, step 9" in str(err) and str(ckpt) in str(err) and "nan" in str(err)
    state = torch.load(ckpt, weights_only=True)  # intact and loadable
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    model = copy.deepcopy(t.model)  # loads into a model of the same structure
    model.load_state_dict(state["model"])
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.pt"]


def test_divergence_before_any_checkpoint(tmp_path):
    t = Trainer(load_config(None, tiny(tmp_path)), callbacks=[_Poison(1)])
    with pytest.raises(DivergenceError, match="no checkpoint had been written"):
        t.fit()


def test_real_divergence_from_a_huge_learning_rate(tmp_path):
    over = tiny(tmp_path, "rule.name=fa", "optim.name=sgd", "optim.lr=1e12",
                "optim.momentum=0.0")
    with pytest.raises(DivergenceError, match="epoch 1"):
        Trainer(load_config(None, over)).fit()


# -- the run folder and the loop -----------------------------------------------------------------


def test_run_folder(tmp_path):
    over = tiny(tmp_path, "train.tensorboard=true", "train.plots=true", "data.val_split=0.2")
    hist = Trainer(load_config(None, over)).fit()
    run = tmp_path / "runs" / "t"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["val_split"] == 0.2 and saved["train"]["name"] == "t"
    assert load_config(run / "config.yaml").data.val_split == 0.2  # reloadable as is
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("epoch", "train_loss", "train_top1", "val_top1", "test_loss", "test_top1",
                "test_top5", "weight_angle", "gradient_angle", "backprop_angle",
                "weight_angle/conv1", "gradient_angle/fc", "backprop_angle/conv3"):
        assert col in header, col
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "plots" / "accuracy.png").stat().st_size > 1000
    assert (run / "plots" / "angles.png").stat().st_size > 1000
    last = hist[-1]
    assert 0 <= last["weight_angle"] <= 180 and 0 <= last["backprop_angle"] <= 180
    assert math.isfinite(last["gradient_angle/conv2"])
    assert last["test_top5"] >= last["test_top1"]


def test_existing_run_folder_is_not_overwritten(tmp_path):
    Trainer(load_config(None, tiny(tmp_path, "train.epochs=1"))).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(load_config(None, tiny(tmp_path, "train.epochs=1"))).fit()
    Trainer(load_config(None, tiny(tmp_path, "train.epochs=1", "train.overwrite=true"))).fit()


def test_learning_happens_and_feedback_is_trained(tmp_path):
    """sa pulls F towards W: the weight angle must fall during a short run."""
    t = Trainer(load_config(None, tiny(tmp_path, "rule.name=sa", "train.epochs=3",
                                       "data.num_samples=600", "train.angle_every=0")))
    before = sum(na.metrics.weight_angles(t.model).values())
    hist = t.fit()
    assert hist[-1]["weight_angle"] * len(t.layer_names) < before - 20
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["test_top1"] > 20  # above chance (10%)


def test_bp_has_no_feedback_optimizer(tmp_path):
    t = Trainer(load_config(None, tiny(tmp_path, "rule.name=bp")))
    assert t.feedback_optimizer is None and t.layer_names == []
    hist = t.fit()
    assert math.isnan(hist[-1]["weight_angle"])


def test_fa_feedback_stays_fixed(tmp_path):
    t = Trainer(load_config(None, tiny(tmp_path, "rule.name=fa")))
    f0 = t.model.conv2.feedback.clone()
    t.fit()
    assert torch.equal(t.model.conv2.feedback, f0)
    assert not torch.equal(t.model.conv2.weight, t.model.conv2.weight.detach() * 0)


def test_custom_rule_and_layer_rules(tmp_path):
    over = tiny(tmp_path, "rule.name=custom", "rule.terms={amp: 1.0, sparse: 1.0, decay: 0.5}",
                "rule.layers={fc: bp}")
    t = Trainer(load_config(None, over))
    assert t.rule.terms == {"amp": 1.0, "sparse": 1.0, "decay": 0.5}
    assert "fc" not in t.layer_names and "conv1" in t.layer_names
    t.fit()


def test_bad_rule_names_are_explained(tmp_path):
    with pytest.raises(ConfigError, match="valid: aa, bp, brsf, .*fa, .*custom"):
        Trainer(load_config(None, tiny(tmp_path, "rule.name=xx")))
    with pytest.raises(ConfigError, match="rule.name=custom needs rule.terms"):
        Trainer(load_config(None, tiny(tmp_path, "rule.name=custom")))
    with pytest.raises(ConfigError, match=r"unknown term .ampp.; valid terms: decay, amp"):
        Trainer(load_config(None, tiny(tmp_path, "rule.terms.ampp=1")))
    with pytest.raises(ValueError, match="valid: sgd, adam, adamw"):
        Trainer(load_config(None, tiny(tmp_path, "optim.name=lbfgs")))


# -- feedback_optim.name: joint ------------------------------------------------------------------


class _ThroughF(torch.autograd.Function):
    """The reference feedback Linear layer: ``y = x Wᵀ + b``, the error sent down through F;
    with ``kp`` F also gets W's task gradient (Kolen-Pollack)."""

    @staticmethod
    def forward(ctx, x, W, b, F, kp):
        ctx.save_for_backward(x, F)
        ctx.kp = kp
        return x @ W.T + (b if b is not None else 0)

    @staticmethod
    def backward(ctx, dy):
        x, F = ctx.saved_tensors
        rows, xs = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dW = rows.T @ xs
        db = rows.sum(0) if ctx.needs_input_grad[2] else None
        return dy @ F, dW, db, dW if ctx.kp else None, None


def _penalty(rule: na.Rule, x: torch.Tensor, W: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """The rule's R(F) on a Linear layer's input ``x`` [N, T, D], differentiable in F: the
    library's terms (``neuralign.terms.loss``) with ``rule.coefficients``, or the paper's own
    definitions written out (no ½, the batch mean over examples summed over positions; the
    layers have no bias, so where the paper adds it does not enter)."""
    from neuralign import terms
    from neuralign.ops import LinearOps

    if rule.convention == "library":
        ops = LinearOps(tuple(W.shape))
        return sum(c * terms.loss(t, ops, x, W, F) for t, c in rule.coefficients.items())
    y, n = x @ W.T, x.shape[0]
    paper = {"decay": lambda: F.pow(2).sum(), "self": lambda: -(F * W).sum(),
             "amp": lambda: -(y * (x @ F.T)).sum() / n,
             "null": lambda: (y @ F).pow(2).sum() / n,
             "sparse": lambda: (x @ F.T).pow(2).sum() / n}
    return sum(c * paper[t]() for t, c in rule.terms.items())


def _sgd_by_hand(params, grads, bufs, lr, momentum, nesterov, decays):
    """One step of SGD with momentum (torch's definition), written out."""
    for i, (p, g, wd) in enumerate(zip(params, grads, decays, strict=True)):
        g = g + wd * p
        bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
        p.sub_(lr * (g + momentum * bufs[i] if nesterov else bufs[i]))


JOINT_RULES = {"sa": {}, "aa": {}, "kp": {}, "ia": {"noise": None}}  # ia without mirror noise


@pytest.mark.parametrize("convention", ["library", "paper"])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("rule_name", list(JOINT_RULES))
def test_joint_is_sgd_on_the_summed_loss(rule_name, nesterov, convention):
    """feedback_optim.name: joint is W's SGD with momentum on task loss + Σ_layers R(F): after
    a few steps W, b and F equal a hand-written loop whose task gradient goes down through F
    (a reference Function) and whose F gradient is autograd of the rule's loss form; weight
    decay on the forward parameters only, unless feedback_optim.weight_decay asks."""
    rule = na.get_rule(rule_name, convention=convention, **JOINT_RULES[rule_name])
    bias = convention == "library"
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6, bias=bias), torch.nn.Tanh(),
                              torch.nn.Linear(6, 3, bias=bias)).double()
    model = na.convert(net, na.get_rule(rule, init="xavier_normal"))
    lr, wd, wd_f = 0.05, 0.01, (0.02 if rule_name == "sa" else 0.0)
    over = ["optim.name=sgd", f"optim.lr={lr}", f"optim.nesterov={nesterov}",
            f"optim.weight_decay={wd}", "feedback_optim.name=joint",
            *([f"feedback_optim.weight_decay={wd_f}"] if wd_f else [])]
    from neuralign.train.build import build_optimizers

    opt, feedback = build_optimizers(model, load_config(None, over), torch.Generator())
    assert feedback is None and [g["weight_decay"] for g in opt.param_groups] == [wd, wd_f]

    layers = [model[0], model[2]]
    Ws = [layer.weight.detach().clone() for layer in layers]
    bs = [layer.bias.detach().clone() if bias else None for layer in layers]
    Fs = [layer.feedback.detach().clone() for layer in layers]
    forward = Ws + [b for b in bs if b is not None]
    bufs: list = [None] * (len(forward) + len(Fs))
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = 0.7 * torch.randn(8, 5, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (8, 5), generator=g)
        # the library: one backward, one step of the one optimizer
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        na.after_step(model, opt)
        # the reference: task loss (errors through F) + the layers' penalties, by autograd
        params = [t.requires_grad_() for t in forward + Fs]
        h, penalty = x, 0.0
        for i in range(2):
            penalty = penalty + _penalty(rule, h.detach(), Ws[i].detach(), Fs[i])
            h = _ThroughF.apply(h, Ws[i], bs[i], Fs[i], rule.kp)
            h = torch.tanh(h) if i == 0 else h
        summed = torch.nn.functional.cross_entropy(h.reshape(-1, 3), y.reshape(-1)) + penalty
        grads = torch.autograd.grad(summed, params)
        with torch.no_grad():
            _sgd_by_hand([p.detach() for p in params], grads, bufs, lr, 0.9, nesterov,
                         [wd] * len(forward) + [wd_f] * len(Fs))
        for t in params:
            t.requires_grad_(False)
    for i, layer in enumerate(layers):
        torch.testing.assert_close(layer.weight.detach(), Ws[i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.feedback.detach(), Fs[i], rtol=1e-10, atol=1e-12)
        if bias:
            torch.testing.assert_close(layer.bias.detach(), bs[i], rtol=1e-10, atol=1e-12)
    assert not torch.equal(Fs[0], model[0].feedback.detach() * 0)


def test_joint_trains_f_in_the_forward_optimizer(tmp_path, caplog):
    """The default job with the paper's convention and joint: one optimizer of two groups (F's
    without weight decay), no recipe, F moves, the same schedule on both groups."""
    over = tiny(tmp_path, "rule.convention=paper", "feedback_optim.name=joint",
                "optim.weight_decay=1e-4", "optim.schedule.name=cosine", "train.epochs=1")
    with caplog.at_level(logging.INFO, logger="neuralign"):
        t = Trainer(load_config(None, over))
    assert t.feedback_optimizer is None and t.feedback_schedule is None and t.joint
    assert t.rule == na.get_rule("ia", convention="paper")  # the authors' coefficients
    forward, feedback = t.optimizer.param_groups
    assert forward["weight_decay"] == 1e-4 and feedback["weight_decay"] == 0.0
    assert {id(p) for p in feedback["params"]} == {
        id(p) for p in na.param_groups(t.model)["feedback"]}
    assert all(p.requires_grad for p in feedback["params"])  # no recipe marked them
    assert "joint, a second parameter group of the forward optimizer (adam" in caplog.text
    f0 = t.model.conv2.feedback.detach().clone()
    hist = t.fit()
    assert not torch.equal(t.model.conv2.feedback, f0)
    assert hist[-1]["feedback_lr"] == hist[-1]["lr"] == forward["lr"] < 0.003  # scheduled


def test_joint_refuses_the_keys_it_would_ignore(tmp_path):
    for extra, named in ((["feedback_optim.lr=0.1"], "feedback_optim.lr"),
                         (["feedback_optim.rate=0.5"], "feedback_optim.rate"),
                         (["feedback_optim.momentum=0.5", "rule.rate=0.3"],
                          "feedback_optim.momentum, rule.rate"),
                         (["feedback_optim.schedule.name=step"], "feedback_optim.schedule")):
        with pytest.raises(ConfigError, match=f"{named}: with feedback_optim.name=joint F is "
                                              f"trained by the forward optimizer"):
            Trainer(load_config(None, tiny(tmp_path, "feedback_optim.name=joint", *extra)))
    # F's own weight decay is the one key it reads; a rule without learned F has no group
    t = Trainer(load_config(None, tiny(tmp_path, "feedback_optim.name=joint", "rule.name=fa",
                                       "feedback_optim.weight_decay=0.1")))
    assert len(t.optimizer.param_groups) == 1
