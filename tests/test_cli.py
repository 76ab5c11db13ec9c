"""The ``neuralign`` command end to end, on tiny budgets."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neuralign as na
import runs
from neuralign.cli import main


def tiny(tmp_path: Path) -> list[str]:
    """The shared tiny run (``tests/runs.py``) as command-line overrides."""
    return runs.tiny(tmp_path, "train.tensorboard=true", "train.plots=true")


def test_train_end_to_end(tmp_path, capsys):
    assert main(["train", "--name", "cli", *tiny(tmp_path), "train.tensorboard=false"]) == 0
    err = capsys.readouterr().err
    # the end-of-epoch line: train loss, test top-1, mean weight angle
    assert "epoch 1/2  train loss" in err and "test top-1" in err and "weight angle" in err
    run = tmp_path / "runs" / "cli"
    for f in ("config.yaml", "metrics.csv", "checkpoints/last.pt", "plots/accuracy.png",
              "plots/angles.png"):
        assert (run / f).is_file(), f
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]

    # --resume continues from the checkpoint; overrides may extend the run
    assert main(["train", "--resume", str(run), "--no-progress", "train.epochs=3"]) == 0
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 3
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["epoch"] == 3

    # plot redraws from metrics.csv
    (run / "plots" / "accuracy.png").unlink()
    assert main(["plot", "cli", "--runs-dir", str(tmp_path / "runs")]) == 0
    assert (run / "plots" / "accuracy.png").is_file()


def test_train_report_is_logged_at_the_start_and_changes_nothing(tmp_path, capsys):
    """train.report=true: the table before the first epoch, in report.txt too, and the same
    run as without it."""
    assert main(["train", "--name", "rep", *runs.tiny(tmp_path, "train.report=true")]) == 0
    err = capsys.readouterr().err
    assert err.index("neuralign report:") < err.index("epoch 1/2")
    text = (tmp_path / "runs" / "rep" / "report.txt").read_text()
    assert "error via" in text and "FeedbackConv1d" in text and "bypassed" in text
    assert main(["train", "--name", "plain", *runs.tiny(tmp_path)]) == 0
    a, b = (torch.load(tmp_path / "runs" / n / "checkpoints/last.pt", weights_only=True)["model"]
            for n in ("rep", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: mlp, widths: [16]}\nrule: {name: kp}\n")
    assert main(["train", "-c", str(cfg), "--name", "mlp", *tiny(tmp_path),
                 "train.plots=false", "train.tensorboard=false"]) == 0
    saved = (tmp_path / "runs" / "mlp" / "config.yaml").read_text()
    assert "name: mlp" in saved and "widths: [16]" in saved and "name: kp" in saved


@pytest.mark.parametrize("args,message", [
    (["optim.lrr=0.1"], "valid keys: optim.name, optim.lr"),
    (["optim.lr=fast"], "optim.lr: expected float"),
    (["rule.name=nope"], "valid: aa, bp"),
    (["model.name=nope"], "valid: charlm, cnn1d, gpt2, gru1d, lenet, mlp"),
    (["data.name=nope"], "valid: cifar10, cifar100"),
    (["--config", "/nonexistent.yaml"], "does not exist"),
    (["data.name=mnist", "data.data_dir=/nonexistent"], "MNIST/raw/train-images-idx3-ubyte"),
])
def test_train_errors_are_clear(tmp_path, capsys, args, message):
    assert main(["train", "--runs-dir", str(tmp_path), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_resume_missing_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no run folder" in capsys.readouterr().err


def test_divergence_exit_code(tmp_path, capsys):
    code = main(["train", "--name", "div", *tiny(tmp_path), "rule.name=fa", "optim.name=sgd",
                 "optim.lr=1e12", "optim.momentum=0", "train.tensorboard=false"])
    assert code == 3
    assert "diverged at epoch 1" in capsys.readouterr().err


def test_compare_tiny(tmp_path, capsys):
    args = ["compare", "--rules", "bp,fa,kp", "--name", "cmp", *tiny(tmp_path),
            "train.plots=false", "train.tensorboard=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| rule | final top-1 (%)" in out
    for rule in ("bp", "fa", "kp"):
        assert f"| {rule} |" in out
    folder = tmp_path / "runs" / "cmp"
    rows = list(csv.DictReader(open(folder / "compare.csv")))
    assert [r["rule"] for r in rows] == ["bp", "fa", "kp"]
    assert all(r["status"] == "ok" and float(r["final_top1"]) >= 0 for r in rows)
    assert rows[0]["weight_angle"] == "nan" and 0 < float(rows[1]["weight_angle"]) < 180
    assert (folder / "compare.png").stat().st_size > 1000
    # same seed and data per rule: fa's W starts where bp's does
    (fa_run,) = (folder / "runs").glob("fa-*")
    fa = torch.load(fa_run / "checkpoints/last.pt", weights_only=True)
    assert fa["config"]["train"]["seed"] == 0 and fa["config"]["rule"]["name"] == "fa"
    # a restarted comparison trains nothing: every rule finished
    stamp = (fa_run / "checkpoints/last.pt").stat().st_mtime_ns
    assert main(args) == 0
    assert (fa_run / "checkpoints/last.pt").stat().st_mtime_ns == stamp
    assert "finished earlier" in capsys.readouterr().err


def test_compare_unknown_rule(tmp_path, capsys):
    assert main(["compare", "--rules", "bp,xx", "--runs-dir", str(tmp_path)]) == 2
    assert "valid: aa, bp" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["compare", "--rules", "bp"],
                                     ["robustness", "--rules", "fa", "--noise", "0"]])
def test_an_unknown_model_leaves_no_folder(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)  # (robustness writes under ./runs)
    assert main([*command, "--name", "x", "model.name=nosuch", "train.runs_dir=runs"]) == 2
    assert "unknown model 'nosuch'; valid: charlm" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no folder, no config, no data loaded


def test_rules_lists_the_catalog(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    for e in na.rules.catalog():
        assert f"\n{e.name}\n" in "\n" + out
    assert "source:" in out and "terms: amp=1" in out
    assert main(["rules", "--names"]) == 0
    assert capsys.readouterr().out.split() == na.list_rules()


@pytest.mark.parametrize("cmd", [[], ["train"], ["compare"], ["plot"], ["rules"]])
def test_help_everywhere(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: neuralign" in capsys.readouterr().out


def test_python_dash_m(tmp_path):
    env = dict(os.environ, NEURALIGN_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "neuralign", "rules", "--names"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == na.list_rules()


def test_print_config_round_trips(tmp_path, capsys):
    config = Path(__file__).parent.parent / "configs" / "imagenet_resnet50.yaml"
    assert main(["train", "--print-config", "-c", str(config),
                 "optim.lr=1e-2", "rule.layers.fc=bp"]) == 0
    out = capsys.readouterr().out
    f = tmp_path / "resolved.yaml"
    f.write_text(out)
    from neuralign.train import load_config

    cfg = load_config(f)
    assert cfg.model.name == "resnet50" and cfg.optim.lr == 0.01
    assert cfg.rule.layers == {"fc": "bp"} and cfg.optim.schedule.milestones == [30, 60, 80]


def test_help_lists_each_command_once(capsys):
    from neuralign.cli import build_parser

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in build_parser().commands:
        lines = [ln for ln in out.splitlines() if ln.split()[:1] == [command]]
        assert len(lines) == 1, (command, out)
        assert len(lines[0].split()) > 1, (command, out)  # its help beside it, not wrapped


def test_every_option_is_documented():
    """docs/cli.md documents train, compare, rules and fetch (the other commands' own pages:
    guides/experiments.md and protocol.md)."""
    from neuralign.cli import build_parser

    docs = Path(__file__).parents[1] / "docs"
    cli = (docs / "cli.md").read_text()
    experiments = cli + (docs / "protocol.md").read_text() + (
        docs / "guides" / "experiments.md").read_text()
    missing = []
    for command, parser in build_parser().commands.items():
        text = experiments if command in ("search", "transfer", "robustness") else cli
        for action in parser._actions:
            names = [o for o in action.option_strings if o not in ("-h", "--help")]
            if names and not any(re.search(rf"{re.escape(o)}\b", text) for o in names):
                missing.append(f"{command} {'/'.join(names)}")
    assert not missing, missing
    assert "[--threads N]" in cli
