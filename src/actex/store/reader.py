"""Read a run back: committed parts -> shuffled training batches of one hook.

    run = actex.open_run("gs://bucket/runs/qwen-arc")
    for batch in run.iter_batches("blocks.12.hook_resid_post", batch_size=4096, seed=0):
        batch.activations  # [4096, 896] in the stored dtype

How bytes move (DESIGN "Store format v1"; parts are safetensors files):
  1. Only committed chunks are visible: the commit records name the parts to read.
  2. Each part's safetensors header is fetched with two small ranged reads (length, JSON).
  3. A part is cut into row blocks; a block is one ranged read of the hook's rows plus one
     of the matching rows of `token_ids`/`positions` and the part's small sample index
     (the small gaps between those are read too; they never hold another hook's bytes).
     Other hooks' bytes are never requested.
  4. Background threads fetch the next `prefetch` blocks while the caller trains.
  5. With shuffle, the blocks of all of this rank's parts are visited in a seeded random
     order and mixed in a bounded buffer of `shuffle_tokens` rows (see docs/reader.md for
     its memory), so one batch holds tokens from many chunks.
Ranks split the run by whole parts (a seeded permutation dealt round-robin), so ranks
never overlap and every committed token is yielded exactly once per epoch.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from actex.store import shards
from actex.store.folder import Store, open_store
from actex.store.commits import CommitRecord, read_commits
from actex.store.manifest import RunManifest, read_manifest
from actex.store.shards import TensorInfo
from actex.store.stats import HookStats

# Index tensors every part holds besides one tensor per hook (DESIGN "Store format v1").
TOKEN_IDS, POSITIONS, SAMPLE_OFFSETS, SAMPLE_IDS = shards.INDEX_TENSORS

# A block's hook rows are about this many bytes: big enough that per-request latency on
# object stores is amortised, small enough that many blocks fit the shuffle buffer.
DEFAULT_BLOCK_BYTES = 16 << 20
DEFAULT_SHUFFLE_BYTES = 1 << 30
# A request to an object store costs tens of milliseconds, the time to stream about a MiB:
# a block's index rows (token ids, positions, sample index) closer than this are one request.
INDEX_GAP_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------
# Ranged tensor reads
# ---------------------------------------------------------------------------------------


def fetch_header(store: Store, path: str) -> dict[str, TensorInfo]:
    """A part's tensor index from two ranged reads (length, then JSON); no tensor data."""
    length = shards.header_length(store.read_range(path, 0, 8))
    try:
        return shards.read_header(store.read_range(path, 0, length)).tensors
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{store.url_of(path)}: not a safetensors part ({err})") from None


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
    """One committed part file: the unit ranks split the run by."""

    chunk: int
    index: int  # position in the commit record's `parts`
    path: str  # relative to the run root
    bytes: int


@dataclass(frozen=True)
class Block:
    """Rows [lo, hi) of one part: the unit of fetching and of shuffling."""

    part: Part
    lo: int
    hi: int


@dataclass(frozen=True)
class Batch:
    """Aligned rows of one hook: row i of every field describes the same stored token."""

    activations: np.ndarray  # [batch, width], the stored dtype unless converted
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


def deal_parts(parts: Sequence[Part], rank: int, world_size: int, seed: int | None) -> list[Part]:
    """This rank's parts: all parts in a (seeded) order dealt round-robin, so ranks never overlap."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    order = list(parts) if seed is None else [parts[i] for i in np.random.default_rng(seed).permutation(len(parts))]
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


def prefetched(items: Sequence, fetch: Callable, threads: int, depth: int) -> Iterator:
    """fetch(item) for each item in order, keeping `depth` fetches in flight on `threads` threads."""
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
        # The caller may stop early (break, exception): drop the queued reads.
        for fut in inflight:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------


class Run:
    """A run's committed contents. Cheap to create: reads run.json and the commit records."""

    def __init__(self, store: Store):
        self.store = store
        self.manifest: RunManifest = read_manifest(store)
        self.commits: dict[int, CommitRecord] = read_commits(store)
        self._headers: dict[str, dict[str, TensorInfo]] = {}
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
    def chunks(self) -> list[int]:
        """Committed chunk ids, sorted."""
        return sorted(self.commits)

    @property
    def num_chunks(self) -> int:
        """Chunks in the plan, committed or not."""
        return self.manifest.plan.num_chunks

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
        chosen = self.chunks if chunks is None else sorted(chunks)
        return [
            Part(chunk, i, p.path, p.bytes)
            for chunk in chosen
            for i, p in enumerate(self.commits[chunk].parts)
        ]

    def stats(self, hook: str) -> HookStats:
        """Statistics of the hook over all committed chunks, merged from the commit records."""
        self.check_hook(hook)
        records = [c.stats.get(hook) for c in self.commits.values()]
        if any(r is None for r in records):
            raise ValueError(f"{self.url}: some commit records carry no stats for {hook}")
        return HookStats.merge_all([HookStats.empty(self.hooks[hook])] + [HookStats.from_json(r) for r in records])

    def samples(self, chunk: int) -> list[dict]:
        """Per-sample metadata of a committed chunk (samples.jsonl of its committed attempt)."""
        if chunk not in self.commits:
            raise KeyError(f"{self.url}: chunk {chunk} is not committed")
        path = self.commits[chunk].samples_path
        return shards.decode_samples_jsonl(self.store.read_bytes(path), self.store.url_of(path))

    def summary(self) -> dict:
        """What `actex inspect` prints: counts, hooks and merged stats where recorded."""
        hooks = {}
        for hook, width in self.hooks.items():
            entry: dict = {"width": width}
            if self.commits and all(hook in c.stats for c in self.commits.values()):
                entry["stats"] = self.stats(hook).summary()
            hooks[hook] = entry
        return {
            "url": self.url,
            "kind": self.manifest.kind,
            "dtype": self.dtype,
            "hooks": hooks,
            "chunks_committed": len(self.commits),
            "chunks_total": self.num_chunks,
            "samples": self.num_samples,
            "tokens": self.num_tokens,
            "bytes": self.num_bytes,
            "config": self.config,
        }

    # -- reading tensors ---------------------------------------------------------------

    def header(self, part: Part) -> dict[str, TensorInfo]:
        """The part's tensor index (cached: fetched once per part per Run)."""
        with self._lock:
            cached = self._headers.get(part.path)
        if cached is None:
            cached = fetch_header(self.store, part.path)
            with self._lock:
                self._headers[part.path] = cached
        return cached

    def num_part_tokens(self, part: Part) -> int:
        return self.header(part)[TOKEN_IDS].shape[0]

    def read_block(self, block: Block, hook: str) -> Batch:
        """The hook's rows of one block with their index rows: two ranged reads when the
        index tensors sit together (the store format's layout), more only if a hook lies between."""
        spec = self.header(block.part)
        lo, hi = block.lo, block.hi
        index = [
            row_range(spec[TOKEN_IDS], lo, hi),
            row_range(spec[POSITIONS], lo, hi),
            whole(spec[SAMPLE_IDS]),
            whole(spec[SAMPLE_OFFSETS]),
        ]
        gap = INDEX_GAP_BYTES if only_index_between(spec, index) else 0
        tokens, positions, ids, offsets = read_ranges(self.store, block.part.path, index, max_gap=gap)
        acts = self.store.read_range(block.part.path, *row_range(spec[hook], lo, hi))
        offsets = spec[SAMPLE_OFFSETS].to_numpy(offsets)  # [samples + 1]
        # Token t belongs to sample s where offsets[s] <= t < offsets[s+1].
        owner = np.searchsorted(offsets, np.arange(lo, hi), side="right") - 1
        return Batch(
            activations=decode_rows(spec[hook], acts, lo, hi),
            token_ids=decode_rows(spec[TOKEN_IDS], tokens, lo, hi),
            positions=decode_rows(spec[POSITIONS], positions, lo, hi),
            sample_ids=spec[SAMPLE_IDS].to_numpy(ids)[owner],
        )

    def read_index(self, part: Part) -> tuple[np.ndarray, np.ndarray]:
        """The part's sample_ids [samples] and sample_offsets [samples+1] (token offsets)."""
        spec = self.header(part)
        ids, offsets = read_ranges(self.store, part.path, [whole(spec[SAMPLE_IDS]), whole(spec[SAMPLE_OFFSETS])])
        return spec[SAMPLE_IDS].to_numpy(ids), spec[SAMPLE_OFFSETS].to_numpy(offsets)

    def read_part(self, part: Part, hook: str) -> Batch:
        return self.read_block(Block(part, 0, self.num_part_tokens(part)), hook)

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

        shuffle: rows are mixed across blocks of all this rank's parts through a buffer of
          about `shuffle_bytes` of activations (order depends on seed and epoch only).
        rank/world_size: parts are dealt to ranks without overlap; ranks may get a few
          tokens more or fewer than each other.
        prefetch: blocks (about `block_bytes` of activations each) fetched ahead on `threads`.
        dtype: convert activations per batch (e.g. np.float32); default the stored dtype.
        """
        self.check_hook(hook)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        row_bytes = self.hooks[hook] * shards.activation_dtype(self.dtype).itemsize
        block_tokens = max(1, block_bytes // row_bytes)
        rng = np.random.default_rng([seed, epoch]) if shuffle else None
        mine = deal_parts(self.parts(chunks), rank, world_size, None if rng is None else seed)
        threads = max(1, threads)
        blocks = [
            b
            for part, tokens in zip(mine, self._map(self.num_part_tokens, mine, threads))
            for b in cut_blocks(part, tokens, block_tokens)
        ]
        if rng is not None:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        fetched = prefetched(blocks, lambda b: self.read_block(b, hook), threads, max(1, prefetch))
        if rng is not None:
            # Never allocate more buffer than this rank has rows.
            buffer_tokens = min(max(batch_size, shuffle_bytes // row_bytes), sum(b.hi - b.lo for b in blocks))
            batches = mix(fetched, batch_size, max(buffer_tokens, 1), rng)
        else:
            batches = rebatch(fetched, batch_size)
        for batch in batches:
            if dtype is not None:
                batch = batch.with_activations(batch.activations.astype(dtype))
            yield batch

    # -- helpers -----------------------------------------------------------------------

    def check_hook(self, hook: str) -> None:
        if hook not in self.hooks:
            raise ValueError(f"{self.url}: no hook {hook!r}; stored hooks: {', '.join(self.hooks)}")

    @staticmethod
    def _map(fn: Callable, items: Sequence, threads: int) -> list:
        # Headers are tiny: fetch them concurrently so object-store latency is paid once.
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(fn, items))


def open_run(url: str, **storage_options) -> Run:
    """Open a run written by `actex extract` (local path, file://, memory://, gs://, s3://)."""
    return Run(open_store(url, **storage_options))
