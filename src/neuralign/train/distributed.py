"""Scale-out with PyTorch's own engine: ``torchrun`` + ``DistributedDataParallel``.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the trainer joins the process group
set up here and wraps the converted model in ``DistributedDataParallel``. Feedback weights need
nothing special: their gradients come out of the same backward pass as W's, so DDP averages
them like any parameter, and fixed or derived feedback are buffers. What this module adds is
the small set of collectives the trainer needs around that (metric sums, the divergence flag,
per-rank RNG states for checkpoints, rank 0's decisions) and :func:`launch`, which re-runs a
``neuralign`` command under ``torch.distributed.run``.

The backend is chosen from the machine, not the run: ``gloo`` without CUDA,
``cpu:gloo,cuda:nccl`` with it (NCCL for the CUDA tensors of DDP, gloo for small CPU
objects), so a run can be resumed before its config (and so its device) is known.
``NEURALIGN_DIST_TIMEOUT`` (seconds, default 600) bounds every collective: a rank that stops
answering ends the job with an error instead of a hang. When a rank fails outright,
``torchrun`` stops the others at once and reports that rank's error; with ``--max-restarts``
it starts them again, and the trainer resumes from the run folder's last checkpoint
(:func:`restart_count`, :func:`run_id`).
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import distributed as dist
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["requested", "init", "cleanup", "rank", "world_size", "local_rank", "is_main", "timestamp",
           "restart_count", "max_restarts", "run_id",
           "local_device", "rank_seed", "all_reduce_sum", "any_true", "broadcast_object",
           "all_gather_object", "on_main", "broadcast_buffers", "launch", "TIMEOUT_ENV"]

#: Environment variable holding the collective timeout in seconds.
TIMEOUT_ENV = "NEURALIGN_DIST_TIMEOUT"
_T = TypeVar("_T")


def requested() -> bool:
    """Whether this process was started as one of several (``torchrun`` sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init() -> bool:
    """Join the process group that ``torchrun``'s environment describes (once per process).

    Returns whether this process is now part of a group of several. Without ``torchrun`` (no
    ``WORLD_SIZE`` > 1) nothing happens.
    """
    if not requested():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        lr = local_rank()
        if lr < torch.cuda.device_count():
            torch.cuda.set_device(lr)
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timeout)
    log.debug("rank %d of %d joined (%s, timeout %s)", rank(), world_size(), backend, timeout)
    if (rank() == 0 and restart_count() == 0 and max_restarts() > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        log.warning("torchrun may restart this job (--max-restarts), but its processes use the "
                    "rendezvous' shared store, where a restart finds the previous processes' "
                    "addresses and fails to connect (pytorch issues 135712, 167288): start "
                    "torchrun with the c10d rendezvous and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                    "(see docs/distributed.md)")
    return dist.get_world_size() > 1


def cleanup(wait: bool = False) -> None:
    """Leave the process group (if any); call once at the end of the process.

    ``wait``: first wait until every rank gets here (at the end of a successful command, so
    that no rank tears the group down while rank 0 still writes its files: a rank leaving
    early can abort the others' gloo threads). Not after an error: the others may never come.
    """
    if dist.is_available() and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        # DistributedDataParallel's reducer sits in reference cycles: left to the interpreter's
        # finalisation, it outlives the group and its gloo work, and a rank could abort at
        # exit ("terminate called without an active exception"). Collected now, it goes first.
        gc.collect()
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank in the process group (0 outside a distributed run)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes in the group (1 outside a distributed run)."""
    return dist.get_world_size() if active() else 1


def restart_count() -> int:
    """How often torchrun has restarted this job's processes (``TORCHELASTIC_RESTART_COUNT``;
    0 on the first attempt and without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def max_restarts() -> int:
    """The restarts torchrun allows this job (``--max-restarts``; 0 without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def run_id() -> str | None:
    """torchrun's id of this job (``--rdzv-id``; ``TORCHELASTIC_RUN_ID``), None without it."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``, set by torchrun; 0 without it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and logs."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """A CUDA device without an index becomes this process's GPU (``cuda:LOCAL_RANK``)."""
    if device.type == "cuda" and active():
        if device.index is None:
            device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    return device


def rank_seed(seed: int, r: int) -> int:
    """The seed of rank ``r``'s global RNG (mirror noise, brSF magnitudes, augmentation)."""
    return (seed + 1_000_003 * r) % (2**63)


def all_reduce_sum(values: Sequence[float] | torch.Tensor, device: torch.device
                   ) -> torch.Tensor:
    """Sum ``values`` (float64) over ranks; returned on the CPU."""
    t = torch.as_tensor(values, dtype=torch.float64).to(device)
    if active():
        dist.all_reduce(t)
    return t.cpu()


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    return bool(all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small data and checkpoints)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def timestamp() -> str:
    """Rank 0's clock as ``YYYYmmdd-HHMMSS`` on every rank (a run name must be the same on all)."""
    from datetime import datetime

    return broadcast_object(datetime.now().strftime("%Y%m%d-%H%M%S"))


def on_main(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on rank 0 and give its result (or raise its exception) on every rank.

    For what must be decided once: reading a run folder that may exist on rank 0's machine
    only, checking that a run folder is free. Every rank raises the same error, so the job
    ends with it rather than some ranks waiting for the others."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # handed to every rank below
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics …) to every rank."""
    if active():
        for b in model.buffers():
            if b.numel():
                dist.broadcast(b, 0)


def launch(argv: Sequence[str], nproc: int, python: str | None = None) -> int:
    """Run ``neuralign ARGV`` as ``nproc`` processes on this machine through
    ``torch.distributed.run --standalone`` (which picks a free port); returns its exit status."""
    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "neuralign", *argv]
    log.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd)


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (to re-run a command under
    ``torchrun`` without its launch option)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out
