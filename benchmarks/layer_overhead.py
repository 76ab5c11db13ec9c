"""Per-call overhead of a converted layer, against the plain torch layer.

A benchmark, not a test: on tiny inputs (``nn.Linear(100, 100)``, batch 32, the input requiring
a gradient, so every layer sends an error down) the products cost little, and what a converted
layer adds per training step shows: the autograd Function's Python forward and backward, the
rule's own work (a sign rule's derivation, dfa's projection, the rule gradient of sa/kp without
the recipe). For each rule it prints the time of a forward alone and of a forward plus
``out.sum().backward()`` for one layer, best of 7 repeats of 3000 calls, and the difference to
the plain layer (``bp``) in the same run. It also times a stack of ``--layers`` such layers
and splits the overhead into a part per layer (the slope from one layer to the stack) and a
part per model (what is left at one layer: dfa's output marker, for instance), since the
single layer's figure holds both.

    python benchmarks/layer_overhead.py --threads 2
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from torch import nn

import neuralign as na


def best_time(fn, calls: int, repeats: int = 7) -> float:
    """Microseconds per call, the best of ``repeats`` runs of ``calls`` calls."""
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", default="fa,usf,frsf,brsf,sa,kp,dfa",
                   help="comma list of rules (bp, the plain layer, is always measured)")
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--layers", type=int, default=4,
                   help="the stack that splits the overhead per layer and per model (1: none)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.features, requires_grad=True)
    k = args.layers
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"Linear({args.features}, {args.features}), batch {args.batch}; us per call\n")
    split = k > 1
    print("| rule | forward | forward + backward | overhead per step vs bp |"
          + (f" {k} layers: overhead | per layer | per model |" if split else ""))
    print("|---|---|---|---|" + ("---|---|---|" if split else ""))
    base = None
    for rule in ["bp", *[r for r in args.rules.split(",") if r and r != "bp"]]:
        def build(n: int, rule: str = rule) -> nn.Module:
            stack = nn.Sequential(*[nn.Linear(args.features, args.features) for _ in range(n)])
            return stack if rule == "bp" else na.convert(stack, rule)  # (dfa marks the root)

        one, many = build(1), build(k)
        times = (best_time(partial(one, x), args.calls),
                 best_time(partial(train_step, one, x), args.calls),
                 best_time(partial(train_step, many, x), args.calls) if split else 0.0)
        base = times if base is None else base
        fwd, both, stack = times
        row = f"| {rule} | {fwd:.1f} | {both:.1f} | {both - base[1]:+.1f} |"
        if split:
            one, many = both - base[1], stack - base[2]
            per_layer = (many - one) / (k - 1)
            row += f" {many:+.1f} | {per_layer:+.1f} | {one - per_layer:+.1f} |"
        print(row)


if __name__ == "__main__":
    main()
