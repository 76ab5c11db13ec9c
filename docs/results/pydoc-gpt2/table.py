"""Rebuild docs/results.md's GPT-2-on-pydoc table from the per-run CSVs beside this file
(``<rule>-s<seed>.csv``: each run's ``metrics.csv``, one row per epoch).

    python docs/results/pydoc-gpt2/table.py
"""

from pathlib import Path

from neuralign.io import markdown_table, mean_std, read_csv

HERE = Path(__file__).parent
RULES = ("bp", "fa", "sa", "kp", "aa")
# (column, the last epoch's metric, or the best over epochs)
COLUMNS = (("final top-1 (%)", "test_top1", "last"), ("best top-1 (%)", "test_top1", "best"),
           ("final test loss", "test_loss", "last"), ("weight angle (°)", "weight_angle", "last"),
           ("end-to-end angle (°)", "backprop_angle", "last"),
           ("lag ‖F − F*‖/‖F*‖", "feedback_lag", "last"))


def cell(values: list[float], digits: int) -> str:
    m, s = mean_std(values)
    return "–" if m != m else f"{m:.{digits}f} ± {s:.{digits}f}"


def main() -> str:
    rows = []
    for rule in RULES:
        runs = [read_csv(p) for p in sorted(HERE.glob(f"{rule}-s*.csv"))]
        row: list[str] = [rule, str(len(runs))]
        for _, key, how in COLUMNS:
            values = [max(float(r[key]) for r in run) if how == "best" else float(run[-1][key])
                      for run in runs]
            row.append(cell(values, 3 if key in ("test_loss", "feedback_lag") else 1))
        rows.append(row)
    return markdown_table(["rule", "seeds", *(c for c, _, _ in COLUMNS)], rows)


if __name__ == "__main__":
    print(main())
