"""Rebuild docs/results.md's GPT-2-on-pydoc tables from the per-run CSVs beside this file
(each run's ``metrics.csv``, one row per epoch): ``<rule>-s<seed>.csv`` with F drawn at random
(the configs' default), ``<rule>-initw-s<seed>.csv`` with F started at W (``rule.init=weight``).

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
    if m != m:
        return "–"
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def table(tag: str = "") -> str:
    rows = []
    for rule in RULES:
        runs = [read_csv(p) for p in sorted(HERE.glob(f"{rule}-{tag}s*.csv"))]
        if not runs:
            continue
        row: list[str] = [rule, str(len(runs))]
        for _, key, how in COLUMNS:
            values = [max(float(r[key]) for r in run) if how == "best" else float(run[-1][key])
                      for run in runs]
            row.append(cell(values, 3 if key in ("test_loss", "feedback_lag") else 1))
        rows.append(row)
    return markdown_table(["rule", "seeds", *(c for c, _, _ in COLUMNS)], rows)


def main() -> str:
    return (f"F drawn at random:\n\n{table()}\n\nF started at W (rule.init=weight):\n\n"
            f"{table('initw-')}")


if __name__ == "__main__":
    print(main())
