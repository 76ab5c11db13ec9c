"""Weight estimation: the estimate's error and cost against its budget.

For each estimator (``rdd`` on thresholded units, ``rdd`` on leaky integrate-and-fire units,
``perturb``) and budget (trials per estimation phase), one
estimation phase on

* a single ``nn.Linear(100, 50)`` with torch's initialisation, and
* each layer of a trained network: the default MNIST-1D CNN (``neuralign train``'s default
  model) trained with backprop for a few epochs, so the weights have left their initialisation,

reporting the angle ∠(Ŵ, W), the relative error ‖Ŵ − W‖/‖W‖ (median over repeats with
different seeds) and the phase's wall time. The estimators never see W; this script does, to
measure them.

    python benchmarks/weight_estimation.py --threads 2 --plot error-vs-budget.png
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import neuralign as na
from neuralign import estimate
from neuralign.ops import ops_for
from neuralign.rules import WeightEstimate

#: column label -> (method, unit)
ESTIMATORS = {"rdd": ("rdd", "threshold"), "rdd lif": ("rdd", "lif"),
              "perturb": ("perturb", "threshold")}


def measure(layer: nn.Module, method: str, unit: str, samples: int,
            repeats: int) -> tuple[float, ...]:
    ops, W = ops_for(layer), layer.weight.detach()

    def drive(s):
        return ops.apply(s, W)

    angles, errors, times = [], [], []
    for seed in range(repeats):
        est = WeightEstimate(method, samples=samples, unit=unit)
        t0 = time.perf_counter()
        W_hat = estimate.estimate(ops, drive, W.shape, est, torch.Generator().manual_seed(seed))
        times.append(time.perf_counter() - t0)
        angles.append(na.metrics.angle(W_hat, W))
        errors.append(float((W_hat - W).norm() / W.norm()))
    return statistics.median(angles), statistics.median(errors), statistics.median(times)


def trained_cnn(epochs: int) -> nn.Module:
    import tempfile

    from neuralign.train import Trainer, load_config

    with tempfile.TemporaryDirectory() as runs:
        cfg = load_config(None, ["rule.name=bp", f"train.epochs={epochs}",
                                 f"train.runs_dir={runs}", "train.name=bp",
                                 "train.progress=false"])
        trainer = Trainer(cfg)
        trainer.fit()
    return trainer.model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="500,2000,8000,32000")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10, help="backprop epochs of the trained CNN")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--plot", help="also draw the angle against the budget into this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    torch.manual_seed(0)
    layers = [("Linear(100, 50), at init", nn.Linear(100, 50))]
    model = trained_cnn(args.epochs)
    layers += [(f"MNIST-1D CNN `{name}` ({type(m).__name__}, W {tuple(m.weight.shape)}), "
                f"trained", m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear | nn.Conv1d)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          f"{args.repeats} phases; angle in degrees, relative error, ms per phase\n")
    print("| layer | trials | " + " | ".join(f"{e} angle | {e} error | {e} ms"
                                             for e in ESTIMATORS) + " |")
    print("|---|---|" + "---|---|---|" * len(ESTIMATORS))
    angles: dict[tuple[str, str], list[float]] = {}
    for label, layer in layers:
        for T in budgets:
            cells = []
            for name, (method, unit) in ESTIMATORS.items():
                a, e, t = measure(layer, method, unit, T, args.repeats)
                angles.setdefault((label, name), []).append(a)
                cells.append(f"{a:.1f} | {e:.3f} | {t * 1e3:.1f}")
            print(f"| {label} | {T} | " + " | ".join(cells) + " |", flush=True)
    if args.plot:
        plot(angles, budgets, args.plot)


def plot(angles: dict[tuple[str, str], list[float]], budgets: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for label, _ in angles))
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3.2), sharey=True)
    for ax, label in zip(axes, labels, strict=True):
        for name in ESTIMATORS:
            ax.loglog(budgets, angles[label, name], marker="o", label=name)
        ax.set_title(label.rsplit(", ", 1)[0].replace("MNIST-1D CNN ", ""), fontsize=7)
        ax.set_xlabel("trials per phase")
    axes[0].set_ylabel("∠(Ŵ, W), degrees")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
