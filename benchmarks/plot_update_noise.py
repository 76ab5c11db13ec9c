"""Plot for docs/weight-estimation.md: sa's final top-1 against the size of the error in its
self term's W, for update noise (a line over sigma, from ``neuralign robustness`` CSVs) and for
estimators and controls (points at the per-entry error they carry, from ``neuralign transfer``
CSVs).

    python benchmarks/plot_update_noise.py --out update-noise.png \\
        --noise runs/robustness/*/robustness.csv \\
        --point "rdd, every step" 0.093 runs/transfer/rdd-every1/transfer.csv ...
"""

from __future__ import annotations

import argparse
import csv
import glob
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def top1(paths: list[str], depth: str | None, key: str | None = None,
         label: str = "") -> dict[str, list[float]]:
    """Final test top-1 per `key` value (or all under ''), from finished runs at `depth` whose
    label starts with `label`."""
    out: dict[str, list[float]] = {}
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("status", "ok") != "ok" or (depth and row.get("depth", depth) != depth):
                    continue
                if not row["label"].startswith(label):
                    continue
                out.setdefault(row[key] if key else "", []).append(float(row["test_top1"]))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--noise", nargs="+", required=True, help="robustness.csv files (one depth)")
    p.add_argument("--point", nargs=3, action="append", default=[],
                   metavar=("LABEL", "SIGMA", "CSVS"),
                   help="transfer.csv files (a glob pattern; PATTERN::PREFIX keeps the runs whose "
                   "label starts with PREFIX) at their error size")
    p.add_argument("--hline", nargs=2, action="append", default=[], metavar=("LABEL", "TOP1"))
    p.add_argument("--depth", default="9")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    line = sorted((float(s), v) for s, v in top1(args.noise, None, "sigma").items())
    ax.errorbar([s for s, _ in line], [statistics.mean(v) for _, v in line],
                [statistics.pstdev(v) for _, v in line], marker="o", color="k", capsize=3,
                label="update noise σ (fresh every step)")
    markers = iter("sD^v<>ph*X")
    for label, sigma, path in args.point:
        pattern, _, prefix = path.partition("::")
        v = top1(sorted(glob.glob(pattern)), args.depth, label=prefix).get("")
        if not v:
            p.error(f"no finished runs at depth {args.depth} in {path}")
        ax.errorbar([float(sigma)], [statistics.mean(v)], [statistics.pstdev(v)],
                    marker=next(markers), linestyle="none", capsize=3, label=label)
    for label, value in args.hline:
        ax.axhline(float(value), linestyle=":", color="grey")
        ax.text(0.01, float(value) + 0.8, label, color="grey", fontsize=8,
                transform=ax.get_yaxis_transform())  # x in axes fractions
    ax.set_xscale("log")
    ax.set_xlabel("per-entry error in the self term's W (update noise σ; rms of Ŵ − W)")
    ax.set_ylabel(f"final test top-1 (%), {args.depth} layers")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
