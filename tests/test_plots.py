"""Every plot the package writes: whole-number ticks on whole-number axes (epochs, trials,
depths), and a legend wherever an axes draws several lines."""

from __future__ import annotations

import math

import matplotlib
import optuna
import pytest
from matplotlib.figure import Figure

from neuralign.experiments.robustness import plot_robustness
from neuralign.experiments.search_outputs import _plot_curves, _plot_history
from neuralign.experiments.transfer import plot_transfer
from neuralign.train.plots import plot_compare, plot_history

matplotlib.use("Agg")

WHOLE = ("epoch", "trial", "depth")


@pytest.fixture
def figures(monkeypatch):
    """The figures saved during a test, checked as they are saved."""
    saved: list[Figure] = []
    original = Figure.savefig

    def keep(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def _check(fig: Figure) -> list[str]:
    problems = []
    for ax in fig.axes:
        if not ax.axison:
            continue
        label, title = ax.get_xlabel(), ax.get_title()
        if label.split(" ")[0] in WHOLE:
            lo, hi = sorted(ax.get_xlim())
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            if any(t != round(t) for t in ticks):
                problems.append(f"{title!r}: {label} ticks {ticks}")
        drawn = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
        if len(drawn) > 1 and ax.get_legend() is None:
            problems.append(f"{title!r}: {len(drawn)} lines, no legend")
    return problems


def _history(epochs: int = 3) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train_top1": 50 + e, "test_top1": 48 + e, "train_loss": 1 / e,
               "test_loss": 1.1 / e, "weight_angle": 60 - e}
        for layer in ("0", "2"):
            row[f"weight_angle/{layer}"] = 60 - e
            row[f"gradient_angle/{layer}"] = 50 - e
            row[f"feedback_lag/{layer}"] = 0.5 / e
        rows.append(row)
    return rows


def test_run_and_compare_plots(tmp_path, figures):
    plot_history(_history(), tmp_path)
    plot_compare({"sa": _history(), "ia": _history(2)}, tmp_path / "compare.png")
    assert len(figures) == 3
    assert [p for fig in figures for p in _check(fig)] == []


def test_search_plots(tmp_path, figures):
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for n, (state, values) in enumerate([
            ("COMPLETE", {1: 40.0, 2: 50.0, 3: 55.0}), ("PRUNED", {1: 20.0}),
            ("COMPLETE", {1: 45.0, 2: 52.0, 3: 60.0})]):
        study.add_trial(optuna.trial.create_trial(
            params={"x": n / 3}, distributions=dist, intermediate_values=values,
            state=optuna.trial.TrialState[state],
            value=values[max(values)] if state == "COMPLETE" else None))
    _plot_history(study, tmp_path / "history.png")
    _plot_curves(study, tmp_path / "curves.png")
    assert len(figures) == 2
    assert [p for fig in figures for p in _check(fig)] == []
    curves = figures[1].axes[0]
    assert [t.get_text() for t in curves.get_legend().get_texts()] == ["complete", "pruned"]


def test_transfer_and_robustness_plots(tmp_path, figures):
    summary = [{"rule": r, "model": f"mlp-{d}", "depth": d, "test_top1": 50.0 + d,
                "test_top1_std": 1.0} for r in ("sa", "bp") for d in (2, 3, 5)]
    plot_transfer(summary, ["sa", "bp"], tmp_path / "transfer.png")
    summary = [{"rule": r, "sigma": s, "test_top1": 50.0 if s < 1 else math.nan,
                "test_top1_std": 0.5} for r in ("sa", "ia") for s in (0.0, 0.01, 1.0)]
    plot_robustness(summary, ["sa", "ia"], [0.0, 0.01, 1.0], tmp_path / "robustness.png")
    assert len(figures) == 2
    assert [p for fig in figures for p in _check(fig)] == []
