"""One chunk across the processes of a slice, in lockstep.

Every process tokenizes the whole chunk (cheap next to the forward pass, and deterministic),
cuts it into contiguous shares of samples, balanced by tokens, and packs EVERY share, so
that each process knows every other's batch shapes without a message. There is one share
per process, or per model group when the model axis spans processes (mesh.RowShare): the
processes of a group hold the same rows, so they pack the same share alike.
Step s then has one shape for all: the largest rows and row length any share packed at
step s; a share with fewer batches pads whole steps of padding rows. Shapes must match
because each step is a collective over all hosts (`make_array_from_process_local_data`
then the jitted forward); a mismatch is a gloo "collective mismatch" and an abort.

Process p holds only its share's samples, and writes them unless another process of its
model group does (the group's first). Parts are numbered across shares in share order, so
a chunk's parts are in sample-id order as on one process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from actex.data import ShapeBudget, pack
from actex.data.packing import PackedBatch


def split_shares(tokenized: Sequence, count: int) -> list[list]:
    """`count` contiguous runs of samples in sample-id order, each near total_tokens / count.

    Sample i goes to the share its token midpoint falls in, so a long sample lands where
    most of it is; shares may be empty when there are fewer samples than processes.
    """
    ordered = sorted(tokenized, key=lambda t: t.sample_id)
    sizes = np.array([max(1, len(t.token_ids)) for t in ordered], np.float64)
    total = sizes.sum()
    midpoints = np.cumsum(sizes) - sizes / 2
    owner = np.minimum((midpoints * count / max(total, 1)).astype(int), count - 1)
    return [[t for t, o in zip(ordered, owner) if o == p] for p in range(count)]


def pad_batch(batch: PackedBatch, rows: int, seq: int) -> PackedBatch:
    """The same batch in a [rows, seq] frame: new rows and columns are padding (segment 0)."""
    r, s = batch.token_ids.shape

    def grow(x: np.ndarray) -> np.ndarray:
        return np.pad(x, ((0, rows - r), (0, seq - s)))

    return dataclasses.replace(batch, token_ids=grow(batch.token_ids), positions=grow(batch.positions),
                               segment_ids=grow(batch.segment_ids))


def empty_batch(rows: int, seq: int) -> PackedBatch:
    """A step of padding only, for a share that ran out of batches."""
    zeros = np.zeros((rows, seq), np.int32)
    return PackedBatch(zeros, zeros.copy(), zeros.copy(), ())


def lockstep_batches(shares: Sequence[Sequence], index: int, batch_tokens: int, max_seq_len: int, *,
                     row_multiple: int, budgets: Sequence[ShapeBudget]) -> list[PackedBatch]:
    """Share `index`'s batches for one chunk, padded so every process's step s has one shape.

    shares: every share's samples (split_shares); batch_tokens: per share and step;
    row_multiple: this process's data shards; budgets: one ShapeBudget per share, kept by
    every process alike (so every process packs every share identically).
    """
    packed = [pack(share, batch_tokens, max_seq_len, row_multiple=row_multiple, budget=budget)
              for share, budget in zip(shares, budgets)]
    steps = max(len(p) for p in packed)
    ours = []
    for step in range(steps):
        shapes = [p[step].token_ids.shape for p in packed if step < len(p)]
        rows, seq = max(r for r, _ in shapes), max(s for _, s in shapes)
        mine = packed[index]
        ours.append(pad_batch(mine[step], rows, seq) if step < len(mine) else empty_batch(rows, seq))
    return ours
