"""Rebuild docs/results.md's "dfa on transformers as Launay et al." table from the per-run CSVs
beside this file (each run's ``metrics.csv``, one row per epoch), named
``<model>-<variant>-s<seed>.csv``: model ``tf`` (the MNIST-1D transformer, 100 epochs) or
``lm`` (the character language model, 15 epochs); the variants are listed in VARIANTS.

    python docs/results/dfa-transformers/table.py
"""

import math
from pathlib import Path

from neuralign.io import markdown_table, mean_std, read_csv

HERE = Path(__file__).parent
MODELS = (("tf", "MNIST-1D transformer"), ("lm", "character LM"))
VARIANTS = (
    ("bp", "backprop"),
    ("dfa", "dfa at every layer's input, e at the output"),
    ("dfapt", "points at block outputs, e at the output"),
    ("dfapt-head", "points at block outputs, e at the head's input (Launay et al.'s macro)"),
    ("dfapt-head-lr1e-4", "the same, Adam 1e-4"),
)


def cell(values: list[float], digits: int) -> str:
    m, s = mean_std(values)
    if m != m:
        return "–"
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def runs(model: str, variant: str) -> list[list[dict]]:
    return [read_csv(p) for p in sorted(HERE.glob(f"{model}-{variant}-s[0-9]*.csv"))]


def main() -> str:
    rows = []
    for model, label in MODELS:
        bp = [float(run[-1]["test_loss"]) for run in runs(model, "bp")]
        bp_loss = sum(bp) / len(bp) if bp else math.nan
        for variant, what in VARIANTS:
            found = runs(model, variant)
            if not found:
                continue
            last = [run[-1] for run in found]
            loss = [float(r["test_loss"]) for r in last]
            rows.append([
                label, what, str(len(found)),
                cell([float(r["test_top1"]) for r in last], 1),
                cell([max(float(r["test_top1"]) for r in run) for run in found], 1),
                cell(loss, 3),
                cell([math.exp(v - bp_loss) for v in loss], 2),
                cell([float(r["backprop_angle"]) for r in last], 1),
            ])
    return markdown_table(["model", "variant", "seeds", "final top-1 (%)", "best top-1 (%)",
                           "final test loss", "exp(loss − bp's)", "end-to-end angle (°)"],
                          rows)


if __name__ == "__main__":
    print(main())
