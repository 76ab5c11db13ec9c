"""Datasets: a registry of builders, one config dataclass, and loaders that resume exactly.

Every builder returns train/val/test datasets and a :class:`DataInfo` (input shape without the
batch dimension, number of classes). Small datasets that fit in memory (MNIST-1D, MNIST,
Fashion-MNIST, synthetic) are served as tensors by :class:`TensorLoader`, which is much faster than
a per-sample ``DataLoader`` for small models; the others go through ``torch.utils.data.DataLoader``
with the dataset's standard augmentation. Either way the shuffle order of epoch ``e`` is a function
of ``(seed, e)`` only, so a run resumed at an epoch boundary sees the same batches as one that
was never interrupted.

Nothing is downloaded unless ``download=True``: offline, a missing dataset is an error that names
the files and the folder they must be in.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from .io import atomic_write

log = logging.getLogger(__name__)

__all__ = [
    "DataConfig",
    "DataInfo",
    "DataBundle",
    "DatasetNotFoundError",
    "build_data",
    "list_datasets",
    "cache_dir",
    "load_mnist1d",
]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they must be (and ``download`` was not asked for)."""


@dataclass
class DataConfig:
    """Which data, where it lives, and how it is batched.

    Attributes:
        name: one of :func:`list_datasets`.
        data_dir: root folder of the torchvision / ImageFolder datasets (``--data-dir``).
        download: let torchvision download missing files (needs the network).
        batch_size: training batch size.
        eval_batch_size: batch size for validation and test.
        val_split: fraction of the training set held out as a validation set (0: none).
        workers: ``DataLoader`` worker processes (file-based datasets only).
        augment: the dataset's standard training augmentation (CIFAR: crop + flip;
            ImageNet: random-resized crop + flip; none for the others).
        num_samples: MNIST-1D: examples generated (80% train, 20% test; the package's
            default is 5000); synthetic: training examples. 0 means the default.
        shape: synthetic: input shape without the batch dimension.
        num_classes: synthetic: number of classes.
        seed: seed of the validation split and of the shuffle order.
    """

    name: str = "mnist1d"
    data_dir: str = "data"
    download: bool = False
    batch_size: int = 128
    eval_batch_size: int = 1000
    val_split: float = 0.0
    workers: int = 0
    augment: bool = True
    num_samples: int = 0
    shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 10
    seed: int = 0


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the data."""

    input_shape: tuple[int, ...]
    num_classes: int


@dataclass
class DataBundle:
    """Loaders of one dataset. ``val`` is ``None`` without a validation split."""

    train: TensorLoader | EpochLoader
    val: TensorLoader | EpochLoader | None
    test: TensorLoader | EpochLoader
    info: DataInfo

    def shard(self, rank: int, num_replicas: int) -> DataBundle:
        """Serve process ``rank``'s share of every loader (see :meth:`TensorLoader.shard`)."""
        for loader in (self.train, self.val, self.test):
            if loader is not None:
                loader.shard(rank, num_replicas)
        return self


# ---------------------------------------------------------------------------------------------
# loaders


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` whose order for epoch ``e`` is the single-process order.

    The permutation is ``randperm(n)`` from a generator seeded by ``(seed, e)``, as a single
    process draws it; rank ``r`` of ``R`` takes positions ``r, r+R, r+2R, …`` (padded by
    wrapping around to a multiple of ``R``). So with a per-process batch of ``B/R``, the ``R``
    batches of a step are together exactly the single-process batch of size ``B``.
    """

    def __init__(self, n: int, num_replicas: int, rank: int, seed: int = 0):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=0,
                         drop_last=False)
        self.base_seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        # DistributedSampler seeds its generator with ``seed + epoch``; seed is 0 here.
        super().set_epoch(_epoch_seed(self.base_seed, epoch))


class ShardSampler(Sampler[int]):
    """Positions ``rank, rank+R, …`` of ``range(n)``, unpadded (evaluation: each example once)."""

    def __init__(self, n: int, num_replicas: int, rank: int):
        self.n, self.num_replicas, self.rank = n, num_replicas, rank

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))


def _local_batch(batch_size: int, num_replicas: int) -> int:
    return max(1, -(-batch_size // num_replicas))


class TensorLoader:
    """Batches of in-memory tensors; the shuffle order of each epoch is set by :meth:`set_epoch`.

    Args:
        x: inputs, ``[N, ...]``.
        y: integer labels, ``[N]``.
        batch_size: examples per batch (the last batch may be smaller).
        shuffle: draw a fresh permutation every epoch.
        seed: base seed of the permutations.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                 seed: int = 0):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.rank, self.num_replicas = 0, 1

    @property
    def dataset_size(self) -> int:
        return len(self.x)

    def shard(self, rank: int, num_replicas: int) -> TensorLoader:
        """Serve only process ``rank``'s share: ``batch_size`` stays the global batch, each of
        the ``num_replicas`` processes gets ``batch_size / num_replicas`` examples of it (a
        shuffled loader through :class:`EpochSampler`; an evaluation loader every
        ``num_replicas``-th example, unpadded)."""
        self.rank, self.num_replicas = rank, num_replicas
        return self

    def to(self, device: torch.device | str) -> TensorLoader:
        """Keep the tensors on ``device`` (small datasets on a GPU: no copy per batch)."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _sharded(self) -> torch.Tensor:
        n = len(self.x)
        if not self.shuffle:
            return torch.arange(self.rank, n, self.num_replicas)
        sampler = EpochSampler(n, self.num_replicas, self.rank, self.seed)
        sampler.set_epoch(self.epoch)
        return torch.tensor(list(sampler), dtype=torch.long)

    def __len__(self) -> int:
        if self.num_replicas > 1:
            n = (-(-len(self.x) // self.num_replicas) if self.shuffle
                 else len(range(self.rank, len(self.x), self.num_replicas)))
            return -(-n // _local_batch(self.batch_size, self.num_replicas))
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_replicas > 1:
            idx = self._sharded()
            bs = _local_batch(self.batch_size, self.num_replicas)
            for start in range(0, len(idx), bs):
                i = idx[start:start + bs]
                yield self.x[i], self.y[i]
            return
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
            else:
                idx = order[start:start + self.batch_size]
                yield self.x[idx], self.y[idx]


class EpochLoader:
    """A ``DataLoader`` whose shuffle order and worker seeds depend only on (seed, epoch)."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, workers: int,
                 seed: int = 0, pin_memory: bool = False):
        self.seed = seed
        self.epoch = 0
        self.generator = torch.Generator()
        self.batch_size, self.shuffle, self.workers = batch_size, shuffle, workers
        self.pin_memory = pin_memory
        self.dataset = dataset
        self._build(0, 1)

    def _build(self, rank: int, num_replicas: int) -> None:
        # The shuffle order comes from an EpochSampler (a DistributedSampler), with one
        # process as with several, so the shares of R processes make up one process's batches;
        # the generator only seeds the workers.
        self.rank, self.num_replicas = rank, num_replicas
        n = len(self.dataset)
        self.sampler: EpochSampler | ShardSampler | None = (
            EpochSampler(n, num_replicas, rank, self.seed) if self.shuffle
            else ShardSampler(n, num_replicas, rank) if num_replicas > 1 else None)
        self.loader = DataLoader(
            self.dataset, batch_size=_local_batch(self.batch_size, num_replicas),
            sampler=self.sampler, num_workers=self.workers, generator=self.generator,
            pin_memory=self.pin_memory, persistent_workers=False, drop_last=False,
        )

    @property
    def dataset_size(self) -> int:
        return len(self.dataset)

    def shard(self, rank: int, num_replicas: int) -> EpochLoader:
        """Serve only process ``rank``'s share (as :meth:`TensorLoader.shard`), through a
        ``DistributedSampler`` (:class:`EpochSampler`) when shuffled."""
        if (rank, num_replicas) != (self.rank, self.num_replicas):
            self._build(rank, num_replicas)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.sampler, EpochSampler):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # the generator also seeds the workers (augmentation): a different stream per rank
        self.generator.manual_seed(_epoch_seed(self.seed, self.epoch) + 7919 * self.rank)
        return iter(self.loader)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 12345) % (2**63)


# ---------------------------------------------------------------------------------------------
# registry

_Builder = Callable[[DataConfig], tuple[object, object, DataInfo]]
_DATASETS: dict[str, _Builder] = {}


def register_dataset(name: str) -> Callable[[_Builder], _Builder]:
    """Register a builder ``cfg -> (train, test, info)``; train/test are tensors pairs or Datasets.

    A builder returns either ``(x, y)`` tensor pairs (served by :class:`TensorLoader`) or, for
    file-based data, a pair ``(train_dataset, train_eval_dataset)`` for train and a Dataset for
    test (the eval copy of the training set, without augmentation, backs the validation split).
    """

    def deco(fn: _Builder) -> _Builder:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    """Names accepted by ``DataConfig.name``."""
    return sorted(_DATASETS)


def build_data(cfg: DataConfig, pin_memory: bool = False) -> DataBundle:
    """Build the train/validation/test loaders described by ``cfg``."""
    if cfg.name not in _DATASETS:
        raise ValueError(f"unknown dataset {cfg.name!r}; valid: {', '.join(list_datasets())}")
    if not 0.0 <= cfg.val_split < 1.0:
        raise ValueError(f"data.val_split must be in [0, 1), got {cfg.val_split}")
    if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        raise ValueError("data.batch_size and data.eval_batch_size must be positive")
    train, test, info = _DATASETS[cfg.name](cfg)

    if isinstance(train, tuple) and isinstance(train[0], torch.Tensor):
        x, y = train
        tr_idx, val_idx = _split(len(x), cfg.val_split, cfg.seed)
        train_loader = TensorLoader(x[tr_idx], y[tr_idx], cfg.batch_size, True, cfg.seed)
        val_loader = (TensorLoader(x[val_idx], y[val_idx], cfg.eval_batch_size, False)
                      if val_idx is not None else None)
        test_loader = TensorLoader(test[0], test[1], cfg.eval_batch_size, False)
    else:
        train_ds, train_eval_ds = train
        tr_idx, val_idx = _split(len(train_ds), cfg.val_split, cfg.seed)

        def mk(ds, bs, shuffle):
            return EpochLoader(ds, bs, shuffle, cfg.workers, cfg.seed, pin_memory)

        train_loader = mk(Subset(train_ds, tr_idx.tolist()) if val_idx is not None else train_ds,
                          cfg.batch_size, True)
        val_loader = (mk(Subset(train_eval_ds, val_idx.tolist()), cfg.eval_batch_size, False)
                      if val_idx is not None else None)
        test_loader = mk(test, cfg.eval_batch_size, False)
    log.info("data %s: %d train, %s val, %d test examples, input %s, %d classes", cfg.name,
             train_loader.dataset_size, val_loader.dataset_size if val_loader else 0,
             test_loader.dataset_size, tuple(info.input_shape), info.num_classes)
    return DataBundle(train_loader, val_loader, test_loader, info)


def _split(n: int, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A fixed random split of ``range(n)`` into train and validation indices."""
    if frac <= 0:
        return torch.arange(n), None
    n_val = max(1, int(round(n * frac)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2024))
    return order[n_val:].sort().values, order[:n_val].sort().values


# ---------------------------------------------------------------------------------------------
# MNIST-1D


def cache_dir() -> Path:
    """neuralign's cache folder: ``$NEURALIGN_CACHE``, else ``$XDG_CACHE_HOME/neuralign``,
    else ``~/.cache/neuralign``."""
    if os.environ.get("NEURALIGN_CACHE"):
        return Path(os.environ["NEURALIGN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "neuralign"


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
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in ("x", "y", "x_test", "y_test")}
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
    atomic_write(path, lambda f: np.savez(f, **out))
    return out


@register_dataset("mnist1d")
def _mnist1d(cfg: DataConfig):
    d = load_mnist1d(cfg.num_samples)
    x, x_test = torch.from_numpy(d["x"]), torch.from_numpy(d["x_test"])
    train = (x.unsqueeze(1), torch.from_numpy(d["y"]))
    test = (x_test.unsqueeze(1), torch.from_numpy(d["y_test"]))
    return train, test, DataInfo((1, x.shape[-1]), 10)


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
                 extra=" (the raw idx files, uncompressed; ../shared/tools/fetch-mnist DIR "
                       "writes them)")
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
