"""A convolution's weight-gradient-type product (``ConvOps.core_outer``), tap by tap against
oneDNN's, on resnet18's convolutions at 32 px (batch 64).

A benchmark, not a test. The activity rules (aa, wm, ia) compute one such product per layer
per step beyond backprop's (their ``outer``). Where a layer's output has a few positions, its
3x3 kernel reads mostly zero padding (8 taps of 9 on a 1x1 output), and oneDNN's weight
gradient runs several times slower than the layer's forward; ``core_outer`` then makes one
matrix product per tap over the outputs the tap reads for (``ConvOps._taps``). For each
convolution shape it prints the share of the kernel's reads that land inside the input, the
forward's time (for scale), oneDNN's weight gradient, the taps' product where the layer takes
it, best of 5 repeats, and whether ``core_outer`` goes by taps.

    python benchmarks/conv_outer.py --threads 2
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from torch import nn

from layer_overhead import best_time
from neuralign.ops import ops_for

# (in, out, kernel, stride, input size): every convolution of torchvision's resnet18 at 32 px
RESNET18_32PX = [(3, 64, 7, 2, 32), (64, 64, 3, 1, 8), (64, 128, 3, 2, 8), (64, 128, 1, 2, 8),
                 (128, 128, 3, 1, 4), (128, 256, 3, 2, 4), (128, 256, 1, 2, 4),
                 (256, 256, 3, 1, 2), (256, 512, 3, 2, 2), (256, 512, 1, 2, 2),
                 (512, 512, 3, 1, 1)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}; "
          "µs per call, best of 5 repeats\n")
    print("| conv | output | reads inside | forward | oneDNN outer | taps outer | core_outer by taps |")
    print("|---|---|---|---|---|---|---|")
    for c_in, c_out, k, s, n in RESNET18_32PX:
        conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=k // 2, bias=False)
        ops = ops_for(conv)
        x = torch.randn(args.batch, c_in, n, n)
        W = conv.weight.detach()
        y = torch.randn_like(ops.core(x, W))
        K = x.new_empty(1).expand(W.shape)

        plan, inside = ops._tap_plan(x.shape[2:], y.shape[2:])  # (whether taken or not)
        by_taps = ops._taps(x.shape[2:], y.shape[2:]) is not None
        forward = best_time(partial(ops.core, x, W), args.calls, 5)
        dnn = best_time(partial(ops._conv_backward, y, x, K, (False, True, False)),
                        args.calls, 5)
        taps = best_time(partial(ops._outer_by_taps, x, y, plan), args.calls, 5)
        print(f"| {c_in}->{c_out} k{k} s{s} at {n} px | {y.shape[-2]}x{y.shape[-1]} | "
              f"{inside:.2f} | {forward:.0f} | {dnn:.0f} | {taps:.0f} | "
              f"{'yes' if by_taps else 'no'} |")


if __name__ == "__main__":
    main()
