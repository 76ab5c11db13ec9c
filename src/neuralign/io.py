"""Every file the package writes, and the small helpers its tables and plots share.

Writes are atomic: a temporary file in the target's folder, flushed and fsynced, given the
permissions an ordinary file would get (``0o666`` less the umask, where ``mkstemp`` would give
``0o600``), then renamed over the target with ``os.replace``. A reader, or a crash, sees the old
file or the new one, never half of one. A folder that one process writes at a time (a run
folder) is locked with :func:`lock_folder`; :func:`os_error_message` tells an OS error in one
line. Standard library only (NumPy, PyYAML and matplotlib are imported by the functions that
need them).
"""

from __future__ import annotations

import csv
import errno
import math
import os
import statistics
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

__all__ = ["cache_dir", "atomic_write", "write_text", "write_yaml", "write_csv", "read_csv", "save_figure",
           "pyplot", "whole_number_ticks", "markdown_table", "mean_std", "split_list", "summarize",
           "os_error_message", "lock_folder", "FolderInUseError", "LOCK_FILE"]

#: The lock file of a folder in use (:func:`lock_folder`).
LOCK_FILE = ".lock"

#: What to do about an OS error, by errno (:func:`os_error_message`).
_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space on it, or write elsewhere (--runs-dir, "
                  "NEURALIGN_CACHE)",
    errno.EDQUOT: "the disk quota is used up: free some space, or write elsewhere (--runs-dir, "
                  "NEURALIGN_CACHE)",
    errno.EACCES: "choose a folder you may write (--runs-dir, --data-dir, NEURALIGN_CACHE) or "
                  "change its permissions",
    errno.EPERM: "choose a folder you may write (--runs-dir, --data-dir, NEURALIGN_CACHE) or "
                 "change its permissions",
    errno.EROFS: "the file system is mounted read-only: write elsewhere (--runs-dir, "
                 "NEURALIGN_CACHE)",
    errno.ENOTDIR: "a part of this path is a file where a folder belongs: move the file, or "
                   "choose another path",
    errno.EISDIR: "this is a folder where a file belongs: give the file's path",
    errno.EEXIST: "a file is in the way of a folder: move it, or choose another path",
}


def os_error_message(e: OSError) -> str:
    """One line for an OS error: what failed, on which path, and what to do. An ``OSError``
    made from a message alone (no errno) is one already: its text."""
    if e.errno is None:
        return str(e)
    where = f": {str(e.filename)!r}" if e.filename is not None else ""
    advice = _ADVICE.get(e.errno)
    return f"{e.strerror or os.strerror(e.errno)}{where}" + (f"; {advice}" if advice else "")


class FolderInUseError(OSError):
    """Another process holds the folder's lock (:func:`lock_folder`)."""


def lock_folder(folder: str | Path, what: str = "run folder") -> IO | None:
    """Hold an exclusive advisory lock on ``folder`` (created if missing) for as long as the
    returned file stays open: ``fcntl.flock`` on ``folder/.lock``. The OS releases it when the
    file is closed or the process ends, however it ends (``kill -9`` included), so a dead
    process leaves no lock behind. None where ``fcntl`` does not exist (Windows: no lock).

    Raises:
        FolderInUseError: another process holds it.
    """
    try:
        import fcntl
    except ImportError:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK_FILE, "a")  # (the lock file is never written: its bytes stay)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise FolderInUseError(
            f"{what} {str(folder)!r} is in use by another process (training or resuming "
            f"it): wait for that process to end, or stop it, and try again (a new run can "
            f"take another --name); a process that died holds no lock") from None
    return f


def cache_dir() -> Path:
    """neuralign's cache folder: ``$NEURALIGN_CACHE``, else ``$XDG_CACHE_HOME/neuralign``,
    else ``~/.cache/neuralign``."""
    if os.environ.get("NEURALIGN_CACHE"):
        return Path(os.environ["NEURALIGN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "neuralign"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO], Any], binary: bool = True,
                 keep_previous: str | Path | None = None) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder, which
    then replaces ``path``.

    Args:
        path: the file to write (its folder is created).
        write: called with the open temporary file.
        binary: open it in binary mode (else text, newline="").
        keep_previous: if given and ``path`` exists, the old file is first renamed there (one
            generation kept, e.g. a checkpoint's predecessor).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # (name the folder, not the temporary file)
        raise OSError(e.errno, e.strerror, str(path.parent)) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is not None and e.filename in (None, tmp):  # name the target, not tmp
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``text`` to ``path``, atomically."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def write_yaml(data: Any, path: str | Path) -> Path:
    """Plain data as YAML (sections as blocks, short lists inline), atomically."""
    import yaml

    return write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=None))


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Dict rows (the union of their keys, in first-seen order; floats with 6 significant
    digits) to ``path``, atomically."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def write(f):
        w = csv.DictWriter(f, fieldnames=keys, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})

    return atomic_write(path, write, binary=False)


def read_csv(path: str | Path) -> list[dict[str, float | str]]:
    """Rows of a CSV file; numbers are parsed as floats (empty cells as NaN)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, float | str] = {}
            for k, v in r.items():
                try:
                    row[k] = float(v) if v != "" else math.nan
                except ValueError:
                    row[k] = v
            out.append(row)
    return out


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def whole_number_ticks(ax) -> None:
    """Ticks at whole numbers only on a matplotlib axes' x axis (epochs, trials, depths)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """A matplotlib figure as PNG, atomically; the figure is closed."""
    try:
        return atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format="png"))
    finally:
        pyplot().close(fig)


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]],
                   number: Callable[[float], str] = "{:.1f}".format) -> str:
    """A Markdown table; floats through ``number``, NaN (and None) as an en dash."""

    def cell(v):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "–"
        return number(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (0 for one, NaN for none)."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def split_list(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a,b:x=[1,2],c"`` -> ``['a', 'b:x=[1,2]', 'c']``."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [s for s in out if s]


def summarize(history: list[dict], status: str, wall_s: float) -> dict[str, Any]:
    """One run's summary from its metrics history: final and best test top-1, the last
    epoch's validation top-1 and its best, angles, lag, training loss, epochs, time."""
    nan = math.nan
    last = history[-1] if history else {}

    def get(k):
        v = last.get(k, nan)
        return float(v) if isinstance(v, (int, float)) else nan

    tests = [h["test_top1"] for h in history if "test_top1" in h]
    vals = [h["val_top1"] for h in history if "val_top1" in h]
    best = max(range(len(tests)), key=tests.__getitem__) if tests else None
    return {
        "status": status,
        "epochs": len(history),
        "test_top1": get("test_top1"),
        "best_test_top1": tests[best] if best is not None else nan,
        "best_epoch": int(history[best]["epoch"]) if best is not None else nan,
        "val_top1": get("val_top1"),
        "best_val_top1": max(vals) if vals else nan,
        "train_loss": get("train_loss"),
        "weight_angle": get("weight_angle"),
        "backprop_angle": get("backprop_angle"),
        "feedback_lag": get("feedback_lag"),
        "epoch_time_s": (statistics.fmean(h["epoch_time_s"] for h in history)
                         if history else nan),
        "wall_s": wall_s,
    }
