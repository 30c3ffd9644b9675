"""A batch of one hook's rows (Batch) and cutting a stream of row pieces into batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np


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
        for f in BATCH_FIELDS:
            getattr(self, f)[index] = getattr(rows, f)

    @staticmethod
    def empty(like: Batch, rows: int) -> Batch:
        """Uninitialised rows with `like`'s widths; activations as same-width unsigned ints."""
        like = as_bits(like)
        return Batch(*(np.empty((rows, *getattr(like, f).shape[1:]), getattr(like, f).dtype) for f in BATCH_FIELDS))

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        if len(batches) == 1:
            return batches[0]
        return Batch(*(np.concatenate([getattr(b, f) for b in batches]) for f in BATCH_FIELDS))


BATCH_FIELDS = ("activations", "token_ids", "positions", "sample_ids")


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
