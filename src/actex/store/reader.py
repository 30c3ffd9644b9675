"""Read a run back: committed parts -> shuffled training batches of one hook.

    run = actex.open_run("gs://bucket/runs/qwen-arc")
    for batch in run.iter_batches("blocks.12.hook_resid_post", batch_size=4096, seed=0):
        batch.activations  # [4096, 896] in the stored dtype (int8 runs: dequantized, float32)

How bytes move (docs/store.md; parts are safetensors files):
  1. Only committed chunks are visible: one listing of commits/ says which. Their
     records, which name the parts, are fetched as the chunks come up, never all up front.
  2. Each part's safetensors header is one ranged read (v2 records give its length and
     CRC; v1 parts take a guess of 64 KiB and a second read if longer), fetched as the
     part comes up, a bounded number ahead.
  3. A part is cut into row blocks; a block is one ranged read of the hook's rows plus one
     of the matching rows of `token_ids`/`positions` and the part's small sample index
     (the small gaps between those are read too; they never hold another hook's bytes).
     Other hooks' bytes are never requested.
  4. Every range is checked against the CRC-32C recorded at write time (v2; see
     store/integrity.py) before it is returned: a mismatch, a short read or an impossible
     header raises CorruptPartError naming the part and the tensor.
  5. Background threads fetch the next `prefetch` blocks while the caller trains.
  6. With shuffle, this rank's chunks are visited in a seeded random order, each chunk's
     blocks in random order, and rows are mixed in a bounded buffer of `shuffle_bytes`
     (see docs/reader.md for its memory), so one batch holds tokens from many chunks.
Ranks split the run by whole chunks (a seeded permutation dealt round-robin), so ranks
never overlap and every committed token is yielded exactly once per epoch.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from actex.model.hooks import canonical_name
from actex.store import integrity, quantize, shards
from actex.store.commits import CommitRecord, committed_chunks, read_commits
from actex.store.folder import Store, open_store
from actex.store.integrity import CorruptPartError
from actex.store.manifest import RunManifest, read_manifest
from actex.store.shards import TensorInfo
from actex.store.stats import HookStats, decode_stats

# Index tensors every part holds besides one tensor per hook (docs/store.md, "Parts").
TOKEN_IDS, POSITIONS, SAMPLE_OFFSETS, SAMPLE_IDS = shards.INDEX_TENSORS

# A block's hook rows are about this many bytes: big enough that per-request latency on
# object stores is amortised, small enough that many blocks fit the shuffle buffer.
DEFAULT_BLOCK_BYTES = 16 << 20
DEFAULT_SHUFFLE_BYTES = 1 << 30
# A request to an object store costs tens of milliseconds, the time to stream about a MiB:
# a block's index rows (token ids, positions, sample index) closer than this are one request.
INDEX_GAP_BYTES = 1 << 20
# Format v1 records do not say how long a part's header is: read this much and hope
# (a second read fetches the rest of a longer one).
V1_HEADER_GUESS = 64 * 1024
# Commit records fetched per concurrent batch, and part headers kept in memory (a header
# is ~100 bytes per tensor; a run can have hundreds of thousands of parts).
RECORD_BATCH = 512
HEADER_CACHE = 4096
# Stats objects fetched per batch: 24 hooks x 896 wide is 344 KB each, so 64 is ~22 MB.
STATS_BATCH = 64
# `summary()` (actex inspect) merges the stats of this many chunks spread over the run.
SUMMARY_STATS_CHUNKS = 64


def spread(items: Sequence[int], count: int) -> list[int]:
    """At most `count` of `items`, evenly spaced from first to last (all when count >= len)."""
    if count >= len(items):
        return list(items)
    if count <= 0:
        return []
    if count == 1:
        return [items[0]]
    step = (len(items) - 1) / (count - 1)
    return [items[round(i * step)] for i in range(count)]


# ---------------------------------------------------------------------------------------
# Ranged tensor reads
# ---------------------------------------------------------------------------------------


def fetch_header(store: Store, part: Part) -> dict[str, TensorInfo]:
    """A part's tensor index, checked, from one ranged read (two for a long v1 header).

    v2: the commit record gives the header's length and CRC-32C, so the header is checked
    before any offset in it is trusted. Raises CorruptPartError (one line naming the part)
    for a wrong CRC, a length past the part's end, or offsets outside it.
    """
    where = store.url_of(part.path)
    if part.header_bytes is not None:
        raw = store.read_range(part.path, 0, part.header_bytes)
        actual = integrity.hex32(integrity.crc32c(raw))
        if len(raw) != part.header_bytes:
            raise CorruptPartError(f"{where}: truncated: header needs {part.header_bytes} bytes, got {len(raw)}")
        if actual != part.header_crc32c:
            raise CorruptPartError(f"{where}: header crc32c expected {part.header_crc32c}, actual {actual}")
    else:
        raw = store.read_range(part.path, 0, min(part.bytes, V1_HEADER_GUESS))
        length = shards.header_length(raw, where, part.bytes)
        if length > len(raw):
            raw += store.read_range(part.path, len(raw), length)
    return shards.read_header(raw, where, part.bytes).tensors


def size_problem(data: bytes, size: int, where: str) -> str:
    """Why a whole part of len(data) bytes is not the `size` bytes its commit record says,
    naming the tensor rows a truncation cut off when the header survived it."""
    said = f"{len(data)} bytes, the commit record says {size}"
    if len(data) > size:
        return f"longer than written: {said}"
    try:
        missing = shards.missing_rows(shards.read_header(data, where, size).tensors, len(data))
    except CorruptPartError:  # the cut reached into the header
        missing = None
    return f"truncated: {said}" + (f"; {missing} missing" if missing else "")


def checked_rows(info: TensorInfo, name: str, where: str, raw: bytes | memoryview,
                 got: tuple[int, int], want: tuple[int, int]) -> np.ndarray:
    """Rows `want` of a tensor from the bytes of rows `got` (covering them), checked first."""
    info.check(raw, where, name, *got)
    lo, hi = want
    return decode_rows(info, memoryview(raw)[(lo - got[0]) * info.row_bytes : (hi - got[0]) * info.row_bytes], lo, hi)


def aligned(block_tokens: int, info: TensorInfo) -> int:
    """Block rows rounded to whole checksum blocks, so no block is read twice."""
    if not info.crc_rows:
        return block_tokens
    return max(1, block_tokens // info.crc_rows) * info.crc_rows


def row_range(info: TensorInfo, lo: int, hi: int) -> tuple[int, int]:
    """Absolute byte range of rows [lo, hi) along the tensor's first axis."""
    row_bytes = (info.stop - info.start) // max(info.shape[0], 1)
    return info.start + lo * row_bytes, info.start + hi * row_bytes


def whole(info: TensorInfo) -> tuple[int, int]:
    return info.start, info.stop


def decode_rows(info: TensorInfo, raw: bytes, lo: int, hi: int) -> np.ndarray:
    return replace(info, shape=(hi - lo, *info.shape[1:])).to_numpy(raw)


def read_ranges(store: Store, path: str, ranges: Sequence[tuple[int, int]], max_gap: int = 0) -> list[bytes]:
    """Fetch byte ranges of one file; ranges at most `max_gap` bytes apart share one request."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    out: list[bytes] = [b""] * len(ranges)
    group: list[int] = []
    end = 0

    def flush() -> None:
        lo = ranges[group[0]][0]
        data = memoryview(store.read_range(path, lo, end))
        for i in group:
            out[i] = data[ranges[i][0] - lo : ranges[i][1] - lo]
        group.clear()

    for i in order:
        if group and ranges[i][0] > end + max_gap:
            flush()
        end = max(end, ranges[i][1]) if group else ranges[i][1]
        group.append(i)
    if group:
        flush()
    return out


def only_index_between(spec: dict[str, TensorInfo], ranges: Sequence[tuple[int, int]]) -> bool:
    """True when no hook tensor has bytes inside the span of `ranges` (so the gaps may be read)."""
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    return all(t.stop <= lo or t.start >= hi for name, t in spec.items() if name not in shards.INDEX_TENSORS)


# ---------------------------------------------------------------------------------------
# Work units and batches
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One committed part file."""

    chunk: int
    index: int  # position in the commit record's `parts`
    path: str  # relative to the run root
    bytes: int
    header_bytes: int | None = None  # v2: length and CRC of its header, from the commit record
    header_crc32c: str | None = None
    sha256: str | None = None  # of the whole file, from the commit record


def parts_of(record: CommitRecord) -> list[Part]:
    return [Part(record.chunk, i, p.path, p.bytes, p.header_bytes, p.header_crc32c, p.sha256)
            for i, p in enumerate(record.parts)]


@dataclass(frozen=True)
class Block:
    """Rows [lo, hi) of one part: the unit of fetching and of shuffling."""

    part: Part
    lo: int
    hi: int


@dataclass(frozen=True)
class Batch:
    """Aligned rows of one hook: row i of every field describes the same stored token."""

    activations: np.ndarray  # [batch, width], the stored dtype unless converted (int8: dequantized)
    token_ids: np.ndarray  # [batch] int32
    positions: np.ndarray  # [batch] int32, position inside the sample's forward window
    sample_ids: np.ndarray  # [batch] int64

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def take(self, index: np.ndarray | slice) -> Batch:
        return Batch(self.activations[index], self.token_ids[index], self.positions[index], self.sample_ids[index])

    def with_activations(self, activations: np.ndarray) -> Batch:
        return replace(self, activations=activations)

    def put(self, index: np.ndarray | slice, rows: Batch) -> None:
        """Write `rows` into this batch's arrays at `index` (used by the shuffle buffer)."""
        for f in _BATCH_FIELDS:
            getattr(self, f)[index] = getattr(rows, f)

    @staticmethod
    def empty(like: Batch, rows: int) -> Batch:
        """Uninitialised rows with `like`'s widths; activations as same-width unsigned ints."""
        like = as_bits(like)
        return Batch(*(np.empty((rows, *getattr(like, f).shape[1:]), getattr(like, f).dtype) for f in _BATCH_FIELDS))

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        if len(batches) == 1:
            return batches[0]
        return Batch(*(np.concatenate([getattr(b, f) for b in batches]) for f in _BATCH_FIELDS))


_BATCH_FIELDS = ("activations", "token_ids", "positions", "sample_ids")


def deal_chunks(chunks: Sequence[int], rank: int, world_size: int, seed: int | None) -> list[int]:
    """This rank's chunks: all chunks in a (seeded) order dealt round-robin, so ranks never overlap.

    By chunk, not by part: which parts a chunk has is in its record, and dealing must not
    need every record before the first batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    order = list(chunks) if seed is None else [chunks[i] for i in np.random.default_rng(seed).permutation(len(chunks))]
    return order[rank::world_size]


def cut_blocks(part: Part, tokens: int, block_tokens: int) -> list[Block]:
    return [Block(part, lo, min(lo + block_tokens, tokens)) for lo in range(0, tokens, block_tokens)]


def mix(blocks: Iterator[Batch], batch_size: int, buffer_tokens: int, rng: np.random.Generator) -> Iterator[Batch]:
    """Shuffle rows across blocks through a buffer of exactly `buffer_tokens` rows.

    The buffer fills from the (randomly ordered) blocks; from then on every incoming row
    takes the slot of a row drawn uniformly from the buffer, which leaves in the output.
    Rows move in batch-sized slices (one vectorised gather out, one scatter in), so each
    row is copied twice in all and never re-shuffled wholesale. At the end the buffer's
    rest leaves in random order, one batch at a time. Every row leaves exactly once, and
    every batch but the last has exactly batch_size rows.
    """
    pool: Batch | None = None
    out: Outbox | None = None
    filled = 0
    for block in blocks:
        if pool is None:
            pool = Batch.empty(block, buffer_tokens)
            out = Outbox(block.activations.dtype, pool, batch_size)
        block = as_bits(block)
        start = 0
        if filled < buffer_tokens:
            start = min(buffer_tokens - filled, len(block))
            pool.put(slice(filled, filled + start), block.take(slice(0, start)))
            filled += start
        while start < len(block):
            n = min(out.room, len(block) - start)
            slots = rng.choice(buffer_tokens, n, replace=False)
            out.gather(slots)  # these rows leave the buffer...
            pool.put(slots, block.take(slice(start, start + n)))  # ...and incoming rows take their slots
            start += n
            yield from out.full()
    if pool is None:
        return
    order = rng.permutation(filled)  # [filled] int64: the only drain-time allocation besides batches
    start = 0
    while start < filled:
        n = min(out.room, filled - start)
        out.gather(order[start : start + n])
        start += n
        yield from out.full()
    yield from out.rest()


class Outbox:
    """The batch being assembled from buffer rows: filled by gathers, handed out when full.

    Gathering straight into a fresh batch (np.take with out=) copies each row once; the
    caller owns every batch it receives, so nothing here is reused after it leaves.
    """

    def __init__(self, dtype: np.dtype, pool: Batch, batch_size: int):
        self.dtype, self.pool, self.batch_size = dtype, pool, batch_size
        self.batch = Batch.empty(pool, batch_size)
        self.written = 0

    @property
    def room(self) -> int:
        return self.batch_size - self.written

    def gather(self, slots: np.ndarray) -> None:
        """Append the buffer rows at `slots` (all valid, so mode="clip" only skips numpy's
        bounds-check buffering of `out`)."""
        at = slice(self.written, self.written + len(slots))
        for f in _BATCH_FIELDS:
            np.take(getattr(self.pool, f), slots, axis=0, out=getattr(self.batch, f)[at], mode="clip")
        self.written += len(slots)

    def full(self) -> Iterator[Batch]:
        if self.written == self.batch_size:
            yield from self.rest()
            self.batch = Batch.empty(self.pool, self.batch_size)

    def rest(self) -> Iterator[Batch]:
        if self.written:
            batch = self.batch.take(slice(0, self.written))
            self.written = 0
            yield batch.with_activations(batch.activations.view(self.dtype))


def as_bits(batch: Batch) -> Batch:
    """The same bytes with activations as unsigned ints of the same width.

    numpy moves integer rows with plain memcpy; scattering into ml_dtypes' bfloat16 goes
    through a cast loop about 40x slower, which would dominate the shuffle.
    """
    return batch.with_activations(batch.activations.view(f"u{batch.activations.dtype.itemsize}"))


def rebatch(pieces: Iterator[Batch], batch_size: int) -> Iterator[Batch]:
    """Cut a stream of row pieces into batches of exactly batch_size rows (the last may be smaller).

    Full batches inside a piece are views; only a batch that straddles two pieces is copied.
    """
    carry: list[Batch] = []
    carried = 0
    for piece in pieces:
        start = 0
        if carried:
            start = min(batch_size - carried, len(piece))
            carry.append(piece.take(slice(0, start)))
            carried += start
            if carried < batch_size:
                continue
            yield Batch.concat(carry)
            carry, carried = [], 0
        while len(piece) - start >= batch_size:
            yield piece.take(slice(start, start + batch_size))
            start += batch_size
        if start < len(piece):
            carry, carried = [piece.take(slice(start, None))], len(piece) - start
    if carried:
        yield Batch.concat(carry)


def prefetched(items: Iterable, fetch: Callable, threads: int, depth: int) -> Iterator:
    """fetch(item) for each item in order, keeping `depth` fetches in flight on `threads` threads.

    `items` is consumed lazily (at most `depth` + 1 ahead of what was yielded).
    """
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="actex-read")
    inflight: deque[Future] = deque()
    try:
        for item in items:
            inflight.append(pool.submit(fetch, item))
            if len(inflight) > depth:
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()
    finally:
        # The caller may stop early (break, exception): drop the queued reads; the few
        # running ones end on their own and their results are dropped. Never wait for them
        # here: an abandoned iterator is closed by the garbage collector on whatever thread
        # runs it, one of these very threads included (which cannot join itself) or one that
        # holds a lock a running read needs (a hang).
        for fut in inflight:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------


class Run:
    """A run's committed contents, read lazily.

    Opening costs run.json and one listing of commits/, whatever the run's size. Commit
    records are fetched when something needs them (concurrently, in batches) and kept in
    memory (`records`); part headers are fetched one ranged read each as parts are reached
    and kept in a bounded cache; statistics objects are read only by `stats` / `summary`.
    """

    def __init__(self, store: Store):
        self.store = store
        self.manifest: RunManifest = read_manifest(store)
        # One listing: the committed chunks at open time (a record never disappears).
        self.chunks: list[int] = sorted(committed_chunks(store))
        self._committed = frozenset(self.chunks)
        self._records: dict[int, CommitRecord] = {}
        self._fetching: dict[int, threading.Event] = {}  # chunk -> set once its record is cached
        self._headers: OrderedDict[str, dict[str, TensorInfo]] = OrderedDict()
        self._stats: tuple[tuple[int, ...], dict[str, HookStats]] | None = None
        self._lock = threading.Lock()

    # -- what the run holds ------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def config(self) -> dict:
        return self.manifest.config

    @cached_property
    def hooks(self) -> dict[str, int]:
        """hook name -> width, in the manifest's (computation) order."""
        return {h.name: h.width for h in self.manifest.hooks}

    @property
    def dtype(self) -> str:
        """Stored activation dtype name, e.g. 'bfloat16'."""
        return self.manifest.hooks[0].dtype

    @property
    def quantized(self) -> bool:
        """True for int8 runs: the reader returns values dequantized from codes and scales."""
        return self.dtype == quantize.INT8

    def value_dtype(self, dtype: np.dtype | str | None = None) -> np.dtype:
        """The dtype batches come in: `dtype` if given, else the stored one (float32 for int8)."""
        if dtype is not None:
            return np.dtype(dtype)
        return np.dtype(np.float32) if self.quantized else shards.activation_dtype(self.dtype)

    @property
    def num_chunks(self) -> int:
        """Chunks in the plan, committed or not."""
        return self.manifest.plan.num_chunks

    def record(self, chunk: int) -> CommitRecord:
        """The commit record of a committed chunk (fetched once, then cached)."""
        return self.records([chunk])[chunk]

    def records(self, chunks: Sequence[int] | None = None) -> dict[int, CommitRecord]:
        """Commit records of `chunks` (default: every committed chunk), by chunk id.

        Records not yet cached are fetched RECORD_BATCH at a time, each batch concurrently.
        """
        wanted = self.chunks if chunks is None else sorted(chunks)
        unknown = [c for c in wanted if c not in self._committed]
        if unknown:
            raise KeyError(f"{self.url}: chunk {unknown[0]} is not committed")
        # Records another thread is fetching are waited for, not fetched again (a prefetch
        # thread and the caller often want the same first chunks).
        with self._lock:
            missing = [c for c in wanted if c not in self._records and c not in self._fetching]
            others = {self._fetching[c] for c in wanted if c in self._fetching}
            done = threading.Event()
            self._fetching.update(dict.fromkeys(missing, done))
        try:
            for at in range(0, len(missing), RECORD_BATCH):
                got = read_commits(self.store, missing[at : at + RECORD_BATCH])
                with self._lock:
                    self._records.update(got)
        finally:
            with self._lock:
                for chunk in missing:
                    self._fetching.pop(chunk, None)
            done.set()
        for fetched in others:
            fetched.wait()
        with self._lock:
            absent = [c for c in wanted if c not in self._records]
        if absent:  # another thread's fetch failed: fetch them here (its error was its own)
            return self.records(wanted)
        with self._lock:
            return {c: self._records[c] for c in wanted}

    @property
    def commits(self) -> dict[int, CommitRecord]:
        """Every committed chunk's record (reads them all on first use)."""
        return self.records()

    @property
    def num_samples(self) -> int:
        return sum(c.samples for c in self.commits.values())

    @property
    def num_tokens(self) -> int:
        return sum(c.tokens for c in self.commits.values())

    @property
    def num_bytes(self) -> int:
        return sum(c.bytes for c in self.commits.values())

    def parts(self, chunks: Sequence[int] | None = None) -> list[Part]:
        """Committed parts (optionally of some chunks), in (chunk, index) order."""
        return [part for record in self.records(chunks).values() for part in parts_of(record)]

    def stats(self, hook: str, chunks: Sequence[int] | None = None) -> HookStats:
        """Statistics of the hook (count, per-dimension mean and variance, mean L2 norm) over
        `chunks` (default: every committed chunk), merged from each chunk's stats object.

        Reads one stats object per chunk (about 8 * width bytes per hook: 0.3-2 MB a chunk
        for a whole model's residuals), so on a run of thousands of chunks pass a sample,
        e.g. `run.stats(hook, spread(run.chunks, 64))`. Raises ValueError for an unknown
        hook or when some of the chunks carry no stats for it; CorruptPartError when a stats
        object fails its CRC-32C."""
        hook = self.hook_name(hook)
        merged = self._merged_stats(self.chunks if chunks is None else sorted(chunks))
        if hook not in merged:
            raise ValueError(f"{self.url}: some committed chunks carry no stats for {hook}")
        return merged[hook]

    def _merged_stats(self, chunks: list[int]) -> dict[str, HookStats]:
        """{hook: stats over `chunks`} for the hooks every one of them has; one pass, cached
        for the last set of chunks asked for."""
        key = tuple(chunks)
        if self._stats is not None and self._stats[0] == key:
            return self._stats[1]
        merged = {h: HookStats.empty(w) for h, w in self.hooks.items()}
        covered = set(merged)
        for at in range(0, len(chunks), STATS_BATCH):
            batch = list(self.records(chunks[at : at + STATS_BATCH]).values())
            paths = [r.stats_path for r in batch if r.stats_path]
            raw = self.store.read_many(paths) if paths else {}
            for record in batch:
                chunk_stats = self._chunk_stats(record, raw)
                covered &= set(chunk_stats)
                for hook in covered:
                    merged[hook] = merged[hook].merge(chunk_stats[hook])
        result = {h: merged[h] for h in self.hooks if h in covered}
        self._stats = (key, result)
        return result

    def _chunk_stats(self, record: CommitRecord, raw: dict[str, bytes]) -> dict[str, HookStats]:
        if record.stats_path is None:  # format v1: inline JSON
            return {hook: HookStats.from_json(s) for hook, s in record.stats.items()}
        data, where = raw[record.stats_path], self.store.url_of(record.stats_path)
        actual = integrity.hex32(integrity.crc32c(data))
        if actual != record.stats_crc32c:
            raise CorruptPartError(f"{where}: crc32c expected {record.stats_crc32c}, actual {actual}")
        return decode_stats(data, where)

    def overflow(self) -> dict[str, int]:
        """{hook: values not finite as stored}, over every committed chunk, from the commit
        records (hooks without any are left out)."""
        total: dict[str, int] = {}
        for record in self.commits.values():
            for hook, count in record.overflow.items():
                total[hook] = total.get(hook, 0) + count
        return total

    def samples(self, chunk: int) -> list[dict]:
        """Per-sample metadata of a committed chunk (samples.jsonl of its committed attempt)."""
        path = self.record(chunk).samples_path
        return shards.decode_samples_jsonl(self.store.read_bytes(path), self.store.url_of(path))

    def summary(self, stats_chunks: int | None = SUMMARY_STATS_CHUNKS) -> dict:
        """What `actex inspect` prints: counts, hooks and merged stats where recorded.

        stats_chunks: merge the stats of at most this many committed chunks, spread evenly
        over the run (None: all of them), so that the cost does not grow with the run."""
        picked = self.chunks if stats_chunks is None else spread(self.chunks, stats_chunks)
        merged = self._merged_stats(picked) if picked else {}
        hooks = {}
        for hook, width in self.hooks.items():
            entry: dict = {"width": width}
            if hook in merged:
                entry["stats"] = merged[hook].summary()
            hooks[hook] = entry
        return {
            "url": self.url,
            "kind": self.manifest.kind,
            "dtype": self.dtype,
            "hooks": hooks,
            "chunks_committed": len(self.chunks),
            "chunks_total": self.num_chunks,
            "samples": self.num_samples,
            "tokens": self.num_tokens,
            "bytes": self.num_bytes,
            "overflow": self.overflow(),
            "stats_chunks": len(picked),
            "config": self.config,
        }

    # -- reading tensors ---------------------------------------------------------------

    def header(self, part: Part) -> dict[str, TensorInfo]:
        """The part's tensor index, checked (cached for the last HEADER_CACHE parts)."""
        with self._lock:
            cached = self._headers.get(part.path)
            if cached is not None:
                self._headers.move_to_end(part.path)
                return cached
        spec = fetch_header(self.store, part)
        with self._lock:
            self._headers[part.path] = spec
            while len(self._headers) > HEADER_CACHE:
                self._headers.popitem(last=False)
        return spec

    def num_part_tokens(self, part: Part) -> int:
        return self.header(part)[TOKEN_IDS].shape[0]

    def read_block(self, block: Block, hook: str, spec: dict[str, TensorInfo] | None = None,
                   dtype: np.dtype | str | None = None) -> Batch:
        """The hook's rows of one block with their index rows, every byte checked: two ranged
        reads when the index tensors sit together (the store format's layout), more only if
        a hook lies between (an int8 hook: two more, its scales and exponents). Ranges widen
        to whole checksum blocks (v2). int8 codes come back dequantized, as `dtype` (default
        float32); other stored dtypes come back as stored (the caller converts)."""
        spec = spec or self.header(block.part)
        where = self.store.url_of(block.part.path)
        lo, hi = block.lo, block.hi
        names = (TOKEN_IDS, POSITIONS, SAMPLE_IDS, SAMPLE_OFFSETS)
        rows = [spec[TOKEN_IDS].covering(lo, hi), spec[POSITIONS].covering(lo, hi),
                (0, spec[SAMPLE_IDS].rows), (0, spec[SAMPLE_OFFSETS].rows)]
        index = [row_range(spec[n], *r) for n, r in zip(names, rows)]
        gap = INDEX_GAP_BYTES if only_index_between(spec, index) else 0
        raws = read_ranges(self.store, block.part.path, index, max_gap=gap)
        tokens, positions, ids, offsets = (
            checked_rows(spec[n], n, where, raw, r, full) for n, raw, r, full in
            zip(names, raws, rows, [(lo, hi), (lo, hi), rows[2], rows[3]])
        )
        # Token t belongs to sample s where offsets[s] <= t < offsets[s+1].
        owner = np.searchsorted(offsets, np.arange(lo, hi), side="right") - 1
        return Batch(
            activations=self._values(block, hook, spec, dtype),
            token_ids=tokens,
            positions=positions,
            sample_ids=ids[owner],
        )

    def _rows(self, block: Block, name: str, spec: dict[str, TensorInfo]) -> np.ndarray:
        """Rows [lo, hi) of one tensor of the block's part: one ranged read, checked."""
        info, rows = spec[name], spec[name].covering(block.lo, block.hi)
        raw = self.store.read_range(block.part.path, *row_range(info, *rows))
        return checked_rows(info, name, self.store.url_of(block.part.path), raw, rows, (block.lo, block.hi))

    def _values(self, block: Block, hook: str, spec: dict[str, TensorInfo], dtype) -> np.ndarray:
        """The hook's rows; int8 codes dequantized straight into a `dtype` (default float32) array."""
        codes = self._rows(block, hook, spec)
        if spec[hook].dtype != "I8":
            return codes
        scale, exps = (self._rows(block, quantize.companion(hook, what), spec) for what in (quantize.SCALE, quantize.BLOCK_EXP))
        return quantize.dequantize(codes, scale, exps, self.value_dtype(dtype))

    def read_index(self, part: Part) -> tuple[np.ndarray, np.ndarray]:
        """The part's sample_ids [samples] and sample_offsets [samples+1] (token offsets), checked."""
        spec = self.header(part)
        where = self.store.url_of(part.path)
        raws = read_ranges(self.store, part.path, [whole(spec[SAMPLE_IDS]), whole(spec[SAMPLE_OFFSETS])])
        return tuple(spec[n].read(raw, where, n) for n, raw in zip((SAMPLE_IDS, SAMPLE_OFFSETS), raws))

    def check_part(self, part: Part) -> None:
        """Read a whole part and check every byte: size and sha256 from the commit record,
        header CRC (v2), each tensor's CRCs (v2). CorruptPartError names the part and, where
        the checksums can tell, the tensor (v1 parts have only the sha256)."""
        where = self.store.url_of(part.path)
        data = self.store.read_bytes(part.path)
        if part.header_bytes is not None and len(data) >= part.header_bytes:
            actual = integrity.hex32(integrity.crc32c(memoryview(data)[: part.header_bytes]))
            if actual != part.header_crc32c:
                raise CorruptPartError(f"{where}: header crc32c expected {part.header_crc32c}, actual {actual}")
        if len(data) != part.bytes:
            raise CorruptPartError(f"{where}: {size_problem(data, part.bytes, where)}")
        shards.decode_part(data, where)
        actual = hashlib.sha256(data).hexdigest()
        if part.sha256 is not None and actual != part.sha256:
            raise CorruptPartError(f"{where}: sha256 expected {part.sha256}, actual {actual}")

    def read_part(self, part: Part, hook: str, dtype: np.dtype | str | None = None) -> Batch:
        return self.read_block(Block(part, 0, self.num_part_tokens(part)), hook, dtype=dtype)

    def iter_batches(
        self,
        hook: str,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_bytes: int = DEFAULT_SHUFFLE_BYTES,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        prefetch: int = 8,
        threads: int = 8,
        dtype: np.dtype | str | None = None,
        chunks: Sequence[int] | None = None,
    ) -> Iterator[Batch]:
        """Yield every committed token of `hook` on this rank once, in batches of batch_size.

        Streams: commit records and part headers are fetched as the chunks that need them
        come up (at most `prefetch` ahead), so the first batch costs a few requests
        whatever the run's size.
        shuffle: chunks are visited in a seeded random order, the blocks of each chunk in
          random order, and rows are mixed through a buffer of about `shuffle_bytes` of
          activations (order depends on seed and epoch only).
        rank/world_size: committed chunks are dealt to ranks without overlap (a seeded
          permutation, the same for every epoch); ranks may get a few chunks more or fewer.
        prefetch: blocks (about `block_bytes` of activations each, a whole number of
          checksum blocks) fetched ahead on `threads`.
        dtype: convert activations per batch (e.g. np.float32); default the stored dtype.
          int8 runs are dequantized as they are read (on the reader threads), straight into
          `dtype` (default float32): batches never hold codes.
        """
        hook = self.hook_name(hook)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chosen = self.chunks if chunks is None else sorted(chunks)
        unknown = set(chosen) - self._committed
        if unknown:
            raise KeyError(f"{self.url}: chunk {min(unknown)} is not committed")
        row_bytes = self.hooks[hook] * self.value_dtype(dtype).itemsize
        rng = np.random.default_rng([seed, epoch]) if shuffle else None
        mine = deal_chunks(chosen, rank, world_size, None if rng is None else seed)
        if rng is not None:
            mine = [mine[i] for i in rng.permutation(len(mine))]
        threads, depth = max(1, threads), max(1, prefetch)
        blocks = self._blocks(mine, hook, max(1, block_bytes // row_bytes), rng, threads, depth)
        fetched = prefetched(blocks, lambda b: self.read_block(b[0], hook, b[1], dtype), threads, depth)
        if rng is not None:
            buffer_tokens = max(batch_size, shuffle_bytes // row_bytes)
            batches = mix(fetched, batch_size, buffer_tokens, rng)
        else:
            batches = rebatch(fetched, batch_size)
        for batch in batches:
            if dtype is not None and not self.quantized:
                batch = batch.with_activations(batch.activations.astype(dtype))
            yield batch

    def _blocks(self, chunks: Sequence[int], hook: str, block_tokens: int, rng: np.random.Generator | None,
                threads: int, depth: int) -> Iterator[tuple[Block, dict[str, TensorInfo]]]:
        """(block, its part's header) for each block of `chunks` in order, records and headers
        fetched `depth` ahead; with `rng`, each chunk's blocks in random order."""
        records = prefetched(chunks, self.record, threads, depth)
        parts = (part for record in records for part in parts_of(record))
        headed = prefetched(parts, lambda p: (p, self.header(p)), threads, depth)
        for _, group in itertools.groupby(headed, key=lambda ph: ph[0].chunk):
            blocks = [
                (block, spec)
                for part, spec in group
                for block in cut_blocks(part, spec[TOKEN_IDS].rows, aligned(block_tokens, spec[hook]))
            ]
            if rng is not None:
                blocks = [blocks[i] for i in rng.permutation(len(blocks))]
            yield from blocks

    # -- helpers -----------------------------------------------------------------------

    def check_hook(self, hook: str) -> None:
        if hook not in self.hooks:
            raise ValueError(f"{self.url}: no hook {hook!r}; stored hooks: {', '.join(self.hooks)}")

    def hook_name(self, hook: str) -> str:
        """The stored name of `hook`: itself, or actex's name of a TransformerLens 3 alias
        (`blocks.3.hook_out` reads `blocks.3.hook_resid_post`). ValueError if not stored."""
        if hook not in self.hooks:
            hook = canonical_name(hook)
        self.check_hook(hook)
        return hook


def open_run(url: str, **storage_options) -> Run:
    """Open a run written by `actex extract` (local path, file://, memory://, gs://, s3://)."""
    return Run(open_store(url, **storage_options))
