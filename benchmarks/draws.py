"""The random draws of brsf and of mirror noise, on one tensor, against a plain implementation.

A benchmark, not a test: for a few sizes it times (best of 7 repeats, microseconds a call)

* brsf's fresh magnitudes and sign: torch's ``uniform_`` then ``copysign`` (what a plain
  implementation does) against ``neuralign.random_draws.UniformMagnitudes`` with the sign
  (one random byte an entry, from torch's full-range int64 ``random_``), and ``copysign``
  alone, usf's step (the floor of any brsf draw);
* mirror noise, ``noise_like`` with ``dist='normal'`` and ``dist='uniform'`` (torch's
  ``normal_`` and ``uniform_`` into a fresh tensor).

    python benchmarks/draws.py --threads 2
    python benchmarks/draws.py --device cuda --sizes 100000,1000000,10000000
"""

from __future__ import annotations

import argparse
import time

import torch

from neuralign.random_draws import UniformMagnitudes, noise_like


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,128000,1000000", help="comma list of entries")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; us per call\n")
    print("| entries | brsf: uniform_ + copysign | brsf: UniformMagnitudes | copysign alone "
          "| noise: normal | noise: uniform |")
    print("|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",") if s):
        print(f"| {n} | " + " | ".join(f"{t:.1f}" for t in _row(n, device)) + " |")


def best_time(fn, calls: int, device: torch.device, repeats: int = 7) -> float:
    """Microseconds per call, the best of ``repeats`` runs of ``calls`` calls (after warm-up;
    on a GPU, synchronised around each run)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def _row(n: int, device: torch.device) -> list[float]:
    F, W = torch.empty(n, device=device), torch.randn(n, device=device)
    draw = UniformMagnitudes(0.1)
    calls = max(20, min(2000, 20_000_000 // n))
    return [
        best_time(lambda: torch.copysign(F.uniform_(0, 0.1), W, out=F), calls, device),
        best_time(lambda: draw(F, W), calls, device),
        best_time(lambda: torch.copysign(F, W, out=F), calls, device),
        best_time(lambda: noise_like(F, "normal", 1.0), calls, device),
        best_time(lambda: noise_like(F, "uniform", 1.0), calls, device),
    ]


if __name__ == "__main__":
    main()
