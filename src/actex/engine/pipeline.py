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

import dataclasses
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np

from actex.engine.work import SINGLE_PROCESS, ProcessRole
from actex.model.mesh import RowShare, local_rows
from actex.store import layout
from actex.store.commits import CommitRecord, PartRecord, commit
from actex.store.folder import Store, StoreError
from actex.engine.quantize import quantize
from actex.store import quantize as q8
from actex.store.shards import EncodedPart, encode_part, encode_samples_jsonl, split_samples, token_bytes
from actex.store.integrity import crc32c, hex32
from actex.store.stats import HookStats, encode_stats

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- assembly


@dataclass
class PartBuffer:
    """One part being filled: its samples' windows laid end to end, in sample-id order.

    Activations are scattered straight into the part's own arrays, so encoding needs no
    concatenation copy; they are allocated when the first row arrives.
    """

    index: int
    sample_ids: np.ndarray  # [samples] int64
    sample_offsets: np.ndarray  # [samples + 1] int64: sample i is rows offsets[i]:offsets[i+1]
    token_ids: np.ndarray  # [tokens] int32
    positions: np.ndarray  # [tokens] int32, filled from the packed batches
    acts: dict[str, np.ndarray] = field(default_factory=dict)  # hook -> [tokens, width]
    filled: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def complete(self) -> bool:
        return self.filled == self.num_tokens


def stored_tokens(tokenized) -> tuple[np.ndarray, dict[int, int]]:
    """A sample's stored token ids (its windows, in order) and where each window starts there."""
    offsets, pieces, at = {}, [], 0
    for start, stop in tokenized.windows:
        offsets[start] = at
        pieces.append(np.asarray(tokenized.token_ids[start:stop], dtype=np.int32))
        at += stop - start
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int32)), offsets


def fill_order(tokenized: Sequence, batches: Sequence | None) -> list:
    """The samples in the order the packed batches complete them (then by sample id).

    Packing is longest-first, so sample-id order is not the order rows arrive in; parts cut
    in arrival order complete one after another, and host memory holds only the parts being
    filled or written, not nearly every part of the chunk until its last batch. Samples
    with no tokens (in no batch) come first: they are complete from the start.
    """
    done_at: dict[int, int] = {}
    for index, batch in enumerate(batches or ()):
        for placement in batch.placements:
            done_at[placement.sample_id] = index
    return sorted(tokenized, key=lambda t: (done_at.get(t.sample_id, -1), t.sample_id))


class ChunkAssembler:
    """Turns a chunk's packed-batch outputs back into per-sample tokens, in parts.

    The parts are planned up front from the samples' token counts (store.shards.split_samples),
    taking the samples in the order the batches complete them (`fill_order`), so parts fill
    one after another; within a part samples are in id order. A sample never spans two
    parts, and a part stays under `shard_size` bytes unless one sample alone is larger. A
    part is handed out as soon as all of its rows have arrived.
    """

    def __init__(self, tokenized: Sequence, widths: dict[str, int], dtype: str, shard_size: int,
                 batches: Sequence | None = None, *, part_base: int = 0):
        self.tensors = part_tensors(widths, dtype)
        arrival = fill_order(tokenized, batches)
        arrival_stored = [stored_tokens(t) for t in arrival]
        spans = split_samples([len(ids) for ids, _ in arrival_stored], token_bytes(list(widths.values()), dtype), shard_size)
        # Within each part, samples in id order (readers and samples.jsonl list them so).
        order = [i for span in spans for i in sorted(span, key=lambda i: arrival[i].sample_id)]
        ordered = [arrival[i] for i in order]
        stored = [arrival_stored[i] for i in order]
        lengths = [len(ids) for ids, _ in stored]
        self.records = sample_records(ordered, lengths)
        self.parts: list[PartBuffer] = []
        # sample id -> (its part, {window start in the sample -> row in the part})
        self.rows: dict[int, tuple[PartBuffer, dict[int, int]]] = {}
        for index, span in enumerate(spans):
            offsets = np.concatenate([[0], np.cumsum([lengths[i] for i in span], dtype=np.int64)]).astype(np.int64)
            token_ids = np.concatenate([stored[i][0] for i in span]) if span else np.zeros(0, np.int32)
            part = PartBuffer(
                part_base + index, np.array([ordered[i].sample_id for i in span], np.int64), offsets, token_ids,
                np.zeros(len(token_ids), np.int32),
            )
            self.parts.append(part)
            for i, base in zip(span, offsets):
                self.rows[ordered[i].sample_id] = (part, {start: int(base) + at for start, at in stored[i][1].items()})
        self._handed_out: set[int] = set()

    def add(self, placements, token_positions: np.ndarray, host: dict[str, np.ndarray]) -> None:
        """Scatter one batch's rows into their parts. host: {hook: [rows, seq, width]}, the
        rows this process packed (in a slice: its share of the global batch); an int8 hook
        comes as its codes and their scale and exponent tensors (part_tensors)."""
        for sample_id, start, row, col, length in placements:
            part, window_rows = self.rows[sample_id]
            if not part.acts:
                part.acts = empty_tensors(self.tensors, part.num_tokens)
            at = window_rows[start]
            for hook, values in host.items():
                part.acts[hook][at : at + length] = values[row, col : col + length]
            part.positions[at : at + length] = token_positions[row, col : col + length]
            part.filled += length

    def ready_parts(self, final: bool = False) -> list[PartBuffer]:
        """Complete parts not handed out yet; with `final`, every part must be complete."""
        ready = [p for p in self.parts if p.complete and p.index not in self._handed_out]
        self._handed_out.update(p.index for p in ready)
        if final and len(self._handed_out) != len(self.parts):
            part = next(p for p in self.parts if not p.complete)
            raise RuntimeError(
                f"part {part.index} (samples {part.sample_ids.tolist()}): {part.filled} of {part.num_tokens} "
                "tokens came back from the packed batches (packing lost a window)"
            )
        return ready


def sample_records(ordered: Sequence, lengths: Sequence[int]) -> list[dict]:
    """samples.jsonl's lines: sample id, metadata, stored token count (in sample-id order)."""
    return [{"sample_id": t.sample_id, **t.meta, "n_tokens": n} for t, n in zip(ordered, lengths)]


def chunk_records(tokenized: Sequence) -> list[dict]:
    """samples.jsonl's lines for a whole chunk (what process 0 of a slice writes)."""
    ordered = sorted(tokenized, key=lambda t: t.sample_id)
    return sample_records(ordered, [len(stored_tokens(t)[0]) for t in ordered])


def part_tensors(widths: dict[str, int], dtype: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{tensor: (shape after the token axis, dtype)} of a part: one per hook, three per int8 hook."""
    return {name: spec for hook, width in widths.items() for name, spec in q8.stored_tensors(hook, width, dtype).items()}


def empty_tensors(tensors: dict[str, tuple[tuple[int, ...], np.dtype]], tokens: int) -> dict[str, np.ndarray]:
    return {name: np.empty((tokens, *shape), dtype) for name, (shape, dtype) in tensors.items()}


def encode(part: PartBuffer, tensors: dict[str, tuple[tuple[int, ...], np.dtype]], *, chunk: int,
           attempt: str) -> EncodedPart:
    """A part as safetensors bytes (a part of empty samples has empty activations)."""
    acts = part.acts or empty_tensors(tensors, 0)
    return encode_part(
        acts,
        token_ids=part.token_ids,
        positions=part.positions,
        sample_offsets=part.sample_offsets,
        sample_ids=part.sample_ids,
        chunk=chunk,
        attempt=attempt,
        part=part.index,
    )


def hook_moments(x: jax.Array, real: jax.Array, first: jax.Array) -> dict:
    """Moments of x [rows, seq, width] (float32) over the real tokens: count, shift, sum of
    x - shift, sum of (x - shift)^2, sum of L2 norms, and how many values are not finite.

    The sums are of deviations from a shift, the batch's first real token: a feature at 3e4
    with a spread of 0.01 has deviations of ~0.01, which float32 sums as precisely as any
    other (x - shift is even exact for values within a factor 2 of the shift). Summing x
    itself, its float32 mean was off by more than the spread and the variance by 42%.
    """
    mask = real[..., None]  # [rows, seq, 1]
    shift = x.reshape(-1, x.shape[-1])[first]
    deviation = jnp.where(mask, x - shift, 0.0)
    return {
        "count": real.sum(), "shift": shift, "s1": deviation.sum((0, 1)), "s2": (deviation * deviation).sum((0, 1)),
        "norm_sum": jnp.sqrt(jnp.where(mask, x * x, 0.0).sum(-1)).sum(),
        "nonfinite": (mask & ~jnp.isfinite(x)).sum(),
    }


@jax.jit
def batch_moments(outputs: dict, segment_ids: jax.Array) -> dict:
    """Per hook, over the real tokens of a packed batch, `hook_moments` of the stored values;
    `to_stats` turns them into HookStats.

    Reduced on the device, in float32 from the stored-dtype values: only a few vectors per
    hook cross to the host, instead of a float64 pass over every activation there (which
    cost more host CPU than encoding, hashing and writing the parts together). A value the
    cast to the stored dtype made infinite (float16 holds at most 65504) is counted.
    """
    real = segment_ids > 0
    first = jnp.argmax(real.reshape(-1))  # any index when the batch has no token: count 0
    return {hook: hook_moments(x.astype(jnp.float32), real, first) for hook, x in outputs.items()}


@jax.jit
def quantize_batch(outputs: dict, segment_ids: jax.Array) -> tuple[dict, dict]:
    """int8 storage: ({tensor: array} to store, moments) for float32 outputs.

    Moments are of the dequantized values (what readers get), plus the quantization error:
    the largest and the summed per-token relative L2 error against the float32 values. A
    value that is not finite cannot be coded: it is counted (as `nonfinite`) and stored as 0.
    """
    real = segment_ids > 0
    first = jnp.argmax(real.reshape(-1))
    stored, moments = {}, {}
    for hook, x in outputs.items():
        x = x.astype(jnp.float32)
        finite = jnp.isfinite(x)
        x = jnp.where(finite, x, 0.0)
        codes, scale, packed, values = quantize(x)
        stored |= {hook: codes, q8.companion(hook, q8.SCALE): scale, q8.companion(hook, q8.BLOCK_EXP): packed}
        norm = jnp.sqrt((x * x).sum(-1))
        error = jnp.where(real, jnp.sqrt(((values - x) ** 2).sum(-1)) / jnp.where(norm > 0, norm, 1.0), 0.0)
        moments[hook] = hook_moments(values, real, first) | {
            "nonfinite": (real[..., None] & ~finite).sum(), "qerr_max": error.max(), "qerr_sum": error.sum(),
        }
    return stored, moments


def to_stats(moments: dict) -> dict[str, HookStats]:
    """Host copies of batch_moments' (or quantize_batch's) moments as HookStats (float64,
    mergeable): the shifted sums give mean = shift + S1/n and M2 = S2 - S1^2/n, with no
    cancellation at any offset."""
    stats = {}
    for hook, m in moments.items():
        n = int(m["count"])
        quant = {"quant_error_max": float(m["qerr_max"]), "quant_error_sum": float(m["qerr_sum"])} if "qerr_max" in m else {}
        if n == 0:
            stats[hook] = replace(HookStats.empty(int(np.shape(m["shift"])[0])), **quant)
            continue
        s1 = np.asarray(m["s1"], np.float64)
        mean = np.asarray(m["shift"], np.float64) + s1 / n
        m2 = np.maximum(np.asarray(m["s2"], np.float64) - s1 * s1 / n, 0.0)
        stats[hook] = HookStats(n, mean, m2, float(m["norm_sum"]), nonfinite=int(m["nonfinite"]), **quant)
    return stats


# --------------------------------------------------------------------------- pipeline


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
              records: list[dict] | None = None) -> ChunkJob:
        """Start a chunk. tokenized: the samples whose rows this process holds (all of the
        chunk on one process); batches: their packed batches in dispatch order, which let the
        parts be cut in the order they fill and so bound host memory (see `fill_order`);
        part_base: the index of this process's first part; records: samples.jsonl of the
        whole chunk when `tokenized` is only a share."""
        # Where this process does not write its rows (its model group's first process does),
        # there is nothing to assemble: not even the empty part a share without samples gets.
        assembler = ChunkAssembler(tokenized, self.widths, self.dtype_name, self.shard_size, batches,
                                   part_base=part_base) if self.rows.writes else None
        self._begun += 1
        # One attempt id for the chunk across a slice: process 0's, shared with the others.
        attempt = self.role.share(f"attempt/{chunk}/{self._begun}", lambda: layout.new_attempt_id(self.worker))
        return ChunkJob(chunk, attempt, assembler, time.time(), records=records)

    def add(self, job: ChunkJob, batch, outputs: dict, segment_ids=None) -> None:
        """Queue batch's device outputs {hook: [rows, seq, width]} for the host lane.

        batch: this process's packed rows; outputs: the global arrays; segment_ids: the
        global segment ids (default: batch's, right on one process)."""
        segment_ids = batch.segment_ids if segment_ids is None else segment_ids
        # Async, like the capture itself; every process dispatches it, writer or not: a step
        # over global arrays is a collective.
        if self.quantized:
            outputs, moments = quantize_batch(outputs, segment_ids)
        else:
            moments = batch_moments(outputs, segment_ids)
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
        ours = json.dumps([[dataclasses.asdict(part), n] for part, n in written])
        gathered = self.role.gather(f"commit/{job.chunk}/{job.attempt}", ours)
        if not self.role.commits:
            return
        written = [(PartRecord(**p), n) for value in gathered for p, n in json.loads(value)]
        written.sort(key=lambda item: item[0].path)
        samples = job.records if job.records is not None else job.assembler.records
        self.store.write_bytes(layout.samples_path(job.chunk, job.attempt), encode_samples_jsonl(samples))
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
            timings={"chunk_s": time.time() - job.started},
            token_slots=job.token_slots,
            overflow=overflow,
        )
        # The commit record is written LAST: its existence is what makes the parts exist.
        committed = commit(self.store, record)
        if not committed:
            log.warning("chunk %d was committed by another worker first; attempt %s is garbage", job.chunk, job.attempt)
        self.on_commit(record, committed)
