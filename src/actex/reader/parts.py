"""What the reader fetches: a committed part (PartRef), rows of one (Block), and which
chunks each rank reads.

Ranks split a run by whole chunks (a seeded permutation dealt round-robin), so ranks
never overlap and every committed token is yielded exactly once per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from actex.store.commits import CommitRecord


@dataclass(frozen=True)
class PartRef:
    """One committed part file, as its commit record names it (the writer's parts are
    store.shards.Part; this only points at one)."""

    chunk: int
    index: int  # position in the commit record's `parts`
    path: str  # relative to the run root
    bytes: int
    header_bytes: int | None = None  # v2: length and CRC of its header, from the commit record
    header_crc32c: str | None = None
    sha256: str | None = None  # of the whole file, from the commit record


def parts_of(record: CommitRecord) -> list[PartRef]:
    return [PartRef(record.chunk, i, p.path, p.bytes, p.header_bytes, p.header_crc32c, p.sha256)
            for i, p in enumerate(record.parts)]


@dataclass(frozen=True)
class Block:
    """Rows [lo, hi) of one part: the unit of fetching and of shuffling."""

    part: PartRef
    lo: int
    hi: int


def cut_blocks(part: PartRef, tokens: int, block_tokens: int) -> list[Block]:
    return [Block(part, lo, min(lo + block_tokens, tokens)) for lo in range(0, tokens, block_tokens)]


def deal_chunks(chunks: Sequence[int], rank: int, world_size: int, seed: int | None) -> list[int]:
    """This rank's chunks: all chunks in a (seeded) order dealt round-robin, so ranks never overlap.

    By chunk, not by part: which parts a chunk has is in its record, and dealing must not
    need every record before the first batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    order = list(chunks) if seed is None else [chunks[i] for i in np.random.default_rng(seed).permutation(len(chunks))]
    return order[rank::world_size]
