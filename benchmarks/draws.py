"""The random draws of brsf and of mirror noise, against torch's own, on one tensor.

A benchmark, not a test: for a few sizes it times (best of 7 repeats, microseconds a call)

* brsf's fresh magnitudes and sign: torch's ``uniform_`` then ``copysign`` (what a plain
  implementation does) against ``neuralign.draws.UniformMagnitudes`` with the sign, by the
  native kernel and by torch ops (the kernel off); and ``copysign`` alone, usf's step;
* the hash's words (one per eight entries) computed in fresh memory against the kept
  workspace (``random_words(..., workspace=True)``);
* mirror noise N(0, 1): torch's ``normal_`` against ``neuralign.draws.noise_like``, by the
  native kernel (from ``NATIVE_NOISE_FROM`` entries) and by torch ops (the hash and
  Box-Muller from ``NOISE_HASH_FROM`` entries, torch's ``normal_`` below).

    python benchmarks/draws.py --threads 2
"""

from __future__ import annotations

import argparse

import torch

from layer_overhead import best_time  # (this folder is on the path when run as a script)
from neuralign import native
from neuralign.draws import UniformMagnitudes, noise_like, random_words


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,128000,1000000", help="comma list of entries")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; us per call\n")
    if native.library() is None:
        raise SystemExit("the native kernels did not build here (see the warning)")
    print("| entries | brsf: uniform_ + copysign | brsf: native | brsf: torch ops "
          "| copysign alone | words: fresh | words: kept | noise: normal_ | noise: native "
          "| noise: torch ops |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",") if s):
        print(f"| {n} | " + " | ".join(f"{t:.1f}" for t in _row(n)) + " |")


def _row(n: int) -> list[float]:
    F, W = torch.empty(n), torch.randn(n)
    draw = UniformMagnitudes(0.1)
    calls = max(20, min(2000, 20_000_000 // n))
    words = (n + 7) // 8
    return [
        best_time(lambda: torch.copysign(F.uniform_(0, 0.1), W, out=F), calls),
        best_time(lambda: draw(F, W), calls),
        _without_native(lambda: best_time(lambda: draw(F, W), calls)),
        best_time(lambda: torch.copysign(F, W, out=F), calls),
        best_time(lambda: random_words(words), calls),
        best_time(lambda: random_words(words, workspace=True), calls),
        best_time(lambda: torch.empty_like(F).normal_(), calls),
        best_time(lambda: noise_like(F, "normal", 1.0), calls),
        _without_native(lambda: best_time(lambda: noise_like(F, "normal", 1.0), calls)),
    ]


def _without_native(run):
    lib = native.library
    native.library = lambda: None  # (as NEURALIGN_NATIVE=0 does, in this process)
    try:
        return run()
    finally:
        native.library = lib

if __name__ == "__main__":
    main()
