"""The data's config, what a builder returns, the registry of builders and ``build_data``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import Subset

from .loaders import EpochLoader, TensorLoader

log = logging.getLogger("neuralign.data")

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
    """What a model needs to know about the data: one example's shape, the number of classes
    (a target may also be one class per position, as for next-character prediction), and the
    inputs' dtype (token ids are integers)."""

    input_shape: tuple[int, ...]
    num_classes: int
    dtype: torch.dtype = torch.float32


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


