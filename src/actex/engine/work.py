"""Where a worker's chunks come from, and what part of the work this process does.

The engine asks a ChunkSource for chunk indices and tells it when each one is committed.
Two seams keep the other execution modes out of the loop:

* ChunkSource: static assignment (chunk k goes to worker k mod N) lives here; dynamic
  claiming with leases (`--claim`) is another source with the same two methods.
* ProcessRole: this process's place in a slice, and whether it writes commit records. One
  process holds every row and commits; a multi-host pod slice gives each process its rows
  (which ones, and whether it writes them, the mesh says: mesh.process_rows) and lets
  process 0 commit after a barrier.

A worker stops taking chunks when its stop event is set (pre-emption, Ctrl-C); the chunk
in flight is finished or, past the pre-emption deadline, abandoned by exiting the process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

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


def check_static_share(worker_index: int, num_workers: int) -> None:
    """A one-line ValueError for a worker count below 1 or an index outside 0..N-1."""
    if num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {num_workers}")
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"--worker-index {worker_index} out of range for {num_workers} worker(s)")


@dataclass(frozen=True)
class StaticChunks:
    """Chunk k belongs to worker k mod N: no coordination, and no takeover of dead workers."""

    num_chunks: int
    worker_index: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        check_static_share(self.worker_index, self.num_workers)

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


def _only_value(name: str, value: str) -> list[str]:
    """A single process gathers its own value."""
    return [value]


def _own_value(name: str, make: Callable[[], Any]) -> Any:
    """A single process is process 0: its value is the value."""
    return make()


@dataclass(frozen=True)
class ProcessRole:
    """This process's place among the processes of one run, and how they agree.

    One process is process 0 of 1 and every method is trivial. A pod slice
    (engine/distributed.py) fills them from the coordination service:
    `barrier(name)` returns once every process reached it; `gather(name, value)` gives
    process 0 every process's value (by index; None elsewhere) once all arrived;
    `share(name, make)` runs make() on process 0 and hands its JSON result to everyone;
    `allgather(name, value)` hands every process every process's value (by index).
    Each process writes the rows of the global batch it holds (of a model group spanning
    processes, only the group's first: mesh.RowShare); process 0 commits.
    """

    index: int = 0
    count: int = 1
    barrier: Callable[[str], None] = field(default=_no_barrier, compare=False)
    gather: Callable[[str, str], list[str] | None] = field(default=_only_value, compare=False)
    share: Callable[[str, Callable[[], Any]], Any] = field(default=_own_value, compare=False)
    allgather: Callable[[str, str], list[str]] = field(default=_only_value, compare=False)

    @property
    def commits(self) -> bool:
        return self.index == 0


SINGLE_PROCESS = ProcessRole()
