"""Packing tokenized samples into fixed-shape batches with segment ids, instead of padding.

Each batch is [rows, seq] with seq from a few power-of-two buckets (so XLA compiles a few
programs) and rows = batch_tokens // seq (so every batch costs about the same memory).
Segments (a sample, or one window of a split document) are placed first-fit-decreasing
into rows of max_seq_len tokens: longest first, each into the first row with room, so long
segments get rows of their own and short ones fill the gaps. Each row is then cut to the
smallest bucket that holds it, and rows of one bucket are grouped into batches.

The rows left over at the end of each bucket (the chunk's partial batches) are packed
again, together, into the smallest shape of a finer grid that holds them: row length in
steps of SEQ_STEP tokens, rows in multiples of the data-axis size times a power of two.
A `ShapeBudget` shared by all chunks of a run caps how many distinct shapes (compiled
programs) that creates; past it, partial batches use shapes already compiled, or the
coarse ones. With 16 samples of ~400 tokens (one row of 6,383) the coarse grid pads to
8,192 (78% useful); the fine grid to 6,400 (99.7%).

With a data axis of D devices every batch has a multiple of D rows (each device gets the
same number); rows no segment went into are padding (segment 0).

Call `pack` on one chunk's samples at a time: a batch never mixes chunks, because a chunk
is the unit of commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from actex.data.tokenize import TokenizedSample

DEFAULT_BATCH_TOKENS = 16384
DEFAULT_MAX_SEQ_LEN = 32768
MIN_BUCKET = 128
FINE_BUCKETS_FROM = 4096
# Row-length step of the partial batches' grid: a multiple of 128 (TPU/GPU attention tiles).
SEQ_STEP = 128
# Distinct (rows, seq) shapes a run may compile; each costs a compilation (seconds on CPU,
# tens of seconds for a 7B model on TPU), cached on disk for restarts.
DEFAULT_SHAPE_BUDGET = 24
# Row lengths tried above the smallest that could hold a partial batch's tokens.
_FIT_TRIES = 4


class Placement(NamedTuple):
    sample_id: int
    start_in_sample: int  # offset of this segment in the sample's token_ids
    row: int
    col: int
    length: int


@dataclass(frozen=True)
class PackedBatch:
    token_ids: np.ndarray  # [rows, seq] int32, 0 where padding
    positions: np.ndarray  # [rows, seq] int32, restarting at 0 for every segment
    segment_ids: np.ndarray  # [rows, seq] int32, 0 = padding, 1..k = segments of the row
    placements: tuple[Placement, ...]  # one per segment, in (row, col) order

    @property
    def useful_tokens(self) -> int:
        return sum(p.length for p in self.placements)


def seq_buckets(max_seq_len: int) -> tuple[int, ...]:
    """Powers of two from MIN_BUCKET below max_seq_len, then max_seq_len itself; from
    FINE_BUCKETS_FROM up also the 1.5x steps between them (6144, 12288, 24576, ...).

    Long prompts sit alone in their rows, so a power-of-two step would pad a 17k-token ARC
    prompt to 32k (47% waste); the half steps cap that at 33% for three more programs.
    """
    buckets, size = [], MIN_BUCKET
    while size < max_seq_len:
        buckets.append(size)
        if size >= FINE_BUCKETS_FROM and size * 3 // 2 < max_seq_len:
            buckets.append(size * 3 // 2)
        size *= 2
    return (*buckets, max_seq_len)


class ShapeBudget:
    """The (rows, seq) shapes a run has used so far: the programs it has compiled.

    A fine-grid shape is taken only while fewer than `limit` shapes were used, or if it was
    used before; coarse bucket shapes are always allowed (recorded all the same).
    """

    def __init__(self, limit: int = DEFAULT_SHAPE_BUDGET):
        self.limit = limit
        self.used: set[tuple[int, int]] = set()

    def allows(self, shape: tuple[int, int]) -> bool:
        return shape in self.used or len(self.used) < self.limit

    def use(self, shape: tuple[int, int]) -> None:
        self.used.add(shape)


def useful_fraction(batches: Sequence[PackedBatch]) -> float:
    """Real tokens / all token slots (1.0 means no padding)."""
    total = sum(b.token_ids.size for b in batches)
    return sum(b.useful_tokens for b in batches) / total if total else 1.0


class _Segment(NamedTuple):
    length: int
    sample_id: int
    start: int
    tokens: np.ndarray  # [length] int32


def _segments(tokenized: Sequence[TokenizedSample], max_seq_len: int) -> list[_Segment]:
    """Every window of every sample, longest first (ties by id, so packing is deterministic)."""
    segments = []
    for sample in tokenized:
        for start, stop in sample.windows:
            if stop - start > max_seq_len:
                raise ValueError(f"sample {sample.sample_id}: window of {stop - start} tokens > max_seq_len {max_seq_len}")
            segments.append(_Segment(stop - start, sample.sample_id, start, sample.token_ids[start:stop]))
    segments.sort(key=lambda s: (-s.length, s.sample_id, s.start))
    return segments


def _fill_rows(segments: list[_Segment], capacity: int) -> list[list[_Segment]]:
    """First-fit-decreasing: each segment (longest first) goes into the first row with room.
    A segment longer than `capacity` opens a row of its own that nothing else fits into."""
    rows: list[list[_Segment]] = []
    free = np.zeros(len(segments), np.int64)  # room left per row; at most one row per segment
    for segment in segments:
        fits = free[: len(rows)] >= segment.length
        row = int(np.argmax(fits)) if fits.any() else len(rows)
        if row == len(rows):
            rows.append([])
            free[row] = capacity
        rows[row].append(segment)
        free[row] -= segment.length
    return rows


def _to_arrays(rows: list[list[_Segment]], n_rows: int, seq: int) -> PackedBatch:
    token_ids = np.zeros((n_rows, seq), np.int32)
    positions = np.zeros((n_rows, seq), np.int32)
    segment_ids = np.zeros((n_rows, seq), np.int32)
    placements = []
    for r, segments in enumerate(rows):
        col = 0
        for number, s in enumerate(segments, start=1):
            token_ids[r, col : col + s.length] = s.tokens
            positions[r, col : col + s.length] = np.arange(s.length, dtype=np.int32)
            segment_ids[r, col : col + s.length] = number
            placements.append(Placement(s.sample_id, s.start, r, col, s.length))
            col += s.length
    return PackedBatch(token_ids, positions, segment_ids, tuple(placements))


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _rows_per_batch(seq: int, batch_tokens: int, row_multiple: int) -> int:
    """batch_tokens // seq rows, rounded down to a multiple of the data axis (at least one each)."""
    return max(row_multiple, batch_tokens // seq // row_multiple * row_multiple)


def _fine_fit(
    segments: list[_Segment], batch_tokens: int, max_seq_len: int, row_multiple: int, budget: ShapeBudget
) -> tuple[int, int, list[list[_Segment]]] | None:
    """The smallest (rows, seq) of the fine grid that first-fit-decreasing fills with all of
    `segments` within batch_tokens slots (or one row per data shard, if the longest segment
    alone needs more); None if none does or the budget allows none."""
    longest, total = segments[0].length, sum(s.length for s in segments)
    best = None
    rows = row_multiple
    while True:
        start = max(longest, -(-total // rows))
        if start > max_seq_len:
            rows *= 2
            continue
        limit = max(batch_tokens, row_multiple * min(_round_up(longest, SEQ_STEP), max_seq_len))
        if rows * min(_round_up(start, SEQ_STEP), max_seq_len) > limit:
            break
        for step in range(_FIT_TRIES):
            seq = min(_round_up(start, SEQ_STEP) + step * SEQ_STEP, max_seq_len)
            if rows * seq > limit or (best and rows * seq >= best[0] * best[1]):
                break
            filled = _fill_rows(segments, seq)
            if len(filled) <= rows and budget.allows((rows, seq)):
                best = (rows, seq, filled)
                break
            if seq == max_seq_len:
                break
        rows *= 2
    return best


def pack(
    tokenized: Sequence[TokenizedSample],
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    *,
    row_multiple: int = 1,
    budget: ShapeBudget | None = None,
) -> list[PackedBatch]:
    """One chunk's samples -> batches [rows, seq]; samples with no tokens are left out.

    Rows are filled up to min(max_seq_len, batch_tokens) — a segment longer than that gets a
    row of its own — then each is cut to the smallest bucket that holds it, and rows of one
    bucket are grouped into full batches of batch_tokens // seq rows (longest bucket first).
    The rows left over in every bucket are packed again, together, into the smallest shape
    of the fine grid (see module doc) that `budget` allows; failing that, each bucket's
    leftover is a batch of its own, its rows rounded up to a power of two.
    Every batch has a multiple of `row_multiple` (the data-axis size) rows, and holds at
    most batch_tokens slots unless it has one row per data shard, holding long segments.
    `budget` is shared across the chunks of a run (default: a fresh one for this call).
    """
    budget = budget if budget is not None else ShapeBudget()
    buckets = seq_buckets(max_seq_len)
    rows = _fill_rows(_segments(tokenized, max_seq_len), min(max_seq_len, batch_tokens))
    by_bucket: dict[int, list[list[_Segment]]] = {}
    for row in rows:
        used = sum(s.length for s in row)
        by_bucket.setdefault(next(b for b in buckets if b >= used), []).append(row)
    batches, leftovers = [], []
    for seq in sorted(by_bucket, reverse=True):
        max_rows = _rows_per_batch(seq, batch_tokens, row_multiple)
        bucket_rows = by_bucket[seq]
        n_full = len(bucket_rows) // max_rows * max_rows
        for begin in range(0, n_full, max_rows):
            budget.use((max_rows, seq))
            batches.append(_to_arrays(bucket_rows[begin : begin + max_rows], max_rows, seq))
        if n_full < len(bucket_rows):
            leftovers.append((seq, max_rows, bucket_rows[n_full:]))
    if not leftovers:
        return batches
    segments = sorted((s for _, _, group in leftovers for row in group for s in row),
                      key=lambda s: (-s.length, s.sample_id, s.start))
    fit = _fine_fit(segments, batch_tokens, max_seq_len, row_multiple, budget)
    if fit is not None:
        n_rows, seq, filled = fit
        budget.use((n_rows, seq))
        return [*batches, _to_arrays(filled, n_rows, seq)]
    for seq, max_rows, group in leftovers:
        n_rows = min(max_rows, _round_up(1 << (len(group) - 1).bit_length(), row_multiple))
        budget.use((n_rows, seq))
        batches.append(_to_arrays(group, n_rows, seq))
    return batches
