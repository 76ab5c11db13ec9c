"""Time of the feedback recipe's step alone, with the native kernels on and off.

A benchmark, not a test: for each rule with learned feedback, one backward on the MLP
784-1000-1000-10 (batch 128) fills ``F.grad``, then ``na.feedback_optimizer``'s step is timed
by itself, the median of ``--steps`` steps, each after a 2000x2000 matrix product that
evicts F and its gradient from the caches, as the rest of a training step does. "off" is the
step with :func:`neuralign.native.library` returning None (torch's ops, as without a C
compiler); "on" the kernels (for wm and ia: ``F ← a·F + b·F.grad`` in one pass, not two).
Both give the same F bit for bit (``tests/test_dynamics.py``). A second table times the
pass alone per size of F, the kernel against torch's ``mul_`` and ``add_``.

    python benchmarks/recipe_step.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from torch import nn

import neuralign as na
from layer_overhead import best_time  # (this folder is the script's path)
from neuralign import native


def step_time(opt: torch.optim.Optimizer, evict: torch.Tensor, steps: int) -> float:
    """Median microseconds of ``opt.step()``, each after an evicting product."""
    times = []
    for _ in range(steps):
        evict.mm(evict)
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def torch_step(x: torch.Tensor, g: torch.Tensor, a: float, b: float) -> None:
    x.mul_(a).add_(g, alpha=b)


def kernel_table(lib, sizes: list[int]) -> None:
    """The step's pass alone per size of F: the kernel against torch's two ops (in cache)."""
    print("\n| entries of F | `native.scale_add` | `mul_` then `add_` |")
    print("|---|---|---|")
    for n in sizes:
        x, g = torch.randn(n), torch.randn(n)
        calls = max(20, 2_000_000 // n)
        one = best_time(partial(native.scale_add, lib, x, g, 0.999, -1e-3), calls)
        two = best_time(partial(torch_step, x, g, 0.999, -1e-3), calls)
        print(f"| {n} | {one:.1f} | {two:.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", default="wm,ia,aa,sa,kp")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3, help="alternations of off and on")
    p.add_argument("--sizes", default="1000,10000,30000,100000,1000000",
                   help="sizes of F for the table of the pass alone (empty: none)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lib = native.library()
    if lib is None:
        raise SystemExit("the native kernels are off here: nothing to compare")
    evict = torch.randn(2000, 2000)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MLP 784-1000-1000-10, "
          f"batch 128; the recipe's step, median µs of {args.steps}\n")
    print("| rule | kernels off | kernels on | on / off |")
    print("|---|---|---|---|")
    for rule in [r for r in args.rules.split(",") if r]:
        torch.manual_seed(0)
        model = na.convert(nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000),
                                         nn.ReLU(), nn.Linear(1000, 10)), rule)
        opt = na.feedback_optimizer(model)
        model(torch.randn(128, 784)).sum().backward()
        off, on = [], []
        try:
            for _ in range(args.repeats):
                native.library = lambda: None  # type: ignore[assignment]
                off.append(step_time(opt, evict, args.steps))
                native.library = lambda: lib  # type: ignore[assignment]
                on.append(step_time(opt, evict, args.steps))
        finally:
            native.library = lambda: lib  # type: ignore[assignment]
        a, b = statistics.median(off), statistics.median(on)
        print(f"| {rule} | {a:.0f} | {b:.0f} | {b / a:.2f} |")
    kernel_table(lib, [int(n) for n in args.sizes.split(",") if n])


if __name__ == "__main__":
    main()
