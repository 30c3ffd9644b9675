"""Packing tokenized samples into fixed-shape batches with segment ids, instead of padding.

Each batch is [rows, seq] with seq from a few power-of-two buckets (so XLA compiles a few
programs) and rows = batch_tokens // seq (so every batch costs about the same memory).
Segments (a sample, or one window of a split document) are placed first-fit-decreasing
into rows of max_seq_len tokens: longest first, each into the first row with room, so long
segments get rows of their own and short ones fill the gaps. Each row is then cut to the
smallest bucket that holds it, and rows of one bucket are grouped into batches.

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


def pack(
    tokenized: Sequence[TokenizedSample], batch_tokens: int = DEFAULT_BATCH_TOKENS, max_seq_len: int = DEFAULT_MAX_SEQ_LEN
) -> list[PackedBatch]:
    """One chunk's samples -> batches [rows, seq]; samples with no tokens are left out.

    Rows are filled up to min(max_seq_len, batch_tokens) — a segment longer than that gets a
    row of its own — then each is cut to the smallest bucket that holds it, and rows of one
    bucket are grouped into batches of batch_tokens // seq rows (longest bucket first). So a
    batch holds at most batch_tokens slots unless it is one row holding one long segment.
    Each bucket's last batch shrinks to a power-of-two number of rows.
    """
    buckets = seq_buckets(max_seq_len)
    rows = _fill_rows(_segments(tokenized, max_seq_len), min(max_seq_len, batch_tokens))
    by_bucket: dict[int, list[list[_Segment]]] = {}
    for row in rows:
        used = sum(s.length for s in row)
        by_bucket.setdefault(next(b for b in buckets if b >= used), []).append(row)
    batches = []
    for seq in sorted(by_bucket, reverse=True):
        max_rows = max(1, batch_tokens // seq)
        bucket_rows = by_bucket[seq]
        for begin in range(0, len(bucket_rows), max_rows):
            group = bucket_rows[begin : begin + max_rows]
            n_rows = min(max_rows, 1 << (len(group) - 1).bit_length())
            batches.append(_to_arrays(group, n_rows, seq))
    return batches
