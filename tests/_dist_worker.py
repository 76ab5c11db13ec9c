"""One process of the distributed tests (started by tests/test_distributed.py, not by pytest).

``python tests/_dist_worker.py MODE ROOT [RULE ...]`` with torchrun's environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Modes:

- ``train``: for each rule, a short run (``RULE``); each rank saves its model's state to
  ``ROOT/RULE-rankR.pt``, and whether it held the run folder's lock to
  ``ROOT/RULE-lock-rankR.txt``. For ``ia`` also the same run cut after its first epoch
  (``ia-cut``), for the resume test.
- ``compiled``: as ``train``, with ``train.compile=aot_eager``; saves ``RULE-compiled-rankR.pt``.
- ``fail``: rank 1 raises during the second step; the others must not hang.
- ``accumulate``: for each rule of ``runs.ACCUMULATE``, :func:`runs.accumulate` in 2
  micro-batches a step; saves ``RULE-accumulate-rankR.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from neuralign.train import (  # noqa: E402
    Callback,
    Trainer,
    distributed,  # noqa: E402
    load_config,
)
from runs import DIST, accumulate, rule_args, tiny  # noqa: E402


class _Lock(Callback):
    """Writes ``ROOT/RULE-lock-rankR.txt``: whether this rank held the run folder's lock while
    it trained."""

    def __init__(self, path: Path):
        self.path = path

    def on_epoch_end(self, trainer, epoch, metrics):
        self.path.write_text(str(int(trainer._lock is not None)))


class _Boom(Callback):
    def on_step_end(self, trainer, step, loss):
        if step == 2 and trainer.rank == 1:
            raise RuntimeError("boom on rank 1")


def _run(mode: str, root: Path, rule: str, r: int) -> None:
    """One rule's job (in a function of its own: its trainer and DDP wrapper are garbage when
    the process group is torn down)."""
    if mode == "accumulate":
        state = accumulate(rule, r, distributed.world_size(), parts=2)
        torch.save(state, root / f"{rule}-accumulate-rank{r}.pt")
    if mode == "compiled":
        t = Trainer(load_config(None, tiny(root, *DIST, *rule_args(rule),
                                           f"train.name={rule}-compiled",
                                           "train.compile=aot_eager")))
        t.fit()
        torch.save(t.model.state_dict(), root / f"{rule}-compiled-rank{r}.pt")
    if mode == "train":
        t = Trainer(load_config(None, tiny(root, *DIST, *rule_args(rule),
                                           f"train.name={rule}")),
                    callbacks=[_Lock(root / f"{rule}-lock-rank{r}.txt")])
        t.fit()
        torch.save(t.model.state_dict(), root / f"{rule}-rank{r}.pt")
        if rule == "ia":
            Trainer(load_config(None, tiny(root, *DIST, f"rule.name={rule}", "train.epochs=1",
                                           f"train.name={rule}-cut"))).fit()


def main() -> int:
    mode, root, rules = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    distributed.init()
    r = distributed.rank()
    try:
        if mode == "fail":
            Trainer(load_config(None, tiny(root, *DIST, "rule.name=kp", "train.name=fail")),
                    callbacks=[_Boom()]).fit()
            distributed.cleanup(wait=True)
            return 0
        for rule in rules:
            _run(mode, root, rule, r)
        distributed.cleanup(wait=True)
        return 0
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
