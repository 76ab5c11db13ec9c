"""Datasets: a registry of builders, one config dataclass, and loaders that resume exactly.

Every builder returns train/val/test datasets and a :class:`DataInfo` (input shape without the
batch dimension, number of classes). Small datasets that fit in memory (MNIST-1D, MNIST,
Fashion-MNIST, synthetic) are served as tensors by :class:`TensorLoader`, which is much faster than
a per-sample ``DataLoader`` for small models; the others go through ``torch.utils.data.DataLoader``
with the dataset's standard augmentation. Either way the shuffle order of epoch ``e`` is a function
of ``(seed, e)`` only, so a run resumed at an epoch boundary sees the same batches as one that
was never interrupted.

Nothing is downloaded unless ``download=True`` (or :func:`fetch`, which downloads MNIST,
Fashion-MNIST and CIFAR into a data folder beforehand): offline, a missing dataset is an error
that names the files and the folder they must be in.
"""

from .config import (
    DataBundle,
    DataConfig,
    DataInfo,
    DatasetNotFoundError,
    build_data,
    list_datasets,
    register_dataset,
)
from .datasets import cache_dir, fetch, load_mnist1d
from .loaders import EpochLoader, EpochSampler, ShardSampler, TensorLoader

__all__ = [
    "DataConfig",
    "DataInfo",
    "DataBundle",
    "DatasetNotFoundError",
    "build_data",
    "list_datasets",
    "register_dataset",
    "cache_dir",
    "fetch",
    "load_mnist1d",
    "TensorLoader",
    "EpochLoader",
    "EpochSampler",
    "ShardSampler",
]
