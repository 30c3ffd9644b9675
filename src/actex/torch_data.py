"""A torch `IterableDataset` over one hook of a run (optional: needs the torch extra).

    dataset = ActivationDataset("gs://bucket/run", "blocks.12.hook_resid_post", batch_size=4096)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for batch in loader: batch["activations"]  # [4096, width] torch tensor

The dataset yields whole batches (use `batch_size=None` in the DataLoader). Distributed
rank/world size come from torch.distributed when it is initialised; DataLoader workers
split each rank's share further, so every token is still seen exactly once per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from actex.store.reader import Batch, open_run


def to_torch(array: np.ndarray) -> torch.Tensor:
    """numpy -> torch without a copy; bfloat16 (ml_dtypes) goes through an int16 view."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def batch_to_torch(batch: Batch) -> dict[str, torch.Tensor]:
    return {
        "activations": to_torch(batch.activations),
        "token_ids": to_torch(batch.token_ids),
        "positions": to_torch(batch.positions),
        "sample_ids": to_torch(batch.sample_ids),
    }


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ActivationDataset(IterableDataset):
    """Batches of one hook; `iter_kwargs` go to `Run.iter_batches` (shuffle, seed, prefetch ...)."""

    def __init__(self, url: str, hook: str, batch_size: int, *, storage_options: dict | None = None,
                 rank: int | None = None, world_size: int | None = None, **iter_kwargs):
        self.url, self.hook, self.batch_size = url, hook, batch_size
        self.storage_options = storage_options or {}
        self.rank, self.world_size = rank, world_size
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

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, world = _distributed()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        worker = get_worker_info()
        if worker is not None:  # each DataLoader worker takes its own slice of this rank's share
            rank, world = rank * worker.num_workers + worker.id, world * worker.num_workers
        run = open_run(self.url, **self.storage_options)
        batches = run.iter_batches(self.hook, self.batch_size, rank=rank, world_size=world, epoch=self.epoch,
                                   **self.iter_kwargs)
        return map(batch_to_torch, batches)
