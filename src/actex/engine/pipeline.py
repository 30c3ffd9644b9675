"""The extraction pipeline behind the forward pass: device->host, assembly, parts, commits.

Three kinds of threads, so that the accelerator never waits for I/O:

    main thread      tokenize, pack, dispatch the jitted capture of batch n+1, then hand
                     batch n's device arrays to the host lane (JAX dispatch is async, so
                     batch n+1 is already queued on the device while n is being fetched).
    host lane (1)    jax.device_get, scatter rows into per-sample buffers, cut parts at the
                     shard size; in submission order, so chunk ends follow their batches.
    writers (N)      encode a part (safetensors), hash it, upload it; several at once for
                     object stores, where one upload is latency-bound.
    commit lane (1)  wait for a chunk's parts, write samples.jsonl, then the commit record.

Each hand-off is bounded (the host lane's queue, the writers' in-flight parts), so a slow
store slows the forward passes down instead of filling memory: backpressure.

Exactly-once: a chunk's bytes go under a fresh attempt id, and the commit record, created
exclusively and LAST, is what makes them exist. A crash at any moment leaves either no
record (the chunk is redone under a new attempt; the old one is garbage) or a complete one.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import jax
import numpy as np

from actex.data.positions import EVERY_POSITION, PositionSelection
from actex.engine.assembly import ChunkAssembler, PartBuffer, encode, part_tensors
from actex.engine.moments import batch_moments, quantize_batch, to_stats
from actex.engine.work import SINGLE_PROCESS, ProcessRole
from actex.model.mesh import RowShare, local_rows
from actex.store import layout
from actex.store import quantize as q8
from actex.store.commits import CommitRecord, PartRecord, commit
from actex.store import Store, StoreError
from actex.store.integrity import crc32c, hex32
from actex.store.shards import encode_samples_jsonl
from actex.store.stats import HookStats, encode_stats

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class PipelineConfig:
    """Sizes of the hand-offs. Defaults suit a local disk and a GCS bucket alike."""

    host_queue: int = 2  # batches whose device arrays may wait for the host lane
    writers: int = 4  # concurrent part uploads
    parts_in_flight: int = 6  # parts held in memory waiting for a writer


class _Lane:
    """One background thread running submitted callables in order, with a bounded queue.

    The first exception stops the lane; `check()` re-raises it on the caller's thread.
    """

    def __init__(self, name: str, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    job()
                except BaseException as error:  # re-raised on the main thread by check()
                    self._error = error

    def submit(self, job: Callable[[], None]) -> None:
        self.check()
        self._queue.put(job)  # blocks when full: backpressure

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.check()


@dataclass
class ChunkJob:
    """A chunk in flight: its assembler, attempt, parts being written."""

    chunk: int
    attempt: str
    assembler: ChunkAssembler | None  # None where this process writes no rows (RowShare.writes)
    started: float
    parts: list[Future] = field(default_factory=list)
    stats: dict[str, HookStats] = field(default_factory=dict)  # merged over the chunk's batches
    records: list[dict] | None = None  # samples.jsonl of the whole chunk (default: the assembler's)
    token_slots: int = 0  # [rows x seq] slots of the chunk's packed batches, padding included
    select: PositionSelection = EVERY_POSITION  # the tokens stored (--positions)


class Pipeline:
    """Background device->host copies, part writers and commits for one worker.

    Use: `job = begin(chunk, tokenized)`, `add(job, batch, outputs)` per dispatched batch,
    `end(job)`; `close()` waits for everything and re-raises the first background error.
    `on_commit(record, committed)` runs on the commit lane after each chunk. `rows`: this
    process's RowShare of the mesh; a process that does not write its rows (not the first
    of its model group) assembles and writes nothing, but still takes part in every
    collective and in the commit gather (with no parts). With
    `on_write_failure(chunk, error)` given, a chunk whose writes failed for good (after the
    store's retries) is reported there and left uncommitted, and the pipeline goes on;
    without it, that error stops the pipeline.
    """

    def __init__(
        self,
        store: Store,
        *,
        widths: dict[str, int],
        dtype: str,
        shard_size: int,
        worker: str,
        on_commit: Callable[[CommitRecord, bool], None] = lambda record, committed: None,
        on_write_failure: Callable[[int, StoreError], None] | None = None,
        role: ProcessRole = SINGLE_PROCESS,
        rows: RowShare = RowShare(),
        config: PipelineConfig = PipelineConfig(),
        on_progress: Callable[..., None] = lambda **counters: None,
    ):
        self.store = store
        self.widths = widths
        self.tensors = part_tensors(widths, dtype)
        self.dtype_name = dtype
        # int8 is coded on the device from the float32 the forward captured (capture_dtype).
        self.quantized = dtype == q8.INT8
        self.shard_size = shard_size
        self.worker = worker
        self.on_commit = on_commit
        self.on_write_failure = on_write_failure
        # Called with counters (batches=1 when a batch reached the host, nothing when a part
        # was written) from the lanes: what the stall watchdog watches (engine/liveness.py).
        self.on_progress = on_progress
        self.role = role
        # Which rows of each global batch this process holds and whether it writes them:
        # of a model group spanning hosts only the first process writes (mesh.RowShare).
        self.rows = rows
        self._host = _Lane("actex-host", config.host_queue)
        self._commit = _Lane("actex-commit", 2)
        self._writers = ThreadPoolExecutor(config.writers, thread_name_prefix="actex-writer")
        self._parts_slots = threading.BoundedSemaphore(config.parts_in_flight)
        self._begun = 0

    # -- main thread

    def begin(self, chunk: int, tokenized: Sequence, batches: Sequence | None = None, *, part_base: int = 0,
              records: list[dict] | None = None, select: PositionSelection = EVERY_POSITION) -> ChunkJob:
        """Start a chunk. tokenized: the samples whose rows this process holds (all of the
        chunk on one process); batches: their packed batches in dispatch order, which let the
        parts be cut in the order they fill and so bound host memory (see `fill_order`);
        part_base: the index of this process's first part; records: samples.jsonl of the
        whole chunk when `tokenized` is only a share; select: the tokens stored (--positions)."""
        # Where this process does not write its rows (its model group's first process does),
        # there is nothing to assemble: not even the empty part a share without samples gets.
        assembler = ChunkAssembler(tokenized, self.widths, self.dtype_name, self.shard_size, batches,
                                   part_base=part_base, select=select) if self.rows.writes else None
        self._begun += 1
        # One attempt id for the chunk across a slice: process 0's, shared with the others.
        attempt = self.role.share(f"attempt/{chunk}/{self._begun}", lambda: layout.new_attempt_id(self.worker))
        return ChunkJob(chunk, attempt, assembler, time.time(), records=records, select=select)

    def add(self, job: ChunkJob, batch, outputs: dict, stored=None) -> None:
        """Queue batch's device outputs {hook: [rows, seq, width]} for the host lane.

        batch: this process's packed rows; outputs: the global arrays; stored: the global
        [rows, seq] bool mask of the tokens stored, the ones the statistics cover (default:
        `job.select.mask(batch)`, right on one process)."""
        stored = job.select.mask(batch) if stored is None else stored
        # Async, like the capture itself; every process dispatches it, writer or not: a step
        # over global arrays is a collective.
        if self.quantized:
            outputs, moments = quantize_batch(outputs, stored)
        else:
            moments = batch_moments(outputs, stored)
        # Every share packs the same shape each step, so the global slots are count x ours.
        job.token_slots += batch.token_ids.size * self.rows.count
        self._host.submit(lambda: self._to_host(job, batch, outputs, moments))

    def end(self, job: ChunkJob) -> None:
        self._host.submit(lambda: self._finish(job))

    def check(self) -> None:
        """Raise here any error a background thread hit (a failed upload, say)."""
        self._host.check()
        self._commit.check()

    def close(self) -> None:
        try:
            self._host.close()
            self._commit.close()
        finally:
            self._writers.shutdown(wait=True)

    # -- host lane

    def _to_host(self, job: ChunkJob, batch, outputs: dict, moments: dict) -> None:
        if not self.rows.writes:
            # Nothing to copy: wait for the step only, so this lane still paces the main
            # thread (backpressure) and the stall watchdog sees the batches go by.
            jax.block_until_ready(outputs)
            self.on_progress(batches=1)
            return
        # The only device sync of the pipeline, and it happens off the main thread.
        host = {hook: local_rows(values) for hook, values in outputs.items()}
        # Moments are reduced over the global batch (replicated): the chunk's stats, whole.
        moments = jax.device_get(moments)
        for hook, stats in to_stats(moments).items():
            job.stats[hook] = job.stats[hook].merge(stats) if hook in job.stats else stats
        job.assembler.add(batch.placements, np.asarray(batch.positions), host)
        self.on_progress(batches=1)
        self._write(job, job.assembler.ready_parts())

    def _finish(self, job: ChunkJob) -> None:
        if job.assembler is not None:
            self._write(job, job.assembler.ready_parts(final=True))
        self._commit.submit(lambda: self._commit_chunk(job))

    def _write(self, job: ChunkJob, parts: list[PartBuffer]) -> None:
        for part in parts:
            self._parts_slots.acquire()  # blocks while too many parts wait: backpressure
            future = self._writers.submit(self._write_part, job, part)
            future.add_done_callback(lambda _: self._parts_slots.release())
            job.parts.append(future)

    # -- writers

    def _write_part(self, job: ChunkJob, part: PartBuffer) -> tuple[PartRecord, int]:
        encoded = encode(part, self.tensors, chunk=job.chunk, attempt=job.attempt)
        # The chunk's job keeps its parts until it commits; only the bytes are needed now,
        # so drop the arrays, or a slow store would hold whole chunks, not `parts_in_flight`.
        part.acts = {}
        path = layout.part_path(job.chunk, job.attempt, part.index)
        self.store.write_bytes(path, encoded.data)
        self.on_progress()
        record = PartRecord(path=path, bytes=len(encoded.data), sha256=encoded.sha256,
                            header_bytes=encoded.header_bytes, header_crc32c=encoded.header_crc32c)
        return record, encoded.tokens

    # -- commit lane

    def _commit_chunk(self, job: ChunkJob) -> None:
        try:
            self._write_and_commit(job)
        except StoreError as error:
            if self.on_write_failure is None:
                raise
            # No commit record, so the chunk stays undone: a rerun or another worker redoes it.
            self.on_write_failure(job.chunk, error)

    def _write_and_commit(self, job: ChunkJob) -> None:
        written = [future.result() for future in job.parts]  # re-raises a writer's error
        # Every process's parts are durable before the one committer may commit: each
        # process hands process 0 its part records, process 0 waits for all of them.
        ours = json.dumps([[part.to_dict(), n] for part, n in written])
        gathered = self.role.gather(f"commit/{job.chunk}/{job.attempt}", ours)
        if not self.role.commits:
            return
        written = [(PartRecord(**p), n) for value in gathered for p, n in json.loads(value)]
        written.sort(key=lambda item: item[0].path)
        samples = job.records if job.records is not None else job.assembler.records
        samples_jsonl = encode_samples_jsonl(samples)
        self.store.write_bytes(layout.samples_path(job.chunk, job.attempt), samples_jsonl)
        tokens = sum(n for _, n in written)
        # Statistics get their own object, so the commit record stays small (format v2).
        merged = {hook: job.stats.get(hook, HookStats.empty(width)) for hook, width in self.widths.items()}
        stats = encode_stats(merged)
        overflow = {hook: s.nonfinite for hook, s in merged.items() if s.nonfinite}
        for hook, count in overflow.items():
            # Never silent: the stats, the commit record, `inspect` and `verify` all say so too.
            log.warning("overflow: hook %s: %d value(s) not finite as stored %s in chunk %d",
                        hook, count, self.dtype_name, job.chunk)
        stats_path = layout.stats_path(job.chunk, job.attempt)
        self.store.write_bytes(stats_path, stats)
        record = CommitRecord(
            chunk=job.chunk,
            attempt=job.attempt,
            parts=tuple(part for part, _ in written),
            samples=len(samples),
            tokens=tokens,
            worker=self.worker,
            stats_path=stats_path,
            stats_crc32c=hex32(crc32c(stats)),
            samples_crc32c=hex32(crc32c(samples_jsonl)),  # checked on read: store/commits.check_samples
            timings={"chunk_s": time.time() - job.started},
            token_slots=job.token_slots,
            overflow=overflow,
        )
        # The commit record is written LAST: its existence is what makes the parts exist.
        committed = commit(self.store, record)
        if not committed:
            log.warning("chunk %d was committed by another worker first; attempt %s is garbage", job.chunk, job.attempt)
        self.on_commit(record, committed)
