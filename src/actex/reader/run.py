"""Read a run back: committed parts -> shuffled training batches of one hook.

    run = actex.open_run("gs://bucket/runs/qwen-arc")
    for batch in run.iter_batches("blocks.12.hook_resid_post", batch_size=4096, seed=0):
        batch.activations  # [4096, 896] in the stored dtype (int8 runs: dequantized, float32)

How bytes move (docs/store.md; parts are safetensors files):
  1. Only committed chunks are visible: one listing of commits/ says which. Their
     records, which name the parts, are fetched as the chunks come up, never all up front.
  2. Each part's header is one checked ranged read (reader/ranges.py), fetched as the
     part comes up, a bounded number ahead.
  3. A part is cut into row blocks (reader/parts.py); a block is a few ranged reads of
     the hook's rows and their index rows, every byte checked (reader/blocks.py).
  4. Background threads fetch the next `prefetch` blocks while the caller trains
     (reader/prefetch.py).
  5. With shuffle, this rank's chunks are visited in a seeded random order, each chunk's
     blocks in random order, and rows are mixed in a bounded buffer of `shuffle_bytes`
     (reader/shuffle.py; docs/reader.md for its memory), so one batch holds tokens from
     many chunks.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from functools import cached_property

import numpy as np

from actex.model.hooks import canonical_name
from actex.reader import blocks
from actex.reader.batch import Batch, rebatch
from actex.reader.blocks import TOKEN_IDS
from actex.reader.parts import Block, PartRef, cut_blocks, deal_chunks, parts_of
from actex.reader.prefetch import prefetched
from actex.reader.ranges import aligned, check_whole_part, fetch_header
from actex.reader.shuffle import mix
from actex.store import dtypes, integrity, quantize, shards
from actex.store.commits import CommitRecord, check_samples, committed_chunks, read_commits
from actex.store.folder import Store, open_store
from actex.store.integrity import CorruptPartError
from actex.store.manifest import RunManifest, read_manifest
from actex.store.shards import TensorInfo
from actex.store.stats import HookStats, decode_stats

# A block's hook rows are about this many bytes: big enough that per-request latency on
# object stores is amortised, small enough that many blocks fit the shuffle buffer.
DEFAULT_BLOCK_BYTES = 16 << 20
DEFAULT_SHUFFLE_BYTES = 1 << 30
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


class Run:
    """A run's committed contents, read lazily.

    Opening costs run.json and one listing of commits/, whatever the run's size. Commit
    records are fetched when something needs them (concurrently, in batches) and kept in
    memory (`records`); part headers are fetched one ranged read each as parts are reached
    and kept in a bounded cache; statistics objects are read only by `stats` / `summary`.
    """

    def __init__(self, store: Store):
        self.store = store
        try:
            self.manifest: RunManifest = read_manifest(store)
        except FileNotFoundError:
            raise FileNotFoundError(f"{store.url}: no run.json here (not an actex run, or no worker "
                                    "has started it yet)") from None
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
        """The dtype batches come in: `dtype` if given, else the stored one (float32 for int8).

        Raises ValueError for a dtype that is not floating (int8 included: an int8 run's
        codes are always dequantized, and a cast of values to an integer type would keep
        only their integer part, mostly zeros)."""
        if dtype is None:
            return np.dtype(np.float32) if self.quantized else dtypes.activation_dtype(self.dtype)
        wanted = np.dtype(dtype)
        if wanted.kind != "f" and wanted != dtypes.ACTIVATION_DTYPES["bfloat16"]:
            raise ValueError(f"dtype {wanted}: batches hold floating values; ask for one of "
                             "float32, bfloat16, float16, float64 (int8 runs come dequantized)")
        return wanted

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

    def parts(self, chunks: Sequence[int] | None = None) -> list[PartRef]:
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
        """Per-sample metadata of a committed chunk (samples.jsonl of its committed attempt).
        CorruptPartError when the file is not the one committed (CRC-32C in the record)."""
        record = self.record(chunk)
        where = self.store.url_of(record.samples_path)
        return shards.decode_samples_jsonl(check_samples(record, self.store.read_bytes(record.samples_path), where), where)

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

    def header(self, part: PartRef) -> dict[str, TensorInfo]:
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

    def num_part_tokens(self, part: PartRef) -> int:
        return self.header(part)[TOKEN_IDS].shape[0]

    def read_block(self, block: Block, hook: str, spec: dict[str, TensorInfo] | None = None,
                   dtype: np.dtype | str | None = None) -> Batch:
        """The hook's rows of one block with their index rows, every byte checked
        (reader/blocks.py). int8 codes come back dequantized, as `dtype` (default float32);
        other stored dtypes come back as stored (the caller converts)."""
        return blocks.read_block(self.store, block, hook, spec or self.header(block.part), self.value_dtype(dtype))

    def read_index(self, part: PartRef) -> tuple[np.ndarray, np.ndarray]:
        """The part's sample_ids [samples] and sample_offsets [samples+1] (token offsets), checked."""
        return blocks.read_index(self.store, part, self.header(part))

    def check_part(self, part: PartRef) -> None:
        """Read a whole part and check every byte (reader/ranges.py, check_whole_part)."""
        check_whole_part(self.store, part)

    def read_part(self, part: PartRef, hook: str, dtype: np.dtype | str | None = None) -> Batch:
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
        pending = self._blocks(mine, hook, max(1, block_bytes // row_bytes), rng, threads, depth)
        fetched = prefetched(pending, lambda b: self.read_block(b[0], hook, b[1], dtype), threads, depth)
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
            chunk_blocks = [
                (block, spec)
                for part, spec in group
                for block in cut_blocks(part, spec[TOKEN_IDS].rows, aligned(block_tokens, spec[hook]))
            ]
            if rng is not None:
                chunk_blocks = [chunk_blocks[i] for i in rng.permutation(len(chunk_blocks))]
            yield from chunk_blocks

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
