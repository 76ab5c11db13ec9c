"""A search's outputs: one row per trial (``trials.csv``), the best config (``best.yaml``,
``best_trial.yaml``) and the three plots (optimisation history, per-epoch curves, parameter
importances), all written atomically."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ..io import pyplot as plt
from ..io import save_figure as savefig_atomic
from ..io import whole_number_ticks, write_csv, write_yaml
from ..train.config import Config, config_to_dict
from .space import apply_params

log = logging.getLogger("neuralign.experiments.search")

__all__ = ["SearchResult", "study_summary", "write_outputs", "interrupted"]


class SearchResult(dict):
    """``best`` (number, value, params, or None), ``trials`` (rows), ``out``, ``study``."""


def interrupted(t) -> bool:
    """A failed trial the search did not fail itself: its process died (a kill, or a machine
    whose heartbeat stopped) or was interrupted. Every failure the objective handles records
    a status (diverged, error, surplus); Ctrl-C records ``interrupted``. A process killed
    after the objective recorded ``ok`` or ``pruned`` but before Optuna stored the result
    leaves that status on a failed trial: interrupted too."""
    from optuna.trial import TrialState

    return t.state == TrialState.FAIL and t.user_attrs.get("status") not in (
        "diverged", "error", "surplus")


def study_summary(study) -> list[dict[str, Any]]:
    """One row per trial: number, state, status, value, epochs, duration, reason, params."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        dur = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else math.nan
        inter = t.intermediate_values
        row = {"number": t.number, "state": t.state.name,
               "status": "interrupted" if interrupted(t) else t.user_attrs.get("status", ""),
               "value": t.value if t.value is not None else math.nan,
               "last_val_top1": inter[max(inter)] if inter else math.nan,
               "epochs": t.user_attrs.get("epochs", len(inter)),
               "duration_s": dur}
        row.update({k: v for k, v in t.params.items()})
        row["retry_of"] = t.user_attrs.get("retry_of", "")
        row["reason"] = t.user_attrs.get("reason", "")
        rows.append(row)
    return rows


def write_outputs(study, base: Config, out: str | Path) -> SearchResult:
    """``trials.csv``, ``best.yaml`` and the plots of a study (atomically)."""
    from optuna.trial import TrialState

    out = Path(out)
    rows = study_summary(study)
    if rows:
        write_csv(rows, out / "trials.csv")
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = None
    if complete:
        bt = study.best_trial
        best_cfg = apply_params(base, bt.params)
        best_cfg.train.name = ""
        d = config_to_dict(best_cfg)
        header = {"search": {"study": study.study_name, "trial": bt.number,
                             "val_top1": bt.value, "params": dict(bt.params)}}
        write_yaml(d, out / "best.yaml")
        write_yaml(header, out / "best_trial.yaml")
        best = {"number": bt.number, "value": bt.value, "params": dict(bt.params)}
    else:
        log.warning("search: no trial completed, so there is no best.yaml")
    _plot_history(study, out / "history.png")
    _plot_curves(study, out / "curves.png")
    _plot_importances(study, out / "importances.png")
    return SearchResult(best=best, trials=rows, out=out, study=study)


def _plot_history(study, path: Path) -> None:
    from optuna.trial import TrialState

    p = plt()
    fig, ax = p.subplots(figsize=(7, 4))
    trials = study.get_trials(deepcopy=False)
    comp = [(t.number, t.value) for t in trials if t.state == TrialState.COMPLETE]
    pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)])
              for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    failed = [t.number for t in trials if t.state == TrialState.FAIL and not interrupted(t)
              and t.user_attrs.get("status") != "surplus"]
    if comp:
        ax.plot(*zip(*comp, strict=True), "o", label="complete (final val top-1)")
        best, xs, ys = -math.inf, [], []
        for n, v in sorted(comp):
            best = max(best, v)
            xs.append(n)
            ys.append(best)
        ax.step(xs, ys, where="post", color="C3", label="best so far")
    if pruned:
        ax.plot(*zip(*pruned, strict=True), "x", color="C7", label="pruned (last reported)")
    if failed:
        lo = min([v for _, v in comp + pruned] or [0.0])
        ax.plot(failed, [lo] * len(failed), "v", color="k", label="diverged / failed")
    ax.set(xlabel="trial", ylabel="validation top-1 (%)",
           title=f"study {study.study_name}: optimisation history")
    ax.grid(alpha=0.3)
    whole_number_ticks(ax)
    if comp or pruned or failed:
        ax.legend(fontsize="small")
    fig.tight_layout()
    savefig_atomic(fig, path)
    p.close(fig)


def _plot_curves(study, path: Path) -> None:
    from optuna.trial import TrialState

    p = plt()
    fig, ax = p.subplots(figsize=(7, 4))
    labelled: set[str] = set()
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        kind, style = {TrialState.COMPLETE: ("complete", dict(color="C0", alpha=0.8)),
                       TrialState.PRUNED: ("pruned", dict(color="C7", alpha=0.6,
                                                          linestyle="--"))}.get(
            t.state, ("failed / running", dict(color="k", alpha=0.4, linestyle=":")))
        ax.plot(steps, [t.intermediate_values[s] for s in steps],
                label=kind if kind not in labelled else "_nolegend_", **style)
        labelled.add(kind)
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)",
           title="per-epoch validation top-1, one line per trial")
    ax.grid(alpha=0.3)
    whole_number_ticks(ax)
    if labelled:
        ax.legend(fontsize="small")
    fig.tight_layout()
    savefig_atomic(fig, path)
    p.close(fig)


def _plot_importances(study, path: Path) -> None:
    import warnings

    import optuna
    from optuna.trial import TrialState

    p = plt()
    fig, ax = p.subplots(figsize=(7, 3.5))
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    try:
        if n < 3:
            raise ValueError(f"{n} complete trial(s); importances need at least 3")
        try:  # Optuna's default (fANOVA) needs scikit-learn; PED-ANOVA needs nothing extra
            import sklearn  # noqa: F401

            evaluator, what = optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
        except ImportError:
            evaluator, what = optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
        names = list(imp)[::-1]
        ax.barh(names, [imp[k] for k in names])
        ax.set(xlabel=f"importance ({what}, normalised)",
               title=f"parameter importances ({n} complete trials)")
    except Exception as e:  # too few or too uniform trials: say so in the picture
        log.info("search: no parameter importances: %s", e)
        ax.text(0.5, 0.5, f"no importances: {e}", ha="center", va="center", wrap=True)
        ax.set_axis_off()
    fig.tight_layout()
    savefig_atomic(fig, path)
    p.close(fig)
