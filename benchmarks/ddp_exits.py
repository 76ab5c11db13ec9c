"""How often a 2-process DDP job's ranks fail to exit cleanly: the distributed tests' spawn,
repeated.

Each spawn starts the worker of ``tests/test_distributed.py`` (``tests/_dist_worker.py``) as two
gloo processes with torchrun's environment, trains the given rules (the tests' tiny runs), and
exits. A spawn counts as an abort when a rank exits non-zero or prints ``terminate called``
(an abort at exit that gloo ranks showed in 2026-11, about 1 spawn in 120). Spawns that lost
their port to another process before binding it (``DistNetworkError``) are retried and not
counted.

    python benchmarks/ddp_exits.py --spawns 200 --rules ia
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from test_distributed import spawn  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spawns", type=int, default=200)
    p.add_argument("--rules", default="ia", help="comma list of rules each spawn trains")
    args = p.parse_args()
    rules = args.rules.split(",")
    outcomes: collections.Counter[str] = collections.Counter()
    t0 = time.monotonic()
    done = 0
    while done < args.spawns:
        with tempfile.TemporaryDirectory() as root:
            res = spawn("train", Path(root), *rules, timeout=300)
        if any(r.returncode and "DistNetworkError" in r.stdout for r in res):
            outcomes["port taken (retried)"] += 1
            continue
        done += 1
        aborted = [r for r in res if r.returncode or "terminate called" in r.stdout]
        outcomes["abort" if aborted else "clean"] += 1
        for r in aborted:
            print(f"spawn {done}: exit {r.returncode}\n{r.stdout[-2000:]}", file=sys.stderr)
        if done % 10 == 0:
            print(f"{done} spawns, {outcomes['abort']} aborts, "
                  f"{time.monotonic() - t0:.0f} s", file=sys.stderr)
    print(f"{args.spawns} spawns of 2 processes (rules {', '.join(rules)}): "
          f"{outcomes['abort']} aborted, {outcomes['clean']} clean, "
          f"{outcomes['port taken (retried)']} retried for a taken port; "
          f"{time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
