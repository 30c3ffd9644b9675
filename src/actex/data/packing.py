"""Packing tokenized samples into fixed-shape batches with segment ids, instead of padding.

Each batch is [rows, seq] with seq from a few power-of-two buckets (so XLA compiles a few
programs) and rows = batch_tokens // seq (so every batch costs about the same memory).
Segments (a sample, or one window of a split document) are placed first-fit-decreasing:
the longest remaining segment picks the batch's bucket, every other segment goes into the
first row with room. Long segments thus get rows of their own and short ones fill the gaps.
A final, partly filled batch shrinks its row count to a power of two.

Call `pack` on one chunk's samples at a time: a batch never mixes chunks, because a chunk
is the unit of commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from actex.data.tokenize import TokenizedSample

DEFAULT_BATCH_TOKENS = 16384
MIN_BUCKET = 128


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
    """Powers of two from MIN_BUCKET below max_seq_len, then max_seq_len itself."""
    buckets, size = [], MIN_BUCKET
    while size < max_seq_len:
        buckets.append(size)
        size *= 2
    return (*buckets, max_seq_len)


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


def _fill_rows(segments: list[_Segment], seq: int, max_rows: int) -> tuple[list[list[_Segment]], list[_Segment]]:
    """First-fit of longest-first segments into at most max_rows rows of `seq` tokens.

    Returns (rows, segments that did not fit, still longest first)."""
    rows: list[list[_Segment]] = []
    free: list[int] = []
    left: list[_Segment] = []
    for k, segment in enumerate(segments):
        if len(rows) == max_rows and max(free) < segments[-1].length:
            left.extend(segments[k:])  # nothing left can fit: stop scanning
            break
        row = next((r for r, room in enumerate(free) if room >= segment.length), None)
        if row is None and len(rows) < max_rows:
            rows.append([])
            free.append(seq)
            row = len(rows) - 1
        if row is None:
            left.append(segment)
            continue
        rows[row].append(segment)
        free[row] -= segment.length
    return rows, left


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


def pack(tokenized: Sequence[TokenizedSample], batch_tokens: int = DEFAULT_BATCH_TOKENS, max_seq_len: int = 8192) -> list[PackedBatch]:
    """One chunk's samples -> batches [rows, seq]; samples with no tokens are left out."""
    buckets = seq_buckets(max_seq_len)
    remaining = _segments(tokenized, max_seq_len)
    batches = []
    while remaining:
        seq = next(b for b in buckets if b >= remaining[0].length)
        max_rows = max(1, batch_tokens // seq)
        rows, remaining = _fill_rows(remaining, seq, max_rows)
        # Only the last batch can be short of rows; a power of two keeps its shapes few.
        n_rows = min(max_rows, 1 << (len(rows) - 1).bit_length())
        batches.append(_to_arrays(rows, n_rows, seq))
    return batches
