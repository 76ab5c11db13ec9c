"""Every mistake a user can make on the command line ends in one clear line and exit status 2,
never a traceback, and leaves run folders as they were. Generated from a table (the cases are
listed in docs/cli.md, "Errors")."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import neuralign as na
from neuralign.cli import main
from neuralign.io import read_csv
from neuralign.train import Callback, Trainer, load_config
from neuralign.train.config import RANGES, Config, ConfigError, ScheduleConfig
from neuralign.train.optim import schedule_factor

TINY = ["data.num_samples=200", "data.batch_size=40", "model.name=mlp", "model.widths=[8]",
        "train.tensorboard=false", "train.plots=false", "train.angle_every=0", "--no-progress",
        "-q"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A runs folder with a finished 2-epoch run ``done``, a copy ``broken`` whose last
    checkpoint is truncated, one whose checkpoint is not one, one with a broken metrics.csv,
    a copy ``full`` (for a disk that fills), a run ``mixed`` whose feedback optimizer's state
    is for other layer sizes, a file ``afile``, and config files."""
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
    # a search's output folder, study "first"
    (root / "tiny.yaml").write_text(yaml.safe_dump({
        "data": {"num_samples": 200, "batch_size": 40, "val_split": 0.2},
        "model": {"name": "mlp", "widths": [8]},
        "train": {"epochs": 1, "angle_every": 0, "runs_dir": str(root / "scratch")}}))
    (root / "amp.yaml").write_text("rule.terms.amp: {type: log_float, low: 0.1, high: 1.0}\n")
    assert main(["search", "-c", str(root / "tiny.yaml"), "-s", str(root / "amp.yaml"),
                 "--trials", "1", "--out", str(root / "searched"), "--study", "first",
                 "-q"]) == 0
    shutil.copytree(runs / "done", runs / "full")
    # Adam on F: its moments are tensors of F's shape; give them another model's
    assert main(["train", "--runs-dir", str(runs), "--name", "mixed", "train.epochs=1",
                 "feedback_optim.name=adam", *TINY]) == 0
    ck = runs / "mixed" / "checkpoints" / "last.pt"
    state = torch.load(ck, weights_only=True)
    for moments in state["feedback_optimizer"]["state"].values():
        for k, v in moments.items():
            if v.dim():
                moments[k] = torch.zeros(5, *v.shape[1:])
    torch.save(state, ck)
    (root / "afile").write_text("a file, not a folder\n")
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
    ("zero-batch", ["train", "data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
    ("val-split", ["train", "data.val_split=1.5"], "must be in [0, 1)"),
    # every numeric key has its range, named in the message (test_every_numeric_key_has_a_case)
    ("zero-eval-batch", ["train", "data.eval_batch_size=0"], "data.eval_batch_size must be >= 1"),
    ("negative-workers", ["train", "data.workers=-1"], "data.workers must be >= 0"),
    ("negative-samples", ["train", "data.num_samples=-5"], "data.num_samples must be >= 0"),
    ("zero-in-shape", ["train", "data.shape=[3,0,32]"], "data.shape[1] must be >= 1"),
    ("one-class", ["train", "data.num_classes=1"], "data.num_classes must be >= 2"),
    ("negative-data-seed", ["train", "data.seed=-1"], "data.seed must be in [0, 2**63)"),
    ("zero-width", ["train", "model.widths=[8,0]"], "model.widths[1] must be >= 1, got 0"),
    ("negative-channels", ["train", "model.channels=[25,-1,25]"],
     "model.channels[1] must be >= 1"),
    ("negative-lr", ["train", "optim.lr=-0.1"], "optim.lr must be a finite number >= 0"),
    ("infinite-lr", ["train", "feedback_optim.lr=.inf"],
     "feedback_optim.lr must be a finite number >= 0, got inf"),
    ("momentum-one", ["train", "optim.momentum=1"], "optim.momentum must be in [0, 1)"),
    ("negative-weight-decay", ["train", "optim.weight_decay=-1"],
     "optim.weight_decay must be a finite number >= 0"),
    ("beta-one", ["train", "optim.betas=[0.9,1.0]"], "optim.betas[1] must be in [0, 1)"),
    ("zero-eps", ["train", "optim.eps=0"], "optim.eps must be a finite number > 0"),
    ("nan-warmup", ["train", "optim.schedule.warmup_epochs=.nan"],
     "optim.schedule.warmup_epochs must be a finite number >= 0, got nan"),
    ("negative-milestone", ["train", "optim.schedule.milestones=[30,-1]"],
     "optim.schedule.milestones[1] must be a finite number >= 0"),
    ("nan-gamma", ["train", "optim.schedule.gamma=.nan"],
     "optim.schedule.gamma must be a finite number > 0, got nan"),
    ("negative-min-factor", ["train", "optim.schedule.name=cosine",
                             "optim.schedule.min_factor=-0.5"],
     "optim.schedule.min_factor must be in [0, 1], got -0.5"),
    ("feedback-min-factor", ["train", "feedback_optim.schedule.min_factor=2"],
     "feedback_optim.schedule.min_factor must be in [0, 1]"),
    ("negative-checkpoint-every", ["train", "train.checkpoint_every=-1"],
     "train.checkpoint_every must be >= 0"),
    ("negative-angle-every", ["train", "train.angle_every=-3"],
     "train.angle_every must be >= 0, got -3"),
    ("seed-beyond-64-bits", ["train", "train.seed=36893488147419103232"],
     "train.seed must be in [0, 2**63), got 36893488147419103232"),
    ("float-overflow", ["train", "optim.lr=" + "9" * 400], "optim.lr: 999"),
    # (the rule's keys are the fields of neuralign.Rule, which checks them)
    ("nan-rate", ["train", "rule.rate=.nan"], "rate is the fraction"),
    ("infinite-norm", ["train", "rule.normalize=.inf"], "positive norm (finite), got inf"),
    ("infinite-update-noise", ["train", "rule.update_noise=.inf"],
     "update_noise is a standard deviation >= 0 (finite), got inf"),
    ("infinite-term", ["train", "rule.terms.amp=.inf"], "must be a finite number"),
    ("unparsable-list", ["train", "rule.points=[layers.?]"],
     "rule.points=[layers.?]: not valid YAML"),
    ("infinite-mirror-noise", ["train", "rule.noise.std=.inf"], "std must be a positive number"),
    ("zero-mirror-noise", ["train", "rule.noise_std=0"], "std must be a positive number"),
    ("zero-estimate-samples", ["train", "rule.estimate.samples=0"], "samples must be an integer"),
    ("zero-estimate-every", ["train", "rule.estimate.every=0"], "every must be an integer"),
    ("zero-estimate-steps", ["train", "rule.estimate.steps=0"], "steps must be an integer"),
    ("zero-estimate-noise", ["train", "rule.estimate.noise=0"], "noise must be a finite number"),
    ("infinite-estimate-window", ["train", "rule.estimate.window=.inf"],
     "window must be a finite number"),
    ("negative-drive-noise", ["train", "rule.estimate.drive_noise=-1"],
     "drive_noise must be a finite number"),
    ("short-tau", ["train", "rule.estimate.tau=0.5"], "tau is a membrane time constant"),
    ("memory-one", ["train", "rule.estimate.memory=1"], "memory is the share"),
    ("too-few-samples", ["train", "data.num_samples=3"], "at least 50 examples"),
    ("not-a-device", ["train", "train.device=tpu0"], "is not a device"),
    ("meta-device", ["train", "train.device=meta"], "valid: auto, cpu, cuda, cuda:N, mps"),
    ("lr-overflows-float32", ["train", "optim.lr=1e39"], "optim.lr=1e+39 is not a number torch"),
    ("lr-infinite", ["train", "optim.lr=1e400"], "optim.lr must be a finite number >= 0, got inf"),
    ("weight-decay-overflows", ["train", "optim.weight_decay=1e39"], "optim.weight_decay=1e+39"),
    ("feedback-lr-overflows", ["train", "feedback_optim.name=sgd", "feedback_optim.lr=1e39"],
     "feedback_optim.lr=1e+39"),
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
    ("name-newline", ["train", "--runs-dir", "ROOT/runs", "--name", "a\nb"],
     "is not a folder name"),
    ("name-tab", ["train", "--runs-dir", "ROOT/runs", "train.name=a\tb"], "is not a folder name"),
    ("name-empty", ["train", "--runs-dir", "ROOT/runs", "--name", ""], "--name is empty"),
    ("runs-dir-is-a-file", ["train", "--runs-dir", "ROOT/afile"],
     "Not a directory: 'ROOT/afile/"),
    ("runs-dir-under-a-file", ["train", "--runs-dir", "ROOT/afile/runs", "--name", "x"],
     "a part of this path is a file where a folder belongs"),
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
    ("resume-fewer-epochs", ["train", "--resume", "done", "--runs-dir", "ROOT/runs",
                             "train.epochs=1"], "has trained 2 epochs: train.epochs=1"),
    ("resume-optimizer-state-of-another-model", ["train", "--resume", "mixed", "--runs-dir",
                                                 "ROOT/runs", "train.epochs=2"],
     "exp_avg of 1.feedback has shape [5, 40], the parameter [8, 40]"),
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
    ("search-another-study-in-out", ["search", "-c", "ROOT/tiny.yaml", "-s", "ROOT/amp.yaml",
                                     "--trials", "1", "--out", "ROOT/searched", "--study",
                                     "second"], "holds the outputs of study 'first'"),
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


#: The runs each case must leave byte for byte as they were.
KEPT = ("done", "broken", "garbage", "full", "mixed")


def _one_clear_line(root, argv, message, capsys) -> str:
    """Run ``argv``; check it ends in one error line holding ``message``, exit status 2, no
    traceback, and every run of :data:`KEPT` as it was. Returns stderr."""
    argv = [a.replace("ROOT", str(root)) for a in argv]
    if argv[0] == "train" and "--resume" not in argv:  # a tiny run, unless the case says
        argv = [argv[0], *TINY, "train.epochs=1", "--runs-dir", str(root / "scratch"), *argv[1:]]
    before = {name: _digest(root / "runs" / name) for name in KEPT}
    searched = _digest(root / "searched")
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    assert message.replace("ROOT", str(root)) in err, err
    # one error line, naming the command (a search space lists all its problems below it)
    assert sum(line.startswith("neuralign ") and ": error: " in line
               for line in err.splitlines()) == 1, err
    # nothing written into the existing runs or search, whatever the command tried
    for name, digest in before.items():
        assert _digest(root / "runs" / name) == digest, name
    assert _digest(root / "searched") == searched
    return err


@pytest.mark.parametrize("argv,message", [pytest.param(a, m, id=i) for i, a, m in CASES])
def test_a_mistake_ends_in_one_clear_line(root, argv, message, capsys, tmp_path, monkeypatch):
    # in an empty folder: a command's default runs/ is written there, never into the checkout
    monkeypatch.chdir(tmp_path)
    _one_clear_line(root, argv, message, capsys)
    # and no folder made for what never ran (transfer made runs/transfer/<rule>/)
    assert not list(tmp_path.rglob("*")), list(tmp_path.rglob("*"))


# -- the system's errors: a fault made for each case, then the same checks ----------------------

#: what torch's serializer raises when the disk fills under it
SERIALIZER = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
              "file data/3: file write failed")


def _save_fails(error):
    """torch.save writes part of the checkpoint, then fails with ``error``."""
    def setup(monkeypatch, root):
        def save(obj, f, *args, **kwargs):
            f.write(b"partial")
            raise error

        monkeypatch.setattr(torch, "save", save)
    return setup


def _read_only(folder):
    """``ROOT/folder`` may not be written (as root, chmod would not stop us: os.mkdir and
    mkstemp are refused there as the OS refuses them)."""
    def setup(monkeypatch, root):
        ro = str(root / folder)
        mkdir, mkstemp = os.mkdir, tempfile.mkstemp

        def refused(path):
            return str(path).startswith(ro)

        def fake_mkdir(path, *args, **kwargs):
            if refused(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return mkdir(path, *args, **kwargs)

        def fake_mkstemp(*args, dir=None, **kwargs):
            if dir is not None and refused(dir):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), f"{dir}/.x.tmp")
            return mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        monkeypatch.setattr(tempfile, "mkstemp", fake_mkstemp)
    return setup


def _training_fails(error):
    """The first epoch raises ``error`` (memory runs out)."""
    def setup(monkeypatch, root):
        def train_epoch(self, epoch):
            raise error

        monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    return setup


def _missing(module):
    """``module`` (of the cli extra) is not installed."""
    def setup(monkeypatch, root):
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == module else find_spec(name, *a))
    return setup


RESUME_FULL = ["train", "--resume", "full", "--runs-dir", "ROOT/runs", "train.epochs=3"]

# (id, argv, the fault, a piece of the one-line message)
FAULTS = [
    ("runs-dir-read-only", ["train", "--runs-dir", "ROOT/ro"], _read_only("ro"),
     "Permission denied: 'ROOT/ro"),
    ("run-folder-read-only", RESUME_FULL, _read_only("runs/full/checkpoints"),
     "Permission denied: 'ROOT/runs/full/checkpoints'; choose a folder you may write"),
    ("disk-full-in-torch-save", RESUME_FULL, _save_fails(RuntimeError(SERIALIZER)),
     "No space left on device (torch could not write the checkpoint"),
    ("disk-full-on-close", RESUME_FULL,
     _save_fails(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
     "No space left on device: 'ROOT/runs/full/checkpoints/last.pt'; the disk is full"),
    ("out-of-memory", ["train", "--name", "oom"], _training_fails(MemoryError()),
     "out of memory; no checkpoint had been written yet: lower data.batch_size"),
    ("device-out-of-memory", ["train", "--name", "cuda-oom"],
     _training_fails(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")),
     "the device is out of memory (CUDA out of memory)"),
    ("float32-overflow-in-a-step", ["train", "--name", "overflow"],
     _training_fails(RuntimeError("value cannot be converted to type float without overflow")),
     "a value is beyond torch's float32 (value cannot be converted"),
    ("rules-without-the-cli-extra", ["rules"], _missing("numpy"),
     "needs the 'cli' extra (numpy not installed): pip install 'neuralign[cli]'"),
    ("plot-without-the-cli-extra", ["plot", "done", "--runs-dir", "ROOT/runs"],
     _missing("matplotlib"), "needs the 'cli' extra (matplotlib not installed)"),
]


@pytest.mark.parametrize("argv,fault,message",
                         [pytest.param(a, f, m, id=i) for i, a, f, m in FAULTS])
def test_a_system_error_ends_in_one_clear_line(root, argv, fault, message, capsys,
                                               monkeypatch):
    fault(monkeypatch, root)
    err = _one_clear_line(root, argv, message, capsys)
    if "full" in argv:  # the checkpoint could not be written: the last one is whole
        monkeypatch.undo()
        ck = root / "runs" / "full" / "checkpoints" / "last.pt"
        assert f"the last checkpoint, {ck} (end of epoch 2), is intact" in err
        assert torch.load(ck, weights_only=True)["epoch"] == 2


def _numeric_keys(section, prefix: str = "") -> list[str]:
    """The dotted keys of every field of a config section that takes numbers (ints, floats,
    lists or mappings of them), through its subsections."""
    keys = []
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            keys += _numeric_keys(value, f"{prefix}{f.name}.")
        elif _takes_numbers(hints[f.name]):
            keys.append(f"{prefix}{f.name}")
    return keys


def _takes_numbers(tp) -> bool:
    return tp in (int, float) or any(_takes_numbers(a) for a in typing.get_args(tp))


def test_every_numeric_key_has_a_case():
    """Each numeric config key has an out-of-range case above (the feedback optimizer's
    fields are the forward one's, checked by the same table)."""
    keys = _numeric_keys(Config())
    assert {"train.seed", "optim.schedule.min_factor", "rule.estimate.memory", "rule.terms",
            "model.widths", "feedback_optim.rate"} <= set(keys)
    given = {a.split("=")[0] for _, argv, _ in CASES for a in argv if "=" in a}
    twin = {k: k.replace("feedback_optim.", "optim.", 1) for k in keys
            if k.startswith("feedback_optim.") and k != "feedback_optim.rate"}
    missing = [k for k in keys if not any(g == twin.get(k, k) or g == k
                                          or g.startswith(f"{k}.") for g in given)]
    assert not missing


def test_the_ranges_are_documented():
    text = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    for section, fields in RANGES.items():
        for name, valid in fields.items():
            integer = typing.get_type_hints(section)[name] in (int, list[int])
            assert f"| `{name}` | {valid.describe(integer)} |" in text, (section, name)


@pytest.mark.parametrize("name", ["yes", "null", "007", "1e3", "a b", "exp1/sa"])
def test_run_names_are_text(name, capsys):
    assert main(["train", "--name", name, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["name"] == name
    assert load_config(None, [f"train.name={name}", f"data.data_dir={name}"]).data.data_dir \
        == name
    assert load_config(None, ["train.name='yes'"]).train.name == "yes"  # quoted: YAML's


def test_values_set_in_python_are_checked_by_the_trainer(tmp_path):
    cfg = load_config(None, [f"train.runs_dir={tmp_path}"])
    cfg.optim.schedule.min_factor = -1.0
    with pytest.raises(ConfigError, match=r"optim.schedule.min_factor must be in \[0, 1\]"):
        Trainer(cfg)
    assert not any(tmp_path.iterdir())


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


# -- resuming with a change: it takes effect, and nothing is written before it works ------------

def _resume(runs: Path, name: str, *over: str) -> int:
    return main(["train", "--resume", name, "--runs-dir", str(runs), "--allow-change",
                 "train.epochs=3", "-q", *over])


@pytest.mark.parametrize("over,lr,feedback_lr", [
    pytest.param(["optim.lr=0.1"], 0.1, 0.1, id="lr"),
    # a new kind of optimizer: a new state (Adam's moments mean nothing to SGD)
    pytest.param(["optim.name=sgd", "optim.momentum=0", "optim.lr=0.5"], 0.5, 0.1,
                 id="sgd-over-adam"),
    pytest.param(["feedback_optim.rate=0.5"], 0.003, 0.5, id="recipe-rate"),
    pytest.param(["feedback_optim.name=adam", "feedback_optim.lr=0.01"], 0.003, 0.01,
                 id="adam-over-recipe"),
    # a schedule: the new one, evaluated at the step reached (12 steps of 4 epochs of 4)
    pytest.param(["optim.lr=0.01", "optim.schedule.name=cosine", "train.epochs=4"],
                 0.01 * schedule_factor(ScheduleConfig(name="cosine"), 4, 4)(12), 0.1,
                 id="cosine"),
])
def test_an_allowed_change_takes_effect_from_the_resumed_step(tmp_path, root, over, lr,
                                                              feedback_lr, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs" / "done", runs / "changed")
    shutil.copytree(root / "runs" / "done", runs / "plain")
    assert _resume(runs, "changed", *over) == 0
    log = capsys.readouterr().err
    assert main(["train", "--resume", "plain", "--runs-dir", str(runs), "train.epochs=3",
                 "-q"]) == 0
    row = read_csv(runs / "changed" / "metrics.csv")[2]
    assert math.isclose(row["lr"], lr, rel_tol=1e-5) and math.isclose(
        row["feedback_lr"], feedback_lr, rel_tol=1e-5), row
    assert row["train_loss"] != read_csv(runs / "plain" / "metrics.csv")[2]["train_loss"]
    state = torch.load(runs / "changed" / "checkpoints" / "last.pt", weights_only=True)
    assert state["config_changes"][0]["epoch"] == 2
    if "optim.name=sgd" in over:
        group = state["optimizer"]["param_groups"][0]
        assert (group["momentum"], group["lr"]) == (0.0, 0.5)
        assert "optim.name adam -> sgd: the forward optimizer starts with a new state" in log
        assert "name: sgd" in (runs / "changed" / "config.yaml").read_text()
    elif "optim.lr=0.1" in over:  # the same kind: Adam's moments carried over
        assert int(state["optimizer"]["state"][0]["step"]) == 12


class _Fail(Callback):
    def on_step_end(self, trainer, step, loss):
        raise RuntimeError("the first step failed")


def test_nothing_is_written_before_a_resume_works(tmp_path, root):
    """config.yaml follows the checkpoint: a resumed run that stops before its first
    checkpoint leaves the run folder as it was (no recorded change that was not applied)."""
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs" / "done", runs / "again")
    before = _digest(runs / "again")
    trainer = Trainer.from_run("again", ["optim.lr=0.1", "train.epochs=3"], runs_dir=runs,
                               allow_change=True, callbacks=[_Fail()])
    with pytest.raises(RuntimeError, match="the first step failed") as e:
        trainer.fit()
    assert _digest(runs / "again") == before
    note = "".join(getattr(e.value, "__notes__", []))
    assert "the last checkpoint" in note and "is intact" in note


def test_resuming_a_finished_run_changes_nothing(tmp_path, root, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs" / "done", runs / "again")
    before = _digest(runs / "again")
    assert main(["train", "--resume", "again", "--runs-dir", str(runs)]) == 0
    assert "nothing to train" in capsys.readouterr().err
    assert _digest(runs / "again") == before


# -- the data cache: a cache, never a reason to stop ----------------------------------------

def test_a_corrupted_data_cache_is_made_again(tmp_path, monkeypatch, caplog):
    from neuralign.data import load_mnist1d

    monkeypatch.setenv("NEURALIGN_CACHE", str(tmp_path / "cache"))
    want = load_mnist1d(200)
    (cached,) = (tmp_path / "cache").glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated
    got = load_mnist1d(200)
    assert "cannot be read" in caplog.text and "generating it again" in caplog.text
    assert all((got[k] == want[k]).all() for k in want)
    load_mnist1d(200)  # and cached again, whole
    assert "cannot be read" not in caplog.text.split("generating it again")[-1]


@pytest.mark.parametrize("cache", ["read-only", "a-file"])
def test_a_cache_that_cannot_be_written_is_not_an_error(tmp_path, monkeypatch, capsys, cache):
    if cache == "a-file":
        (tmp_path / "file").write_text("x")
        monkeypatch.setenv("NEURALIGN_CACHE", str(tmp_path / "file" / "cache"))
    else:
        monkeypatch.setenv("NEURALIGN_CACHE", str(tmp_path / "ro"))
        _read_only("ro")(monkeypatch, tmp_path)
    assert main(["train", *TINY, "train.epochs=1", "--runs-dir", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    assert "cannot cache MNIST-1D" in err and "NEURALIGN_CACHE" in err, err


# -- real processes: a run folder in use, SIGTERM, a missing package ---------------------------

def _start(runs: Path, name: str) -> subprocess.Popen:
    """``neuralign train`` of many epochs in another process, once its first checkpoint is
    written."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(na.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "neuralign", "train", "--runs-dir", str(runs),
                             "--name", name, "train.epochs=100000", *TINY], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (runs / name / "checkpoints" / "last.pt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    return proc


def test_a_run_folder_in_use_is_refused_and_a_dead_process_leaves_no_lock(tmp_path, capsys):
    runs = tmp_path / "runs"
    holder = _start(runs, "busy")
    try:
        for argv in (["train", "--resume", "busy", "--runs-dir", str(runs), "train.epochs=3"],
                     ["train", "--runs-dir", str(runs), "--name", "busy", *TINY,
                      "train.overwrite=true"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"run folder '{runs / 'busy'}' is in use by another process" in err, err
            assert "Traceback" not in err
        assert holder.poll() is None  # (still training: its folder was left alone)
    finally:
        holder.kill()  # kill -9: no chance to clean up
        holder.communicate(timeout=60)
    done = torch.load(runs / "busy" / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    assert main(["train", "--resume", "busy", "--runs-dir", str(runs),
                 f"train.epochs={done + 1}", "-q"]) == 0  # the OS released the lock


def test_sigterm_stops_like_ctrl_c(tmp_path):
    runs = tmp_path / "runs"
    proc = _start(runs, "term")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    ck = runs / "term" / "checkpoints" / "last.pt"
    assert f"neuralign: terminated (SIGTERM); the last checkpoint, {ck}" in err, err
    epoch = torch.load(ck, weights_only=True)["epoch"]  # intact
    assert f"(end of epoch {epoch}), is intact" in err


def test_every_command_names_the_cli_extra_when_a_package_is_missing(tmp_path):
    """A plain `pip install -e .`: numpy is missing (hidden here), and `neuralign rules`
    imports it on the way."""
    script = ("import sys; sys.modules['numpy'] = None\n"
              "from neuralign.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(Path(na.__file__).parents[1]))
    for command in (["rules"], ["train"]):
        r = subprocess.run([sys.executable, "-W", "ignore", "-c", script, *command], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert "needs the 'cli' extra (numpy not installed)" in r.stderr, r.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="mounts a small tmpfs (root only)")
def test_a_real_full_disk(tmp_path, root, capsys):
    """The disk fills for real (a tmpfs of 1 MiB) while a checkpoint is written."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        shutil.copytree(root / "runs" / "done", disk / "run")
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(bytes(free - 16384))
        before = _digest(disk / "run")
        assert main(["train", "--resume", str(disk / "run"), "train.epochs=3", "-q"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "No space left on device" in err, err
        assert "(end of epoch 2), is intact" in err
        assert _digest(disk / "run") == before
    finally:
        subprocess.run(["umount", str(disk)], check=True)
