"""Training engine: config, schedules, checkpoints, exact resume, divergence, run folder."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml

import neuralign as na
import runs
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
from neuralign.train.config import Config, ScheduleConfig, config_from_dict
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
