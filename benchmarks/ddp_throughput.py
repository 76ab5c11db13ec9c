"""Training throughput (samples/s) of ``neuralign train`` with 1 and several processes (DDP).

Each configuration runs the real command (``neuralign train --nproc N``, i.e.
``torch.distributed.run``) on synthetic data for a few epochs; the throughput of a run is the
training-set size over ``epoch_time_s`` (rank 0's time for one epoch of training, evaluation
excluded), median over the epochs after the first (warm-up). Configurations are interleaved
round-robin ``--repeats`` times; the table gives the median and range over repeats.
``data.batch_size`` is the global batch, the same in every configuration.

    .venv/bin/python benchmarks/ddp_throughput.py                        # mlp, rules bp and kp
    .venv/bin/python benchmarks/ddp_throughput.py --rules ia --procs 1,2,4 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(nproc: int, threads: int, rule: str, args, root: Path, tag: str) -> float:
    name = f"{tag}-{rule}-p{nproc}-t{threads}"
    cmd = [sys.executable, "-m", "neuralign", "train", "--nproc", str(nproc),
           "--runs-dir", str(root), "--name", name, "-q", f"rule.name={rule}",
           "data.name=synthetic", f"data.shape={args.shape}", f"data.num_samples={args.samples}",
           f"data.batch_size={args.batch}", "data.eval_batch_size=1000", "model.name=mlp",
           f"model.widths={args.widths}", f"train.epochs={args.epochs}", "train.angle_every=0",
           "train.progress=false", "train.tensorboard=false", "train.plots=false",
           "train.checkpoint_every=0", "train.device=cpu", "optim.name=sgd", "optim.lr=0.01",
           "feedback_optim.name=sgd", "feedback_optim.lr=0.001"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(root / name / "metrics.csv") as f:
        times = [float(r["epoch_time_s"]) for r in csv.DictReader(f)][1:]
    return args.samples / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rules", default="bp,kp")
    p.add_argument("--procs", default="1,2", help="process counts")
    p.add_argument("--threads", default="1,2",
                   help="torch threads per process (OMP_NUM_THREADS); every (procs, threads) "
                        "pair with procs*threads <= --max-cores is run")
    p.add_argument("--max-cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--widths", default="[1024,1024]")
    p.add_argument("--shape", default="[1,28,28]")
    p.add_argument("--samples", type=int, default=8192, help="training examples per epoch")
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rules = args.rules.split(",")
    configs = [(n, t) for n in map(int, args.procs.split(",")) for t in
               map(int, args.threads.split(",")) if n * t <= args.max_cores]
    results: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for i in range(len(configs)):
                n, t = configs[(i + rep) % len(configs)]  # rotate the order between rounds
                for rule in rules:
                    sps = run(n, t, rule, args, Path(tmp), f"r{rep}")
                    results.setdefault((rule, n, t), []).append(sps)
                    print(f"round {rep}: {rule} {n} proc x {t} thread: {sps:.0f} samples/s",
                          file=sys.stderr)
    print(f"MLP {args.shape} -> {args.widths} -> 10, synthetic data, global batch "
          f"{args.batch}, {args.samples} samples/epoch, median of epochs 2-{args.epochs}; "
          f"{args.repeats} interleaved repeats\n")
    print("| rule | processes x threads | samples/s (median) | range | vs 1 process, "
          "same total threads |")
    print("|---|---|---|---|---|")
    for (rule, n, t), v in results.items():
        med = statistics.median(v)
        base = [statistics.median(w) for (r2, n2, t2), w in results.items()
                if r2 == rule and n2 == 1 and t2 == n * t]
        ratio = f"{med / base[0]:.2f}" if base and n > 1 else ""
        print(f"| {rule} | {n} x {t} | {med:.0f} | {min(v):.0f}-{max(v):.0f} | {ratio} |")


if __name__ == "__main__":
    main()
