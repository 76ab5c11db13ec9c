"""Rebuild the dfa rows of docs/fidelity.md ("BioTorch's LeNet-5 tables") from the runs'
metrics: ``python docs/results/dfa-lenet/table.py`` (each ``<dataset>-s<seed>.csv`` here is one
run's ``metrics.csv``, copied from its run folder).

Prints, per dataset, each seed's best-epoch and final-epoch top-1 error (%), then their mean ±
std (sample std over the seeds), as the table's columns take them.
"""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path

HERE = Path(__file__).parent


def errors(path: Path) -> tuple[float, float, int]:
    """(best-epoch error, final-epoch error, epochs) of one run's metrics.csv."""
    with path.open() as f:
        accuracy = [float(row["test_top1"]) for row in csv.DictReader(f)]
    return 100 - max(accuracy), 100 - accuracy[-1], len(accuracy)


def summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    runs: dict[str, dict[int, tuple[float, float, int]]] = {}
    for path in sorted(HERE.glob("*-s*.csv")):
        match = re.fullmatch(r"(.+)-s(\d+)\.csv", path.name)
        if match:
            runs.setdefault(match[1], {})[int(match[2])] = errors(path)
    for dataset, seeds in runs.items():
        print(f"{dataset}:")
        for seed, (best, final, epochs) in sorted(seeds.items()):
            print(f"  seed {seed}: best {best:.2f}, final {final:.2f} ({epochs} epochs)")
        best = [b for b, _, _ in seeds.values()]
        final = [f for _, f, _ in seeds.values()]
        print(f"  | dfa | {summary(best)} | {summary(final)} | {len(seeds)} |")


if __name__ == "__main__":
    main()
