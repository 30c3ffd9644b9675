"""A torch `IterableDataset` over one hook of a run (optional: needs the torch extra).

    dataset = ActivationDataset("gs://bucket/run", "blocks.12.hook_resid_post", batch_size=4096,
                                dtype=torch.float32, epochs=3)
    for batch in dataset.loader():
        batch["activations"]  # [4096, width] float32, writable

The dataset yields whole batches (`loader()` builds the DataLoader with `batch_size=None`).
Tensors are always writable (a trainer may normalise a batch in place): batches the reader
hands out as read-only views (shuffle=False) are copied. `epochs` epochs in one pass, each
in its own shuffle order (None: without end, for trainers that count steps). Distributed
rank/world size come from torch.distributed when it is initialised; DataLoader workers
split each rank's share further, so every token is still seen exactly once per epoch.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from actex.reader.batch import Batch
from actex.reader.run import open_run


# DataLoader worker processes pay off only where cores are spare: the reader already
# fetches on threads, and each worker holds its own shuffle buffer. On 2 cores, 2 workers
# were slower than none (docs/training.md has the figures).
MIN_CPUS_FOR_WORKERS = 8


def to_torch(array: np.ndarray) -> torch.Tensor:
    """numpy -> a writable torch tensor, without a copy when the array is writable;
    bfloat16 (ml_dtypes) goes through an int16 view."""
    if not array.flags.writeable:  # a view of fetched bytes: torch must not alias it
        array = array.copy()
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def batch_to_torch(batch: Batch, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A batch as torch tensors; activations converted to `dtype` (None: the stored dtype)."""
    activations = to_torch(batch.activations)
    return {
        "activations": activations if dtype is None else activations.to(dtype),
        "token_ids": to_torch(batch.token_ids),
        "positions": to_torch(batch.positions),
        "sample_ids": to_torch(batch.sample_ids),
    }


def default_num_workers() -> int:
    """DataLoader workers: none below MIN_CPUS_FOR_WORKERS cores, else a quarter of them (at most 4)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cpus < MIN_CPUS_FOR_WORKERS else min(4, cpus // 4)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ActivationDataset(IterableDataset):
    """Batches of one hook; `iter_kwargs` go to `Run.iter_batches` (shuffle, seed, prefetch ...).

    dtype: torch dtype of the activations (e.g. torch.float32 for trainers that want it;
    default the stored dtype). epochs: epochs per pass over the dataset, starting at the
    epoch set by `set_epoch`, each in its own order (None: without end).
    """

    def __init__(self, url: str, hook: str, batch_size: int, *, storage_options: dict | None = None,
                 rank: int | None = None, world_size: int | None = None, dtype: torch.dtype | None = None,
                 epochs: int | None = 1, **iter_kwargs):
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None (without end), got {epochs}")
        self.url, self.hook, self.batch_size = url, hook, batch_size
        self.storage_options = storage_options or {}
        self.rank, self.world_size = rank, world_size
        self.dtype, self.epochs = dtype, epochs
        self.iter_kwargs = iter_kwargs
        # In shared memory: persistent DataLoader workers keep the copy of this dataset they
        # started with, and must still see the epoch the training loop sets afterwards.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """A new shuffle order per epoch (same for every rank and worker, persistent ones too)."""
        self._epoch.fill_(epoch)

    def loader(self, num_workers: int | None = None, **loader_kwargs) -> torch.utils.data.DataLoader:
        """A DataLoader over whole batches; num_workers None: `default_num_workers()`."""
        workers = default_num_workers() if num_workers is None else num_workers
        options = {"persistent_workers": workers > 0, **loader_kwargs}
        return torch.utils.data.DataLoader(self, batch_size=None, num_workers=workers, **options)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, world = _distributed()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        worker = get_worker_info()
        if worker is not None:  # each DataLoader worker takes its own slice of this rank's share
            rank, world = rank * worker.num_workers + worker.id, world * worker.num_workers
        run = open_run(self.url, **self.storage_options)
        first = self.epoch
        epochs = itertools.count(first) if self.epochs is None else range(first, first + self.epochs)
        for epoch in epochs:
            for batch in run.iter_batches(self.hook, self.batch_size, rank=rank, world_size=world, epoch=epoch,
                                          **self.iter_kwargs):
                yield batch_to_torch(batch, self.dtype)
