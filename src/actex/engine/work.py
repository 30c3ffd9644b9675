"""Where a worker's chunks come from, and what part of the work this process does.

The engine asks a ChunkSource for chunk indices and tells it when each one is committed.
Two seams keep the other execution modes out of the loop:

* ChunkSource: static assignment (chunk k goes to worker k mod N) lives here; dynamic
  claiming with leases (`--claim`) is another source with the same two methods.
* ProcessRole: which rows of a global batch this process holds and writes, and whether it
  writes commit records. One process holds every row and commits; a multi-host pod slice
  gives each process its rows and lets process 0 commit after a barrier.

A worker stops taking chunks when its stop event is set (pre-emption, Ctrl-C); the chunk
in flight is finished or, past the pre-emption deadline, abandoned by exiting the process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

# Environment variables a scheduler sets to a worker's index, in the order we trust them:
# TPU VMs of a multi-host slice, Cloud TPU tasks, Kubernetes indexed Jobs.
WORKER_INDEX_ENV = ("TPU_WORKER_ID", "CLOUD_TPU_TASK_ID", "JOB_COMPLETION_INDEX")


class ChunkSource(Protocol):
    """Hands out the chunk indices this worker should compute."""

    def chunks(self, stop: threading.Event) -> Iterator[int]:
        """Chunk indices to compute, one at a time; ends when no work is left or stop is set."""
        ...

    def finished(self, chunk: int) -> None:
        """The chunk is no longer in flight here: its commit record exists (written by this
        worker or another), or this worker gave up on it (its writes failed for good)."""
        ...


@dataclass(frozen=True)
class StaticChunks:
    """Chunk k belongs to worker k mod N: no coordination, and no takeover of dead workers."""

    num_chunks: int
    worker_index: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"--num-workers must be >= 1, got {self.num_workers}")
        if not 0 <= self.worker_index < self.num_workers:
            raise ValueError(
                f"--worker-index {self.worker_index} out of range for {self.num_workers} worker(s)"
            )

    def assigned(self) -> range:
        """This worker's chunks, committed or not."""
        return range(self.worker_index, self.num_chunks, self.num_workers)

    def chunks(self, stop: threading.Event) -> Iterator[int]:
        for chunk in self.assigned():
            if stop.is_set():
                return
            yield chunk

    def finished(self, chunk: int) -> None:
        """Nothing to release: the assignment is fixed."""


def worker_index_from_env(environ: dict[str, str] | None = None) -> int | None:
    """The worker index a scheduler gave this process, or None when none did."""
    environ = os.environ if environ is None else environ
    for name in WORKER_INDEX_ENV:
        value = environ.get(name, "").strip()
        if value:
            if not value.isdigit():
                raise ValueError(f"{name}={value!r} is not a worker index (expected an integer >= 0)")
            return int(value)
    return None


def _no_barrier(name: str) -> None:
    """A single process has nobody to wait for."""


@dataclass(frozen=True)
class ProcessRole:
    """This process's share of every global batch, and whether it writes commit records.

    `holds(row)` selects the packed rows whose activations this process copies to host and
    writes; `barrier(name)` returns once every process reached it (before the commit).
    Only the single-process role is built today. A pod-slice role (jax.distributed) sets
    index/count from jax.process_index()/process_count(), its barrier from the
    coordination service, and must hand the committer the other processes' part records.
    """

    index: int = 0
    count: int = 1
    barrier: Callable[[str], None] = field(default=_no_barrier, compare=False)

    def holds(self, row: int, num_rows: int) -> bool:
        # Contiguous row blocks, as a batch axis sharded over processes lays them out.
        per_process = -(-num_rows // self.count)
        return row // per_process == self.index

    @property
    def commits(self) -> bool:
        return self.index == 0


SINGLE_PROCESS = ProcessRole()
