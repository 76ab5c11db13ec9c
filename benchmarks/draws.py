"""The random draws of brsf and of mirror noise, against torch's own, on one tensor.

A benchmark, not a test: for a few sizes it times (best of 7 repeats, microseconds a call)

* brsf's fresh magnitudes and sign: torch's ``uniform_`` then ``copysign`` (what a plain
  implementation does) against ``neuralign.draws.UniformMagnitudes`` with the sign, with the
  native kernel and with it off (torch ops); and ``copysign`` alone, usf's step;
* the hash's words (one per eight entries) computed in fresh memory against the kept
  workspace (``random_words(..., workspace=True)``);
* mirror noise N(0, 1): torch's ``normal_`` against the native kernel (at every size;
  ``neuralign.draws.noise_like`` calls it from ``NATIVE_NOISE_FROM`` entries) and against
  ``noise_like`` with the kernel off (the hash and Box-Muller in torch ops from
  ``NOISE_HASH_FROM`` entries, ``normal_`` below).

    python benchmarks/draws.py --threads 2
    python benchmarks/draws.py --threads 2 --evict --sizes 3200,8192,12800

``--evict`` runs a 256 × 256 matrix product before each timed call (untimed), as the
training step's products come before each draw: a call's fixed cost then grows. (The step
costs more still: ``NATIVE_NOISE_FROM`` was set from step times, ``benchmarks/step_time.py``.)
"""

from __future__ import annotations

import argparse
import time

import torch

from layer_overhead import best_time as _best_time  # (this folder is on the path when run as a script)
from neuralign import native
from neuralign.draws import UniformMagnitudes, noise_like, random_words


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,128000,1000000", help="comma list of entries")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--evict", action="store_true",
                   help="a matrix product before each timed call (the best of 200 calls)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; us per call\n")
    if native.library() is None:
        raise SystemExit("the native kernels did not build here (see the warning)")
    print("| entries | brsf: uniform_ + copysign | brsf: UniformMagnitudes | brsf: same, "
          "native off | copysign alone | words: fresh | words: kept | noise: normal_ "
          "| noise: native kernel | noise: noise_like, native off |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",") if s):
        print(f"| {n} | " + " | ".join(f"{t:.1f}" for t in _row(n, args.evict)) + " |")


def evicted_time(fn, calls: int = 200) -> float:
    """Microseconds per call, the best of ``calls`` calls, each after a matrix product."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    best = float("inf")
    for _ in range(calls):
        a @ b
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def _row(n: int, evict: bool) -> list[float]:
    F, W = torch.empty(n), torch.randn(n)
    draw = UniformMagnitudes(0.1)
    calls = max(20, min(2000, 20_000_000 // n))
    words = (n + 7) // 8
    best_time = _best_time if not evict else lambda fn, calls: evicted_time(fn)
    return [
        best_time(lambda: torch.copysign(F.uniform_(0, 0.1), W, out=F), calls),
        best_time(lambda: draw(F, W), calls),
        _without_native(lambda: best_time(lambda: draw(F, W), calls)),
        best_time(lambda: torch.copysign(F, W, out=F), calls),
        best_time(lambda: random_words(words), calls),
        best_time(lambda: random_words(words, workspace=True), calls),
        best_time(lambda: torch.empty_like(F).normal_(), calls),
        best_time(lambda: native.noise(native.library(), torch.empty_like(F), "normal", 1.0,
                                       torch.randint(2**62, ())), calls),
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
