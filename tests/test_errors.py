"""Every mistake a user can make on the command line ends in one clear line and exit status 2,
never a traceback, and leaves run folders as they were. Generated from a table (the cases are
listed in docs/cli.md, "Errors")."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import neuralign as na
from neuralign.cli import main

TINY = ["data.num_samples=200", "data.batch_size=40", "model.name=mlp", "model.widths=[8]",
        "train.tensorboard=false", "train.plots=false", "train.angle_every=0", "--no-progress",
        "-q"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A runs folder with a finished 2-epoch run ``done``, a copy ``broken`` whose last
    checkpoint is truncated, one whose checkpoint is not one, one with a broken metrics.csv,
    and config files."""
    root = tmp_path_factory.mktemp("errors")
    runs = root / "runs"
    assert main(["train", "--runs-dir", str(runs), "--name", "done", "train.epochs=2",
                 *TINY]) == 0
    shutil.copytree(runs / "done", runs / "broken")
    ck = runs / "broken" / "checkpoints" / "last.pt"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    shutil.copytree(runs / "done", runs / "garbage")
    (runs / "garbage" / "checkpoints" / "last.pt").write_text("not a checkpoint")
    (runs / "garbage" / "checkpoints" / "last.prev.pt").unlink()
    (root / "bad.yaml").write_text("optim: {lr: [unclosed\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "space.yaml").write_text("rule.terms.amp: {type: log_float, low: 1.0, high: 0.1}\n")
    (root / "base.yaml").write_text("rule: {name: wm}\n")
    shutil.copytree(runs / "done", runs / "badcsv")
    (runs / "badcsv" / "metrics.csv").write_bytes(b"garbage\x00\xff")
    return root


def _r(root, *names):
    return str(Path(root, *names))


# (id, argv (ROOT is replaced by the fixture's folder), a piece of the one-line message)
CASES = [
    # the config: keys, types, values
    ("unknown-key", ["train", "optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    ("wrong-type", ["train", "optim.lr=fast"], "optim.lr: expected float"),
    ("not-key-value", ["train", "optim.lr"], "is not of the form key=value"),
    ("value-not-section", ["train", "optim.lr.x=1"], "is a value, not a section"),
    ("unknown-rule", ["train", "rule.name=nope"], "unknown rule.name 'nope'"),
    ("unknown-model", ["train", "model.name=nope"], "unknown model 'nope'"),
    ("unknown-dataset", ["train", "data.name=nope"], "unknown dataset 'nope'"),
    ("unknown-optimizer", ["train", "optim.name=lbfgs"], "valid: sgd, adam, adamw"),
    ("unknown-feedback-optimizer", ["train", "feedback_optim.name=lbfgs"],
     "valid: recipe, sgd, adam, adamw, joint"),
    ("rate-out-of-range", ["train", "feedback_optim.rate=2"], "in (0, 1]"),
    ("rate-without-recipe", ["train", "feedback_optim.name=sgd", "feedback_optim.rate=0.5"],
     "feedback_optim.rate is the recipe's"),
    ("two-rates-for-a-layer", ["train", "feedback_optim.rate=0.2", "rule.rate=0.3"],
     "feedback_optim.rate sets every layer's rate"),
    ("rule-rate-without-recipe", ["train", "feedback_optim.name=sgd", "rule.rate=0.3"],
     "a rule's rate is the recipe's"),
    ("a-feedback-rate-with-joint", ["train", "feedback_optim.name=joint", "feedback_optim.lr=0.1"],
     "feedback_optim.lr: with feedback_optim.name=joint F is trained by the forward optimizer"),
    ("an-estimate-without-the-recipe", ["train", "rule.name=sa", "rule.estimate=rdd",
                                        "feedback_optim.name=joint"],
     "the weight estimation phases run in the feedback recipe's step"),
    ("unknown-key-in-a-layer-entry", ["train", "rule.layers.fc={rat: 0.3}"],
     "unknown config key 'rule.layers.fc.rat'"),
    ("shorthand-and-its-key", ["train", "rule.noise_std=1", "rule.noise.std=2"],
     "is short for rule.noise.std"),
    ("unknown-term", ["train", "rule.terms.mirror=1"], "unknown term 'mirror'"),
    ("custom-without-terms", ["train", "rule.name=custom"], "needs rule.terms"),
    ("unknown-noise", ["train", "rule.noise_dist=cauchy"], "valid: normal, uniform"),
    ("negative-update-noise", ["train", "rule.update_noise=-1"], "standard deviation >= 0"),
    ("negative-norm", ["train", "rule.normalize=-2"], "positive norm"),
    ("negative-curvature", ["train", "rule.name=sa", "rule.terms.decay=-1"],
     "has no minimum"),
    ("terms-on-fixed-feedback", ["train", "rule.name=fa", "rule.terms.amp=1"], "never trained"),
    ("unknown-init", ["train", "rule.init=zeros"], "valid: default, kaiming_uniform"),
    ("unknown-model-init", ["train", "model.init=zeros"], "valid: default, xavier_uniform"),
    ("layer-glob-matches-nothing", ["train", "rule.layers.nomatch=bp"],
     "match no convertible layer"),
    ("unknown-schedule", ["train", "optim.schedule.name=exp"], "valid: constant, step, cosine"),
    ("nesterov-without-momentum", ["train", "optim.name=sgd", "optim.nesterov=true",
                                   "optim.momentum=0"], "nesterov needs"),
    ("zero-epochs", ["train", "train.epochs=0"], "train.epochs must be >= 1"),
    ("zero-batch", ["train", "data.batch_size=0"], "must be positive"),
    ("val-split", ["train", "data.val_split=1.5"], "must be in [0, 1)"),
    ("too-few-samples", ["train", "data.num_samples=3"], "at least 50 examples"),
    ("not-a-device", ["train", "train.device=tpu0"], "is not a device"),
    # config files
    ("missing-config", ["train", "--config", "ROOT/missing.yaml"], "does not exist"),
    ("invalid-yaml", ["train", "--config", "ROOT/bad.yaml"], "is not valid YAML"),
    ("config-not-a-mapping", ["train", "--config", "ROOT/list.yaml"], "expected a mapping"),
    # run folders and names
    ("name-escapes", ["train", "--runs-dir", "ROOT/runs", "--name", "ghost/../done"],
     "is not a folder name"),
    ("name-is-runs-dir", ["train", "--runs-dir", "ROOT/runs", "--name", "a/b/../../"],
     "is not a folder name"),
    ("name-absolute", ["train", "--runs-dir", "ROOT/runs", "--name", "/tmp/x"],
     "is not a folder name"),
    ("run-exists", ["train", "--runs-dir", "ROOT/runs", "--name", "done"], "already exists"),
    ("compare-name-escapes", ["compare", "--rules", "bp", "--runs-dir", "ROOT/runs", "--name",
                              "../x"], "is not a folder name"),
    ("compare-unknown-rule", ["compare", "--rules", "bp,nope"], "unknown rule(s) ['nope']"),
    # resume
    ("resume-nothing", ["train", "--resume", "nothere", "--runs-dir", "ROOT/runs"],
     "no run folder"),
    ("resume-with-config", ["train", "--resume", "done", "--runs-dir", "ROOT/runs", "--config",
                            "ROOT/base.yaml"], "cannot be combined"),
    ("allow-change-without-resume", ["train", "--allow-change"], "only applies with --resume"),
    ("resume-changes-rule", ["train", "--resume", "done", "--runs-dir", "ROOT/runs",
                             "rule.name=fa"], "rule.name: 'ia' -> 'fa'"),
    ("resume-changes-optimizer", ["train", "--resume", "done", "--runs-dir", "ROOT/runs",
                                  "optim.name=sgd"], "optim.name: 'adam' -> 'sgd'"),
    ("resume-changes-model", ["train", "--resume", "done", "--runs-dir", "ROOT/runs",
                              "model.widths=[5]"], "model.widths: [8] -> [5]"),
    ("resume-changed-model-allowed", ["train", "--resume", "done", "--runs-dir", "ROOT/runs",
                                      "--allow-change", "model.widths=[5]", "train.epochs=3"],
     "does not fit the changed config"),
    ("resume-truncated", ["train", "--resume", "broken", "--runs-dir", "ROOT/runs",
                          "train.epochs=3"], "cannot be read"),
    ("resume-not-a-checkpoint", ["train", "--resume", "garbage", "--runs-dir", "ROOT/runs",
                                 "train.epochs=3"], "truncated or corrupted"),
    # the other commands
    ("nproc-zero", ["train", "--nproc", "0"], "--nproc must be >= 1"),
    ("plot-nothing", ["plot", "nothere", "--runs-dir", "ROOT/runs"], "no run folder"),
    ("plot-broken-csv", ["plot", "badcsv", "--runs-dir", "ROOT/runs"],
     "is not a readable metrics CSV"),
    ("no-cuda", ["train", "train.device=cuda:7"], "CUDA"),
    ("search-missing-space", ["search", "-c", "ROOT/base.yaml", "-s", "ROOT/nospace.yaml"],
     "nospace.yaml"),
    ("search-inverted-range", ["search", "-c", "ROOT/base.yaml", "-s", "ROOT/space.yaml"],
     "low"),
    ("robustness-bad-noise", ["robustness", "-c", "ROOT/base.yaml", "--noise", "abc"], "abc"),
    ("transfer-unknown-model", ["transfer", "-c", "ROOT/base.yaml", "--models", "nope"],
     "unknown model 'nope'"),
    ("fetch-not-downloadable", ["fetch", "imagenet", "--data-dir", "ROOT/data"],
     "ImageNet is never downloaded"),
]


def _digest(folder: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("argv,message", [pytest.param(a, m, id=i) for i, a, m in CASES])
def test_a_mistake_ends_in_one_clear_line(root, argv, message, capsys, tmp_path, monkeypatch):
    # in an empty folder: a command's default runs/ is written there, never into the checkout
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("ROOT", str(root)) for a in argv]
    if argv[0] == "train" and "--resume" not in argv:  # a tiny run, unless the case says
        argv = [argv[0], *TINY, "train.epochs=1", "--runs-dir", str(root / "scratch"), *argv[1:]]
    before = {name: _digest(root / "runs" / name) for name in ("done", "broken", "garbage")}
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    assert message in err, err
    # one error line, naming the command (a search space lists all its problems below it)
    assert sum(line.startswith("neuralign ") and ": error: " in line
               for line in err.splitlines()) == 1, err
    # nothing written into the existing runs, whatever the command tried
    for name, digest in before.items():
        assert _digest(root / "runs" / name) == digest, name
    # and no folder made for what never ran (transfer made runs/transfer/<rule>/)
    assert not list(tmp_path.rglob("*")), list(tmp_path.rglob("*"))


def test_argparse_mistakes_exit_2(capsys):
    for argv in (["train", "--bogus"], ["search"], ["nothing"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_options_and_overrides_mix_in_any_order(root, capsys):
    assert main(["train", "optim.lr=0.5", "--name", "foo", "train.seed=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "seed: 7" in out and "name: foo" in out


def test_the_previous_checkpoint_is_named_with_the_way_to_use_it(root, capsys):
    assert main(["train", "--resume", "broken", "--runs-dir", str(root / "runs"),
                 "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    prev = root / "runs" / "broken" / "checkpoints" / "last.prev.pt"
    assert str(prev) in err and "mv " in err
    assert torch.load(prev, weights_only=True)["epoch"] == 1  # kept, whole


def test_an_allowed_change_is_recorded(tmp_path, root, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs" / "done", runs / "again")
    assert main(["train", "--resume", "again", "--runs-dir", str(runs), "--allow-change",
                 "optim.lr=0.001", "train.epochs=3", "-q"]) == 0
    state = torch.load(runs / "again" / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 3
    assert state["config_changes"] == [{"epoch": 2, "changes": {"optim.lr": [0.003, 0.001]}}]


def test_converting_a_converted_model_is_refused():
    model = na.convert(nn.Sequential(nn.Linear(3, 2)), "ia")
    with pytest.raises(ValueError, match="already converted.*revert"):
        na.convert(model, "fa")
    with pytest.raises(ValueError, match="already converted"):
        na.convert(model, "fa", layer_rules={"0": "sa"})
    again = na.convert(na.revert(model), "fa")  # the documented way
    assert again[0].rule.name == "fa"
