"""PNG plots of a run (accuracy and loss curves, per-layer angles) and of a comparison."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from ..io import pyplot, read_csv, save_figure, whole_number_ticks

__all__ = ["plot_history", "plot_run", "plot_compare"]


def _col(history: Sequence[dict], key: str) -> list[float]:
    return [float(h.get(key, math.nan)) for h in history]


def _finite(values: list[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def plot_history(history: Sequence[dict], out_dir: str | Path, title: str = "") -> list[Path]:
    """``accuracy.png`` (top-1 and loss per epoch) and ``angles.png`` (per-layer weight,
    local gradient and end-to-end angles, and the lag of F behind its rule's fixed point, per
    epoch) in ``out_dir``; returns the paths."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = _col(history, "epoch")
    paths = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_top1", "train"), ("val_top1", "validation"),
                       ("test_top1", "test")):
        ys = _col(history, key)
        if _finite(ys):
            ax1.plot(epochs, ys, marker=".", label=label)
    ax1.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    ax1.legend()
    ax1.grid(alpha=0.3)
    whole_number_ticks(ax1)
    for key, label in (("train_loss", "train"), ("val_loss", "validation"),
                       ("test_loss", "test")):
        ys = _col(history, key)
        if _finite(ys):
            ax2.plot(epochs, ys, marker=".", label=label)
    ax2.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.legend()
    ax2.grid(alpha=0.3)
    whole_number_ticks(ax2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "accuracy.png"))

    kinds = [("weight_angle", "weight angle ∠(W, F)", "degrees"),
             ("gradient_angle", "local gradient angle", "degrees"),
             ("backprop_angle", "end-to-end angle vs backprop", "degrees"),
             ("feedback_lag", "lag ‖F − F*‖ / ‖F*‖", "relative distance (log)"),
             ("estimate_angle", "weight estimate ∠(Ŵ, W)", "degrees")]
    keys = sorted({k for h in history for k in h})
    present = [(k, t, u) for k, t, u in kinds
               if any(_finite(_col(history, c)) for c in keys if c.startswith(k + "/"))]
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(5 * max(1, len(present)), 4),
                             squeeze=False)
    for ax, (kind, label, unit) in zip(axes[0], present, strict=False):
        for c in [c for c in keys if c.startswith(kind + "/")]:
            ys = _col(history, c)
            if _finite(ys):
                ax.plot(epochs, ys, label=c.split("/", 1)[1])
        if kind == "feedback_lag" and any(
                y > 0 for c in keys if c.startswith(kind + "/") for y in _col(history, c)):
            ax.set_yscale("log")  # (kp reaches exactly zero: no log scale then)
        ax.set(xlabel="epoch", ylabel=unit, title=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
        whole_number_ticks(ax)
    if not present:
        axes[0][0].text(0.5, 0.5, "no feedback layers (backprop)", ha="center", va="center")
        axes[0][0].set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "angles.png"))
    return paths


def plot_run(run_dir: str | Path) -> list[Path]:
    """Redraw a run folder's plots from its ``metrics.csv``."""
    run_dir = Path(run_dir)
    csv_path = run_dir / "metrics.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{str(csv_path)!r} does not exist: is {str(run_dir)!r} a run "
                                f"folder that finished at least one epoch?")
    try:
        history = read_csv(csv_path)
    except (UnicodeDecodeError, ValueError, csv.Error) as e:
        raise ValueError(f"{str(csv_path)!r} is not a readable metrics CSV ({e}); the "
                         f"checkpoint holds the same rows (its 'history'), and a resumed run "
                         f"rewrites the file at the end of its next epoch") from None
    if not history:
        raise ValueError(f"{str(csv_path)!r} has no rows")
    return plot_history(history, run_dir / "plots", title=run_dir.name)


def plot_compare(results: dict[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """Test top-1 and mean weight angle per epoch, one line per rule."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("tab10" if len(results) <= 10 else "tab20")
    for i, (rule, history) in enumerate(results.items()):
        color = cmap(i % cmap.N)  # one colour per rule in both panels
        ep = _col(history, "epoch")
        ax1.plot(ep, _col(history, "test_top1"), marker=".", ms=3, color=color, label=rule)
        angle = _col(history, "weight_angle")
        if _finite(angle):
            ax2.plot(ep, angle, marker=".", ms=3, color=color, label=rule)
    ax1.set(xlabel="epoch", ylabel="test top-1 (%)", title="accuracy")
    ax2.set(xlabel="epoch", ylabel="degrees", title="mean weight angle ∠(W, F)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        whole_number_ticks(ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
