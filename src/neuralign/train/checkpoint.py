"""Checkpoint files: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain Python data only (no pickled objects), so it loads
with the safe unpickler: the model's state dict (forward weights W and feedback weights F), both
optimizers, both schedules, the RNG states (torch CPU and CUDA, NumPy, Python), the epoch and step
reached, the metrics history and the resolved config.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_write

log = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "load_checkpoint", "previous_path", "rng_state", "set_rng_state"]


def previous_path(path: str | Path) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaced (``last.prev.pt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`neuralign.io.atomic_write`).

    A crash while writing leaves the previous file at ``path`` intact. The file it replaces is
    kept as :func:`previous_path` (one generation), in case the new one is ever unreadable.
    """
    path = atomic_write(path, lambda f: torch.save(state, f), keep_previous=previous_path(path))
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
