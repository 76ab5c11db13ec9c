"""Loaders whose shuffle order is a function of ``(seed, epoch)`` only: a run resumed at an
epoch boundary sees the same batches, and distributed shares make up the single process's."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

log = logging.getLogger("neuralign.data")

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
        """The number of examples in the whole dataset (all shards)."""
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
        """Set the epoch that seeds the next pass's shuffle (the same order on every rank)."""
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
        """The number of examples in the whole dataset (all shards)."""
        return len(self.dataset)

    def shard(self, rank: int, num_replicas: int) -> EpochLoader:
        """Serve only process ``rank``'s share (as :meth:`TensorLoader.shard`), through a
        ``DistributedSampler`` (:class:`EpochSampler`) when shuffled."""
        if (rank, num_replicas) != (self.rank, self.num_replicas):
            self._build(rank, num_replicas)
        return self

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next pass's shuffle (the same order on every rank)."""
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


