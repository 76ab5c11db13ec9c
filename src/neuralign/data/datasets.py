"""The datasets: MNIST-1D (generated locally, cached), synthetic, MNIST, Fashion-MNIST,
CIFAR-10/100 and ImageNet (torchvision, from ``data_dir``), and :func:`fetch`, which downloads
the torchvision ones into ``data_dir``."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write, cache_dir, os_error_message
from .config import DataConfig, DataInfo, DatasetNotFoundError, list_datasets, register_dataset

log = logging.getLogger("neuralign.data")

# ---------------------------------------------------------------------------------------------
# MNIST-1D


def load_mnist1d(num_samples: int = 0) -> dict[str, np.ndarray]:
    """MNIST-1D (Greydanus & Kobak) from the ``mnist1d`` package's generator, cached.

    The data are generated locally with the package's default arguments (only ``num_samples``
    may change; 0 keeps the default 5000: 4000 train, 1000 test) and stored once as ``.npz``
    in :func:`cache_dir`. The package's download path is never used.

    Returns:
        ``{'x': [N, 40] float32, 'y': [N] int64, 'x_test': ..., 'y_test': ...}``.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    if num_samples:
        if num_samples < 50:
            raise ValueError(f"data.num_samples={num_samples}: MNIST-1D needs at least 50 "
                             f"examples (80% train, 20% test, 10 classes); 0 for the default "
                             f"5000")
        args.num_samples = int(num_samples)
    keys = ("num_samples", "train_split", "template_len", "padding", "scale_coeff",
            "max_translation", "corr_noise_scale", "iid_noise_scale", "shear_scale",
            "shuffle_seq", "final_seq_length", "seed")
    tag = hashlib.sha1(repr([getattr(args, k) for k in keys]).encode()).hexdigest()[:10]
    path = cache_dir() / f"mnist1d-{args.num_samples}-{tag}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return {k: z[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception as e:  # a cache is only a cache: make it again
            log.warning("the cached MNIST-1D %s cannot be read (%s: %s): generating it again",
                        path, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    log.info("generating MNIST-1D (%d examples) into %s", args.num_samples, path)
    # make_dataset seeds numpy's and Python's global generators: keep the caller's state.
    import random

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        ds = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    out = {
        "x": ds["x"].astype(np.float32), "y": ds["y"].astype(np.int64),
        "x_test": ds["x_test"].astype(np.float32), "y_test": ds["y_test"].astype(np.int64),
    }
    try:
        atomic_write(path, lambda f: np.savez(f, **out))
    except OSError as e:  # a cache that cannot be written: the data are made each time
        log.warning("cannot cache MNIST-1D (%s); it will be generated again next time (set "
                    "NEURALIGN_CACHE to a folder you may write)", os_error_message(e))
    return out


@register_dataset("mnist1d")
def _mnist1d(cfg: DataConfig):
    d = load_mnist1d(cfg.num_samples)
    x, x_test = torch.from_numpy(d["x"]), torch.from_numpy(d["x_test"])
    train = (x.unsqueeze(1), torch.from_numpy(d["y"]))
    test = (x_test.unsqueeze(1), torch.from_numpy(d["y_test"]))
    return train, test, DataInfo((1, x.shape[-1]), 10)


# ---------------------------------------------------------------------------------------------
# pydoc: characters of Python's own documentation, for next-character prediction

#: context length of a ``pydoc`` example; the vocabulary: newline, the 95 printable ASCII
#: characters, and one id for anything else
PYDOC_CONTEXT, PYDOC_VOCAB = 64, 97


@register_dataset("pydoc")
def _pydoc(cfg: DataConfig):
    """The text of ``pydoc_data.topics`` (Python's language reference topics, shipped with
    every CPython, so offline): sequences of 64 characters, each position's target the next
    character. The last tenth of the text is the test set. ``num_samples`` caps the number
    of training sequences."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    code = torch.from_numpy(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64))
    ids = torch.where(code == 10, 0, torch.where((code >= 32) & (code < 127), code - 31,
                                                 PYDOC_VOCAB - 1))
    n = (len(ids) - 1) // PYDOC_CONTEXT
    x = ids[:n * PYDOC_CONTEXT].view(n, PYDOC_CONTEXT)
    y = ids[1:n * PYDOC_CONTEXT + 1].view(n, PYDOC_CONTEXT)
    split = n - n // 10
    n_train = min(split, cfg.num_samples) if cfg.num_samples else split
    return ((x[:n_train], y[:n_train]), (x[split:], y[split:]),
            DataInfo((PYDOC_CONTEXT,), PYDOC_VOCAB, torch.int64))


# ---------------------------------------------------------------------------------------------
# synthetic


@register_dataset("synthetic")
def _synthetic(cfg: DataConfig):
    n = cfg.num_samples or 1024
    g = torch.Generator().manual_seed(cfg.seed + 99)
    shape = tuple(int(s) for s in cfg.shape)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    n_test = max(1, n // 4)
    xt = torch.randn(n_test, *shape, generator=g)
    yt = torch.randint(0, cfg.num_classes, (n_test,), generator=g)
    return (x, y), (xt, yt), DataInfo(shape, cfg.num_classes)


# ---------------------------------------------------------------------------------------------
# torchvision datasets

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _require(root: Path, files: list[str], name: str, extra: str = "") -> None:
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        listing = "\n".join(f"  {root / f}" for f in files)
        raise DatasetNotFoundError(
            f"{name} not found under data_dir {str(root)!r}: missing {', '.join(missing)}.\n"
            f"Expected layout:\n{listing}\n"
            f"Pass --data-dir DIR (data.data_dir) pointing at the folder that holds it, or "
            f"--download (data.download=true) when online.{extra}"
        )


def _mnist_like(cfg: DataConfig, cls_name: str, folder: str, mean: float, std: float):
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    root = Path(cfg.data_dir).expanduser()
    if not cfg.download:
        _require(root, [f"{folder}/raw/{f}" for f in _MNIST_FILES], cls_name,
                 extra=" (the raw idx files, uncompressed; `neuralign fetch "
                       f"{'mnist' if folder == 'MNIST' else 'fashion-mnist'} --data-dir DIR` "
                       f"downloads them)")
    tr = cls(str(root), train=True, download=cfg.download)
    te = cls(str(root), train=False, download=cfg.download)

    def prep(ds):
        x = ds.data.to(torch.float32).div_(255.0).sub_(mean).div_(std).unsqueeze(1)
        return x, ds.targets.to(torch.int64)

    return prep(tr), prep(te), DataInfo((1, 28, 28), 10)


@register_dataset("mnist")
def _mnist(cfg: DataConfig):
    return _mnist_like(cfg, "MNIST", "MNIST", 0.1307, 0.3081)


@register_dataset("fashion-mnist")
def _fashion(cfg: DataConfig):
    return _mnist_like(cfg, "FashionMNIST", "FashionMNIST", 0.2860, 0.3530)


_CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10, (0.4914, 0.4822, 0.4465),
                (0.2470, 0.2435, 0.2616),
                ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta"]),
    "cifar100": ("CIFAR100", "cifar-100-python", 100, (0.5071, 0.4865, 0.4409),
                 (0.2673, 0.2564, 0.2762), ["train", "test", "meta"]),
}


def _cifar(cfg: DataConfig, key: str):
    import torchvision
    from torchvision import transforms as T

    cls_name, folder, n_cls, mean, std, files = _CIFAR[key]
    cls = getattr(torchvision.datasets, cls_name)
    root = Path(cfg.data_dir).expanduser()
    if not cfg.download:
        _require(root, [f"{folder}/{f}" for f in files], cls_name,
                 extra=" (the extracted python version of the archive)")
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if cfg.augment else []
    train = cls(str(root), train=True, download=cfg.download, transform=T.Compose(aug + norm))
    train_eval = cls(str(root), train=True, download=False, transform=T.Compose(norm))
    test = cls(str(root), train=False, download=cfg.download, transform=T.Compose(norm))
    return (train, train_eval), test, DataInfo((3, 32, 32), n_cls)


@register_dataset("cifar10")
def _cifar10(cfg: DataConfig):
    return _cifar(cfg, "cifar10")


@register_dataset("cifar100")
def _cifar100(cfg: DataConfig):
    return _cifar(cfg, "cifar100")


#: The datasets :func:`fetch` downloads: name -> (torchvision class, the files it reads,
#: relative to ``data_dir``).
_DOWNLOADS: dict[str, tuple[str, list[str]]] = {
    "mnist": ("MNIST", [f"MNIST/raw/{f}" for f in _MNIST_FILES]),
    "fashion-mnist": ("FashionMNIST", [f"FashionMNIST/raw/{f}" for f in _MNIST_FILES]),
    **{name: (cls, [f"{folder}/{f}" for f in files])
       for name, (cls, folder, _, _, _, files) in _CIFAR.items()},
}


def fetch(name: str, data_dir: str | Path = "data") -> list[Path]:
    """Download a dataset with torchvision into ``data_dir``, in the layout training reads
    (``--data-dir``, ``data.data_dir``); files already there are kept.

    It needs the network. Offline, put the files this returns where it says, e.g. MNIST's four
    idx files, uncompressed, in ``DATA_DIR/MNIST/raw/`` (copied from a machine where this ran).

    Args:
        name: ``mnist``, ``fashion-mnist``, ``cifar10`` or ``cifar100``.
        data_dir: the folder training reads the datasets from.

    Returns:
        The dataset's files under ``data_dir``.

    Raises:
        ValueError: a dataset that is not downloaded (MNIST-1D, pydoc and synthetic are made
            locally; ImageNet is never downloaded).
        DatasetNotFoundError: the download failed; the message names every file to put in
            place.
    """
    if name not in _DOWNLOADS:
        why = ("ImageNet is never downloaded (see the layout in docs/cli.md, Data)"
               if name == "imagenet" else f"{name!r} is made locally: nothing to fetch"
               if name in list_datasets() else f"unknown dataset {name!r}")
        raise ValueError(f"{why}; datasets to fetch: {', '.join(_DOWNLOADS)}")
    import torchvision

    cls_name, files = _DOWNLOADS[name]
    root = Path(data_dir).expanduser()
    try:
        for train in (True, False):
            getattr(torchvision.datasets, cls_name)(str(root), train=train, download=True)
    except (OSError, RuntimeError) as e:  # no network: URLError, or torchvision's own error
        listing = "\n".join(f"  {root / f}" for f in files)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetNotFoundError(
            f"{name}: the download into {str(root)!r} failed ({reason}). Offline, put these "
            f"files in place (e.g. copied from a machine where `neuralign fetch {name}` "
            f"ran):\n{listing}") from None
    _require(root, files, cls_name)
    return [root / f for f in files]


@register_dataset("imagenet")
def _imagenet(cfg: DataConfig):
    import torchvision
    from torchvision import transforms as T

    root = Path(cfg.data_dir).expanduser()
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir() or not any(p.is_dir() for p in d.iterdir()):
            raise DatasetNotFoundError(
                f"ImageNet not found: {str(d)!r} is missing or has no class folders.\n"
                f"Expected layout (torchvision ImageFolder):\n"
                f"  {root}/train/<class>/<image>.JPEG\n  {root}/val/<class>/<image>.JPEG\n"
                f"with the same class folders (e.g. n01440764) in both. Pass --data-dir DIR. "
                f"ImageNet is never downloaded."
            )
    norm = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    aug = ([T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if cfg.augment
           else [T.Resize(256), T.CenterCrop(224)])
    evals = [T.Resize(256), T.CenterCrop(224)]
    train = torchvision.datasets.ImageFolder(str(root / "train"), T.Compose(aug + norm))
    train_eval = torchvision.datasets.ImageFolder(str(root / "train"), T.Compose(evals + norm))
    test = torchvision.datasets.ImageFolder(str(root / "val"), T.Compose(evals + norm))
    if train.classes != test.classes:
        raise DatasetNotFoundError(
            f"ImageNet train/ has {len(train.classes)} class folders, val/ has "
            f"{len(test.classes)}; they must be the same")
    return (train, train_eval), test, DataInfo((3, 224, 224), len(train.classes))
