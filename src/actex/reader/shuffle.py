"""Shuffling rows across blocks through a bounded buffer (docs/reader.md, "Shuffling and its memory")."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from actex.reader.batch import BATCH_FIELDS, Batch, as_bits


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
        for f in BATCH_FIELDS:
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
