"""Checkpoint files: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain Python data only (no pickled objects), so it loads
with the safe unpickler: the model's state dict (forward weights W and feedback weights F), both
optimizers, both schedules, the RNG states (torch CPU and CUDA, NumPy, Python), the epoch and step
reached, the metrics history and the resolved config.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_write

log = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "load_checkpoint", "load_optimizer_state", "previous_path",
           "rng_state", "set_rng_state"]


def previous_path(path: str | Path) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaced (``last.prev.pt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


@contextlib.contextmanager
def sigterm_deferred() -> Iterator[None]:
    """Hold SIGTERM back while a checkpoint is written: delivered inside torch's writer, its
    exception broke the write into a RuntimeError that read as a full disk. Held back, it
    arrives once the file is whole (where the OS has no signal masks, as it comes)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`neuralign.io.atomic_write`).

    A crash while writing leaves the previous file at ``path`` intact. The file it replaces is
    kept as :func:`previous_path` (one generation), in case the new one is ever unreadable.

    Raises:
        OSError: the file could not be written (its ``filename`` is ``path``); torch's
            serializer reports a failed write (a full disk) as a ``RuntimeError``, raised here
            as ``OSError(ENOSPC)``.
    """
    try:
        with sigterm_deferred():
            path = atomic_write(path, lambda f: torch.save(state, f),
                                keep_previous=previous_path(path))
    except RuntimeError as e:
        # "[enforce fail at inline_container.cc:...] ... PytorchStreamWriter failed writing
        # file ...: file write failed" (or "unexpected pos"): the bytes did not reach the disk
        if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (torch could not write the "
                                    f"checkpoint: {str(e).splitlines()[0]})", str(path)) from e
    log.debug("checkpoint written: %s", path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with the safe unpickler (``weights_only=True``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable checkpoint (truncated, corrupted, or not one);
            the message names the previous checkpoint when one was kept, and how to use it.
    """
    path = Path(path)
    prev = previous_path(path)
    fallback = (f" The previous checkpoint, {str(prev)!r}, is kept: to resume from it, "
                f"move it over this one (mv {prev} {path})." if prev.is_file() else "")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}.{fallback}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"the checkpoint {str(path)!r} cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'}); it is truncated "
                         f"or corrupted, or not a checkpoint.{fallback}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a checkpoint's "
                         f"dict.{fallback}")
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], which: str,
                         names: Mapping[torch.Tensor, str] | None = None) -> None:
    """Load an optimizer's saved per-parameter state (moments, momentum buffers) and keep its
    own hyperparameters (learning rate, momentum, betas, ...: those of the config it was built
    from, so that a change made on resuming takes effect).

    Args:
        optimizer: built over the parameters the state is for, in the same order.
        state: ``optimizer.state_dict()`` of an optimizer of the same kind.
        which: its name in errors (``optimizer``, ``feedback_optimizer``).
        names: parameter -> name, for the errors.

    Raises:
        ValueError: the state is for other parameters (another count, or a tensor of another
            shape than its parameter's), before anything is loaded.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved = [i for g in state["param_groups"] for i in g["params"]]
    if len(saved) != len(params) or len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"{which}: the checkpoint's state is for {len(saved)} parameters in "
                         f"{len(state['param_groups'])} group(s), this model has "
                         f"{len(params)} in {len(optimizer.param_groups)}")
    for i, p in zip(saved, params, strict=True):
        for key, value in state["state"].get(i, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                name = (names or {}).get(p, f"parameter {i}")
                raise ValueError(f"{which}: the checkpoint's {key} of {name} has shape "
                                 f"{list(value.shape)}, the parameter {list(p.shape)}: the "
                                 f"state is from another model")
    own = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, hyper in zip(optimizer.param_groups, own, strict=True):
        group.update(hyper)


def rng_state() -> dict[str, Any]:
    """All global RNG states, as tensors and plain data."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d: "
                        "CUDA RNG not restored", len(cuda), torch.cuda.device_count())
