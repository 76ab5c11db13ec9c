"""Rebuild docs/protocol.md's robustness table in weight units from the per-run rows beside
this file (each ``neuralign robustness --noise-units weight`` command's ``robustness.csv``):
final test top-1 (%) and the weight angle ∠(W, F) at the end, mean ± std over the seeds.

    python docs/results/robustness-weight-units/table.py
"""

from pathlib import Path

from neuralign.io import markdown_table, mean_std, read_csv

HERE = Path(__file__).parent
RULES = ("sa", "kp", "wm", "aa", "ia", "bp", "fa")


def cell(values: list[float], digits: int = 1) -> str:
    m, s = mean_std(values)
    return "–" if m != m else f"{m:.{digits}f} ± {s:.{digits}f}"


def main() -> str:
    rows = [r for p in sorted(HERE.glob("*.csv")) for r in read_csv(p)]
    sigmas = sorted({float(r["sigma"]) for r in rows if r["rule"] not in ("bp", "fa")})
    out = []
    for what, key in (("final test top-1 (%)", "test_top1"), ("weight angle (°)", "weight_angle")):
        table = []
        for rule in RULES:
            mine = [r for r in rows if r["rule"] == rule]
            if not mine:
                continue
            if rule in ("bp", "fa"):
                if key == "weight_angle":
                    continue
                table.append([f"{rule} (no learned F)",
                              cell([float(r[key]) for r in mine])] + ["″"] * (len(sigmas) - 1))
                continue
            table.append([rule] + [cell([float(r[key]) for r in mine if float(r["sigma"]) == s])
                                   for s in sigmas])
        out.append(f"{what}:\n\n" + markdown_table(["rule"] + [f"σ={s:g}" for s in sigmas],
                                                    table))
    return "\n\n".join(out)


if __name__ == "__main__":
    print(main())
