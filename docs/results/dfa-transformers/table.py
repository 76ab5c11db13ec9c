"""Rebuild docs/results.md's "dfa on transformers as Launay et al." table from the per-run CSVs
beside this file (each run's ``metrics.csv``, one row per epoch), named
``<model>-<variant>-s<seed>.csv``: model ``tf`` (the MNIST-1D transformer, 100 epochs) or
``lm`` (the character language model, 15 epochs; ``-long``: 60); the variants are listed in
VARIANTS. ``exp(loss − bp's)`` is the test perplexity's ratio to the backprop run's of the same
blocks and budget (mean over its seeds): Launay et al.'s best DFA is at 52.0 / 29.8 = 1.74.

    python docs/results/dfa-transformers/table.py
"""

import math
from pathlib import Path

from neuralign.io import markdown_table, mean_std, read_csv

HERE = Path(__file__).parent
MODELS = (("tf", "MNIST-1D transformer"), ("lm", "character LM"))
# (file key, what it is, the backprop run it is compared with)
VARIANTS = (
    ("bp", "backprop, pre-norm blocks", "bp"),
    ("dfa", "dfa at every layer's input, e at the output", "bp"),
    ("dfapt", "points at block outputs, e at the output", "bp"),
    ("dfapt-head", "points, e at the head's input", "bp"),
    ("dfapt-head-lr1e-4", "points, e at the head's input, Adam 1e-4", "bp"),
    ("dfapt-norm", "points, e at the last block's output", "bp"),
    ("bp-postln", "backprop, post-norm blocks", "bp-postln"),
    ("dfa-postln", "post-norm: dfa at every layer's input, e at the output", "bp-postln"),
    ("dfapt-head-postln", "post-norm: points, e at the head's input", "bp-postln"),
    ("dfapt-norm-postln", "post-norm: points, e at the last block's output (Launay et al.'s macro)",
     "bp-postln"),
    ("bp-long", "backprop, 60 epochs", "bp-long"),
    ("dfa-long", "dfa at every layer's input, 60 epochs", "bp-long"),
    ("dfapt-head-long", "points, e at the head's input, 60 epochs", "bp-long"),
    ("bp-postln-long", "backprop, post-norm blocks, 60 epochs", "bp-postln-long"),
    ("dfapt-norm-postln-long", "post-norm: points, e at the last block's output, 60 epochs",
     "bp-postln-long"),
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
        for variant, what, reference in VARIANTS:
            found = runs(model, variant)
            if not found:
                continue
            bp = [float(run[-1]["test_loss"]) for run in runs(model, reference)]
            bp_loss = sum(bp) / len(bp) if bp else math.nan
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

def local_angles() -> str:
    """The points' local angle, ∠(D e, the gradient arriving from above), per block at the
    first, middle and last epoch: the seed-0 runs that logged it (``gradient_angle/<block>``)."""
    rows = []
    for model, label in MODELS:
        for variant, what, _ in VARIANTS:
            path = HERE / f"{model}-{variant}-s0.csv"
            if not variant.startswith("dfapt") or not path.is_file():
                continue
            run = read_csv(path)
            blocks = [k for k in run[0] if k.startswith("gradient_angle/")]
            if not blocks or not any(math.isfinite(float(run[-1][k])) for k in blocks):
                continue
            picks = (run[0], run[len(run) // 2], run[-1])
            rows.append([label, what] + [
                " / ".join(f"{float(r[k]):.1f}" for r in picks) for k in blocks])
    return markdown_table(["model", "variant", "block 1: epoch 1 / middle / last",
                           "block 2: epoch 1 / middle / last"], rows)


if __name__ == "__main__":
    print(main())
    print()
    print(local_angles())
