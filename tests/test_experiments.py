"""Experiments: search (Optuna), transfer, robustness; spaces, skip-finished, atomic files."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

import runs
from neuralign.cli import main
from neuralign.experiments import parse_models, parse_space, robustness, search, transfer
from neuralign.experiments.common import run_key, run_once, split_list, write_yaml
from neuralign.experiments.space import SpaceError
from neuralign.train import Callback, ConfigError, Trainer, load_config
from neuralign.train.callbacks import read_csv
from runs import kill_mid_trial

ROOT = Path(__file__).parent.parent
SEARCH_CONFIGS = ROOT / "configs" / "search"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path: Path, *extra: str):
    """The shared tiny run (``tests/runs.py``) as a search base: an 8-unit MLP, rule wm, a
    validation split."""
    return load_config(None, runs.tiny(
        tmp_path, "data.val_split=0.2", "model.name=mlp", "model.widths=[8]", "rule.name=wm",
        "train.angle_every=0", "train.checkpoint_every=1", *extra))


SPACE = {"rule.terms.amp": {"type": "log_float", "low": 0.01, "high": 10.0},
         "rule.noise_std": {"type": "float", "low": 0.2, "high": 2.0}}


class EveryOtherPruner(optuna.pruners.BasePruner):
    """Prunes odd-numbered trials at their first report: pruning is certain, not luck."""

    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1


def _no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "fit", boom)


# -- spaces --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SEARCH_CONFIGS.glob("*_space.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_spaces_are_valid(path):
    base = load_config(SEARCH_CONFIGS / "mnist1d_mlp_base.yaml",
                       ["rule.name=ia"] if path.stem.startswith("ia") else [])
    space = parse_space(yaml.safe_load(path.read_text()), base)
    assert space.keys() and all(k.startswith("rule.") for k in space.keys())


def test_space_types():
    base = load_config(None, ["rule.name=ia"])
    space = parse_space({
        "rule.terms.null": {"type": "float", "low": 0.1, "high": 1.0, "log": True},
        "data.batch_size": {"type": "int", "low": 16, "high": 64, "step": 16},
        "feedback_optim.name": ["sgd", "adam"],
        "rule.noise_dist": {"type": "categorical", "choices": ["normal", "uniform"]},
        "optim.lr": {"type": "log-float", "low": "1e-4", "high": "1e-2"},  # YAML 1.1 strings
    }, base)
    by_key = {p.key: p for p in space.params}
    assert by_key["rule.terms.null"].log and by_key["optim.lr"].log
    assert by_key["optim.lr"].low == pytest.approx(1e-4)
    assert by_key["data.batch_size"].type == "int" and by_key["data.batch_size"].step == 16
    assert by_key["feedback_optim.name"].choices == ("sgd", "adam")


@pytest.mark.parametrize("spec, expected", [
    ({"optim.lrr": {"type": "float", "low": 0.1, "high": 1}}, ["unknown config key", "optim.lr"]),
    ({"rule.terms.amp": {"type": "float", "low": 1.0, "high": 1.0}}, ["empty range"]),
    ({"rule.terms.amp": {"type": "float", "low": 2.0, "high": 1.0}}, ["empty range"]),
    ({"data.batch_size": {"type": "float", "low": 16, "high": 64}}, ["data.batch_size",
                                                                     "not accepted"]),
    ({"model.name": {"type": "int", "low": 1, "high": 3}}, ["model.name"]),
    ({"train.epochs": {"type": "int", "low": 1.5, "high": 3}}, ["must be an integer"]),
    ({"rule.terms.amp": {"type": "normal", "low": 0, "high": 1}}, ["unknown distribution type",
                                                                    "log_float", "categorical"]),
    ({"rule.terms.amp": {"type": "float", "lo": 0, "high": 1}}, ["unknown field", "low"]),
    ({"rule.terms.amp": {"type": "float", "low": "a", "high": 1}}, ["finite number"]),
    ({"rule.terms.amp": {"type": "float", "low": 0.0, "high": 1, "log": True}}, ["low > 0"]),
    ({"rule.terms.wat": {"type": "float", "low": 0.1, "high": 1}}, ["unknown term", "null"]),
    ({"feedback_optim.name": {"type": "categorical", "choices": []}}, ["non-empty"]),
    ({"feedback_optim.name": ["sgd", "lbfgs"]}, ["unknown value 'lbfgs'", "adamw"]),
    ({"model.name": ["mlp", "nope"]}, ["unknown value 'nope'", "cnn1d"]),
    ({"rule.noise_dist": ["normal", "laplace"]}, ["rule cannot be built", "uniform"]),
    ({"model.widths": [[8], [16]]}, ["strings, numbers, booleans"]),
    ({"rule.terms.amp": 3}, ["expected a mapping"]),
    ({}, ["non-empty mapping"]),
])
def test_bad_spaces_are_rejected(spec, expected):
    with pytest.raises(SpaceError) as e:
        parse_space(spec, load_config(None, ["rule.name=wm"]))
    for text in expected:
        assert text in str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(SpaceError) as e:
        parse_space({"optim.lrr": {"type": "float", "low": 0.1, "high": 1},
                     "rule.terms.amp": {"type": "float", "low": 1.0, "high": 0.5}},
                    load_config(None, []))
    assert "2 problems" in str(e.value) and "optim.lrr" in str(e.value)


def test_bad_space_rejected_before_training(tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    space = tmp_path / "bad.yaml"
    space.write_text("rule.terms.amp: {type: float, low: 1.0, high: 0.1}\n")
    out = tmp_path / "out"
    rc = main(["search", "-c", str(SEARCH_CONFIGS / "mnist1d_mlp_base.yaml"), "-s", str(space),
               "--out", str(out), "--trials", "2"])
    assert rc == 2
    assert "empty range" in capsys.readouterr().err
    assert not out.exists()  # no study, no folders: nothing started


# -- search --------------------------------------------------------------------------------------


def test_tiny_search_prunes_and_finishes(tmp_path):
    out = tmp_path / "s"
    res = search(tiny(tmp_path), SPACE, trials=4, study="tiny", out=out, seed=0,
                 pruner=EveryOtherPruner())
    st = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state for t in st.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED] * 2
    for t in st.trials:
        if t.state == optuna.trial.TrialState.PRUNED:
            assert list(t.intermediate_values) == [1] and t.user_attrs["status"] == "pruned"
        else:
            assert sorted(t.intermediate_values) == [1, 2] and t.user_attrs["status"] == "ok"
            # the objective is the last epoch's validation top-1
            assert t.value == t.intermediate_values[2]
    rows = read_csv(out / "trials.csv")
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    best = load_config(out / "best.yaml")
    assert res["best"]["value"] == max(t.value for t in st.trials if t.value is not None
                                       and t.state == optuna.trial.TrialState.COMPLETE)
    assert best.rule.terms["amp"] == pytest.approx(res["best"]["params"]["rule.terms.amp"])
    assert best.rule.noise_std == pytest.approx(res["best"]["params"]["rule.noise_std"])
    assert best.data.val_split == 0.2  # transfer sees the same data as the search
    for png in ("history.png", "importances.png", "curves.png"):
        assert (out / png).stat().st_size > 1000
    # the search never evaluates on the test set for its decisions: the reported values are
    # validation top-1 of each trial's own metrics
    m = read_csv(out / "trials" / "trial-0000" / "metrics.csv")
    assert st.trials[0].value == pytest.approx(m[-1]["val_top1"], rel=1e-5)  # CSV: 6 digits


def test_search_adds_validation_split(tmp_path):
    out = tmp_path / "s"
    search(tiny(tmp_path, "data.val_split=0"), SPACE, trials=1, study="v", out=out)
    assert yaml.safe_load((out / "base.yaml").read_text())["data"]["val_split"] == 0.1
    assert "val_top1" in read_csv(out / "trials" / "trial-0000" / "metrics.csv")[0]


def test_search_from_python_prints_no_optuna_lines(tmp_path):
    """The search logs each trial in one line of its own; Optuna's lines (a study created,
    each trial finished) stay off during the call, and its verbosity is as it was after."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    optuna.logging.set_verbosity(optuna.logging.INFO)  # Optuna's default in a fresh process
    logger = logging.getLogger("optuna")
    keep = Keep()
    logger.addHandler(keep)
    try:
        search(tiny(tmp_path, "train.epochs=1"), SPACE, trials=2, study="q", out=tmp_path / "s")
    finally:
        logger.removeHandler(keep)
    assert not [r.getMessage() for r in records], records
    assert optuna.logging.get_verbosity() == optuna.logging.INFO


def test_diverged_trials_are_recorded_and_the_study_goes_on(tmp_path):
    out = tmp_path / "s"
    # a negative decay makes F grow by 1e7 per feedback step: inf within the first epoch
    space = {"rule.terms.decay": [1.0, -1.0e9]}
    search(tiny(tmp_path, "feedback_optim.name=sgd", "feedback_optim.momentum=0",
                "feedback_optim.lr=0.01"), space, trials=4, study="d", out=out, seed=0,
           startup_trials=4)
    st = optuna.load_study(study_name="d", storage=f"sqlite:///{out / 'study.db'}")
    assert len(st.trials) == 4
    seen = set()
    for t in st.trials:
        if t.params["rule.terms.decay"] < 0:
            assert t.state == optuna.trial.TrialState.FAIL
            assert t.user_attrs["status"] == "diverged" and "diverged" in t.user_attrs["reason"]
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE
        seen.add(t.state)
    assert len(seen) == 2  # both kinds happened under this seed
    rows = read_csv(out / "trials.csv")
    assert {r["status"] for r in rows} == {"ok", "diverged"}


def test_resume_adds_trials_to_the_same_study(tmp_path):
    out = tmp_path / "s"
    base = tiny(tmp_path)
    # no pruning: this test is about which trials count, and tiny runs tie at the median
    never = optuna.pruners.NopPruner()
    search(base, SPACE, trials=2, study="r", out=out, seed=0, pruner=never)
    storage = f"sqlite:///{out / 'study.db'}"
    st = optuna.load_study(study_name="r", storage=storage)
    first = [(t.number, t.params) for t in st.trials]
    # a trial whose process died mid-way: RUNNING, owned by a pid that no longer exists
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    trial = st.ask({k: optuna.distributions.FloatDistribution(0.01, 10.0, log=True)
                    if k == "rule.terms.amp" else optuna.distributions.FloatDistribution(0.2, 2.0)
                    for k in SPACE})
    import socket

    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", int(dead.stdout))
    stale = dict(trial.params)
    # same command, a larger target: the study continues
    search(base, SPACE, trials=4, study="r", out=out, seed=0, pruner=never)
    st = optuna.load_study(study_name="r", storage=storage)
    assert [(t.number, t.params) for t in st.trials[:2]] == first
    interrupted = st.trials[2]
    assert interrupted.state == optuna.trial.TrialState.FAIL
    assert read_csv(out / "trials.csv")[2]["status"] == "interrupted"
    retry = [t for t in st.trials if t.user_attrs.get("retry_of") == 2]
    assert len(retry) == 1 and retry[0].params == pytest.approx(stale)
    finished = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 4 and len(st.trials) == 5  # the interrupted one does not count
    # nothing left to do: a rerun trains nothing
    n = len(st.trials)
    search(base, SPACE, trials=4, study="r", out=out, seed=0, pruner=never)
    assert len(optuna.load_study(study_name="r", storage=storage).trials) == n
    assert len(read_csv(out / "trials.csv")) == n


def test_resume_with_another_space_is_refused(tmp_path):
    out = tmp_path / "s"
    search(tiny(tmp_path), SPACE, trials=1, study="x", out=out)
    other = {"rule.terms.decay": {"type": "log_float", "low": 0.1, "high": 1.0}}
    with pytest.raises(ValueError, match="another space"):
        search(tiny(tmp_path), other, trials=2, study="x", out=out)


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_studies_do_not_share_an_output_folder(tmp_path):
    out = tmp_path / "s"
    search(tiny(tmp_path), SPACE, trials=1, study="a", out=out)
    before = _files(out)
    with pytest.raises(ConfigError, match="holds the outputs of study 'a'.*--study a"):
        search(tiny(tmp_path), SPACE, trials=1, study="b", out=out)
    assert _files(out) == before  # its trials, trials.csv, best.yaml, and no study b
    assert optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}") == ["a"]
    search(tiny(tmp_path), SPACE, trials=2, study="a", out=out)  # a goes on
    assert len(read_csv(out / "trials.csv")) == 2
    search(tiny(tmp_path), SPACE, trials=1, study="b", out=tmp_path / "b")  # b elsewhere


def test_search_cli_two_workers(tmp_path, capsys):
    base, space = _search_files(tmp_path)
    out = tmp_path / "out"
    rc = main(["search", "-c", str(base), "-s", str(space), "--trials", "3", "--jobs", "2",
               "--out", str(out), "--study", "two", "--threads", "1", "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "study two: " in text and "best: trial" in text
    st = optuna.load_study(study_name="two", storage=f"sqlite:///{out / 'study.db'}")
    done = [t for t in st.trials if t.state.is_finished()]
    assert len(done) >= 3 and len(st.trials) <= 4  # at most one extra from a concurrent start
    assert (out / "best.yaml").is_file()


#: A ``neuralign search`` command (argv after the first two arguments) whose first trial starts
#: once ``n`` workers have opened the study (argv[1]: a folder, argv[2]: n), as workers started
#: together do: each has read the study before any of them asked for a trial.
SEARCH_WORKER = """
import os, sys, time
from pathlib import Path

import optuna

from neuralign.cli import main

ready, n = Path(sys.argv[1]), int(sys.argv[2])
optimize = optuna.study.Study.optimize


def together(self, *args, **kwargs):
    mark = ready / str(os.getpid())
    if not mark.exists():
        mark.touch()
        end = time.monotonic() + 120
        while len(list(ready.iterdir())) < n and time.monotonic() < end:
            time.sleep(0.02)
    return optimize(self, *args, **kwargs)


optuna.study.Study.optimize = together
sys.exit(main(sys.argv[3:]))
"""


def _search_workers(tmp_path: Path, n: int, *argv: str) -> list[subprocess.Popen]:
    ready = tmp_path / f"ready-{len(list(tmp_path.glob('ready-*')))}"
    ready.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH"))
                                        if p)
    return [subprocess.Popen([sys.executable, "-c", SEARCH_WORKER, str(ready), str(n), "search",
                              *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(n)]


def _search_files(tmp_path: Path) -> tuple[Path, Path]:
    """A base config (a tiny MLP under wm, one epoch) and the search space, in ``tmp_path``."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"num_samples": 300, "batch_size": 40,
                                             "val_split": 0.2},
                                    "model": {"name": "mlp", "widths": [8]},
                                    "rule": {"name": "wm"},
                                    "train": {"epochs": 1, "angle_every": 0,
                                              "runs_dir": str(tmp_path)}}))
    return base, space


def _shared_study(tmp_path: Path) -> list[str]:
    """The arguments of a search command on the study ``shared`` in ``tmp_path/out``, random
    sampling throughout, no pruning."""
    base, space = _search_files(tmp_path)
    return ["-c", str(base), "-s", str(space), "--out", str(tmp_path / "out"), "--study",
            "shared", "--startup-trials", "50", "--pruner", "none", "--threads", "1", "-q"]


def _params(trials) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in trials]


def test_two_search_commands_on_one_study_sample_differently(tmp_path):
    """Two ``neuralign search`` processes on one SQLite study, started together, neither given
    a seed of its own: no two trials get the same values."""
    workers = _search_workers(tmp_path, 2, *_shared_study(tmp_path), "--trials", "4")
    for w in workers:
        assert w.wait(timeout=300) == 0, w.stdout.read()
    storage = f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    values = _params(trials)
    assert len(trials) >= 4 and len(set(values)) == len(values), values
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both took trials


@pytest.mark.slow
def test_a_search_worker_killed_and_started_again(tmp_path):
    """kill -9 of a worker in a trial, then the same command again: the trial's values are
    tried again, once, the study reaches its target, and no other values repeat."""
    argv = [*_shared_study(tmp_path), "--trials", "3", "train.epochs=20"]  # (time to catch one)
    storage = f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    (worker,) = _search_workers(tmp_path, 1, *argv)
    while not (tmp_path / "out" / "space.yaml").exists():  # (written once the study is)
        assert worker.poll() is None, worker.stdout.read()
        time.sleep(0.01)
    running = kill_mid_trial(
        lambda: optuna.load_study(study_name="shared", storage=storage).get_trials(),
        tmp_path / "out", pid_of=lambda t: worker.pid)
    worker.wait()
    (worker,) = _search_workers(tmp_path, 1, *argv)
    assert worker.wait(timeout=300) == 0, worker.stdout.read()
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert trials[running.number].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.user_attrs.get("retry_of") == running.number]
    assert len(retries) == 1 and retries[0].params == running.params
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 3
    fresh = _params(t for t in trials if "retry_of" not in t.user_attrs)
    assert len(set(fresh)) == len(fresh)


# -- transfer, robustness, skipping --------------------------------------------------------------


def test_parse_models():
    assert split_list("a,b:x=[1,2],c") == ["a", "b:x=[1,2]", "c"]
    specs = parse_models("resnet20,deep=mlp:widths=[8,8]:model.shortcut=B")
    assert specs[0].name == "resnet20" and specs[0].overrides == ()
    assert specs[1].label == "deep" and specs[1].overrides == ("model.widths=[8,8]",
                                                               "model.shortcut=B")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_models("mlp:widths")


def test_transfer_table_and_skip(tmp_path, monkeypatch):
    base = tiny(tmp_path, "train.epochs=1")
    bp = tiny(tmp_path, "train.epochs=1", "rule.name=bp")
    models = parse_models("mlp:widths=[8],mlp:widths=[8,8,8]")
    res = transfer([("wm", base), ("bp", bp)], models, tmp_path / "t", seeds=[0, 1])
    assert [(r["rule"], r["model"], r["seed"]) for r in res["runs"]] == [
        ("wm", "mlp-2", 0), ("wm", "mlp-2", 1), ("bp", "mlp-2", 0), ("bp", "mlp-2", 1),
        ("wm", "mlp-4", 0), ("wm", "mlp-4", 1), ("bp", "mlp-4", 0), ("bp", "mlp-4", 1)]
    assert all(r["status"] == "ok" and math.isfinite(r["test_top1"]) for r in res["runs"])
    lines = res["table"].splitlines()
    assert lines[0] == "| rule | mlp-2 (2 layers) | mlp-4 (4 layers) |"
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["wm", "bp"]
    assert "±" in lines[2]
    assert len(read_csv(tmp_path / "t" / "transfer.csv")) == 8
    assert len(read_csv(tmp_path / "t" / "transfer_summary.csv")) == 4
    assert (tmp_path / "t" / "transfer.png").stat().st_size > 1000
    # a restart trains nothing and reports the same numbers
    _no_training(monkeypatch)
    again = transfer([("wm", base), ("bp", bp)], models, tmp_path / "t", seeds=[0, 1])
    assert all(r["skipped"] for r in again["runs"])
    assert again["table"] == res["table"]


def test_transfer_checks_the_models_before_making_a_folder(tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        transfer([("wm", tiny(tmp_path))], parse_models("mlp,nope"), tmp_path / "t")
    assert not (tmp_path / "t").exists()
    config = tmp_path / "wm.yaml"
    config.write_text(f"rule: {{name: wm}}\ntrain: {{runs_dir: {tmp_path / 'runs'}}}\n")
    assert main(["transfer", "-c", str(config), "--models", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no runs/transfer/wm/


def test_robustness_table_and_skip(tmp_path, monkeypatch):
    base = tiny(tmp_path, "train.epochs=1", "rule.name=ia")
    res = robustness(base, ["sa", "bp"], [0.0, 0.01], tmp_path / "r")
    assert [(r["rule"], r["sigma"]) for r in res["runs"]] == [("sa", 0.0), ("sa", 0.01),
                                                              ("bp", 0.0)]
    lines = res["table"].splitlines()
    assert lines[0] == "| rule | σ=0 | σ=0.01 |"
    assert lines[2].startswith("| sa |") and lines[3].startswith("| bp (no learned F) |")
    cfgs = [yaml.safe_load(p.read_text()) for p in
            sorted((tmp_path / "r" / "runs").glob("sa-*/config.yaml"))]
    assert sorted(c["rule"]["update_noise"] for c in cfgs) == [0.0, 0.01]
    assert all(c["rule"]["terms"] == {} for c in cfgs)  # sa's catalog defaults, not ia's
    _no_training(monkeypatch)
    again = robustness(base, ["sa", "bp"], [0.0, 0.01], tmp_path / "r")
    assert all(r["skipped"] for r in again["runs"]) and again["table"] == res["table"]


def test_robustness_cli(tmp_path, capsys):
    rc = main(["robustness", "--rules", "sa", "--noise", "0,1e-3", "--out", str(tmp_path / "o"),
               "--epochs", "1", "-q", "data.num_samples=300", "data.batch_size=40",
               "model.name=mlp", "model.widths=[8]", "train.angle_every=0",
               f"train.runs_dir={tmp_path}"])
    assert rc == 0
    assert "| sa |" in capsys.readouterr().out
    assert main(["robustness", "--noise", "0,x", "--out", str(tmp_path / "o")]) == 2
    # σ in weight units: every learned rule's runs carry update_noise_units=weight
    rc = main(["robustness", "--rules", "sa,fa", "--noise", "1e-3", "--noise-units", "weight",
               "--out", str(tmp_path / "w"), "--epochs", "1", "-q", "data.num_samples=300",
               "data.batch_size=40", "model.name=mlp", "model.widths=[8]",
               "train.angle_every=0", f"train.runs_dir={tmp_path}"])
    assert rc == 0
    (sa,) = (tmp_path / "w" / "runs").glob("sa-noise0.001-weight-s0-*/config.yaml")
    rule = yaml.safe_load(sa.read_text())["rule"]
    assert (rule["update_noise"], rule["update_noise_units"]) == (0.001, "weight")
    assert yaml.safe_load((tmp_path / "w" / "robustness.yaml").read_text())["units"] == "weight"


def test_interrupted_run_continues_from_checkpoint(tmp_path):
    cfg = tiny(tmp_path, "train.epochs=3")
    root = tmp_path / "root"
    name = f"one-{run_key(cfg)}"

    class Stop(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            if epoch == 2:
                raise KeyboardInterrupt

    c = tiny(tmp_path, "train.epochs=3", f"train.runs_dir={root / 'runs'}", f"train.name={name}")
    with pytest.raises(KeyboardInterrupt):
        Trainer(c, callbacks=[Stop()]).fit()
    assert not (root / "runs" / name / "result.yaml").exists()
    r = run_once(cfg, root, "one")
    assert not r["skipped"] and r["epochs"] == 3 and r["status"] == "ok"
    rows = read_csv(root / "runs" / name / "metrics.csv")
    assert [int(x["epoch"]) for x in rows] == [1, 2, 3]


def test_run_key_ignores_volatile_keys(tmp_path):
    a = tiny(tmp_path)
    b = tiny(tmp_path / "elsewhere", "train.progress=true", "train.name=x")
    c = tiny(tmp_path, "optim.lr=0.01")
    assert run_key(a) == run_key(b) != run_key(c)


def test_write_yaml_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    write_yaml({"a": 1}, path)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_yaml({"a": 2}, path)
    assert yaml.safe_load(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.yaml"]  # no temporary left behind


@pytest.mark.parametrize("cmd", ["search", "transfer", "robustness"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_a_trial_killed_after_its_result_was_recorded_is_interrupted():
    """The objective records ``ok`` (or ``pruned``) just before Optuna stores the result: a
    process killed in between leaves a failed trial with that status. It must be retried and
    must not count, like any killed trial; failures the objective records stay failures."""
    from neuralign.experiments.search import _counts
    from neuralign.experiments.search_outputs import interrupted

    st = optuna.create_study(direction="maximize")
    for status in ("ok", "pruned", None, "interrupted", "diverged", "error", "surplus"):
        t = st.ask()
        if status is not None:
            t.set_user_attr("status", status)
        st.tell(t, state=optuna.trial.TrialState.FAIL)
    assert [interrupted(t) for t in st.trials] == [True] * 4 + [False] * 3
    assert [_counts(t) for t in st.trials] == [False] * 4 + [True, True, False]
