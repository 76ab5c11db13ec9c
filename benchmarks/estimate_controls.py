"""Controls for docs/weight-estimation.md: sa whose self term reads W itself, through the
estimation schedule, instead of an estimate. They read W, so they are not estimators and the
library has none of them; this script swaps one in for ``perturb`` and runs a ``neuralign``
command.

* ``snapshot``: an exact copy of W taken at each phase and held until the next (staleness
  alone, no estimation error).
* ``held``: W + N(0, sigma²) per entry, the noise drawn at each phase and held until the next
  (an isotropic Gaussian error of a chosen size, no structure). With a phase every step it is
  update noise: sa's recipe moves F ← F + rate·(W + δ − F), which is sa's exact step plus
  rate·δ, and ``rule.update_noise=sigma`` adds rate/κ·N(0, sigma²) with κ = decay = 1.

    python benchmarks/estimate_controls.py held --sigma 0.03 -- transfer \\
        -c configs/estimate/sa_perturb.yaml --models "mlp:widths=[100,...]" \\
        'rule.estimate={method: perturb, samples: 1, every: 100}'
"""

from __future__ import annotations

import argparse
import sys

import torch

import neuralign.estimate as E
from neuralign.cli import main as neuralign_main


def _w(drive, kernel_shape, dtype, device):
    """W read off the synapse: the drive of each unit input alone (Linear layers)."""
    if len(kernel_shape) != 2:
        raise SystemExit("the controls read W of Linear layers only")
    return drive(torch.eye(kernel_shape[1], dtype=dtype, device=device)).T.contiguous()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("control", choices=["snapshot", "held"])
    p.add_argument("--sigma", type=float, default=0.0, help="held: std of the error per entry")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        p.error("give the neuralign command after --, with rule.estimate's method perturb")
    cut = argv.index("--")
    args, command = p.parse_args(argv[:cut]), argv[cut + 1:]
    if args.control == "held" and not args.sigma > 0:
        p.error("held needs --sigma > 0")

    def control(ops, drive, kernel_shape, est, generator=None, dtype=torch.float32,
                device="cpu"):
        W = _w(drive, kernel_shape, dtype, device)
        if args.control == "snapshot":
            return W
        return W + args.sigma * torch.randn(W.shape, generator=generator, dtype=dtype,
                                            device=device)

    E.METHODS["perturb"] = control
    return neuralign_main(command)


if __name__ == "__main__":
    sys.exit(main())
