"""Part assembly: a chunk's packed-batch rows back into per-sample tokens, cut into parts.

Packing lays several samples' windows side by side in a batch row; the assembler undoes
that on the host, scattering each window's rows into the part that holds its sample, and
hands a part out once every one of its rows has arrived (engine/pipeline.py writes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from actex.data.positions import EVERY_POSITION, PositionSelection
from actex.store import quantize as q8
from actex.store.shards import EncodedPart, encode_part, split_samples, token_bytes


@dataclass
class PartBuffer:
    """One part being filled: its samples' windows laid end to end, in sample-id order.

    Activations are scattered straight into the part's own arrays, so encoding needs no
    concatenation copy; they are allocated when the first row arrives.
    """

    index: int
    sample_ids: np.ndarray  # [samples] int64
    sample_offsets: np.ndarray  # [samples + 1] int64: sample i is rows offsets[i]:offsets[i+1]
    token_ids: np.ndarray  # [tokens] int32
    positions: np.ndarray  # [tokens] int32, filled from the packed batches
    acts: dict[str, np.ndarray] = field(default_factory=dict)  # hook -> [tokens, width]
    filled: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def complete(self) -> bool:
        return self.filled == self.num_tokens


# A window's place in its part: its first stored row, and which of its tokens are stored
# ([window length] bool; None: every one).
WindowRows = tuple[int, np.ndarray | None]


def stored_tokens(tokenized, select: PositionSelection = EVERY_POSITION) -> tuple[np.ndarray, dict[int, WindowRows]]:
    """A sample's stored token ids (its windows' selected tokens, in order) and, per window
    start in the sample, where the window's rows start there and which tokens it keeps."""
    windows, pieces, at = {}, [], 0
    for start, stop in tokenized.windows:
        keep = select.keep(tokenized.sample_id, start, stop - start)
        ids = np.asarray(tokenized.token_ids[start:stop], dtype=np.int32)
        pieces.append(ids if keep is None else ids[keep])
        windows[start] = (at, keep)
        at += len(pieces[-1])
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int32)), windows


def fill_order(tokenized: Sequence, batches: Sequence | None) -> list:
    """The samples in the order the packed batches complete them (then by sample id).

    Packing is longest-first, so sample-id order is not the order rows arrive in; parts cut
    in arrival order complete one after another, and host memory holds only the parts being
    filled or written, not nearly every part of the chunk until its last batch. Samples
    with no tokens (in no batch) come first: they are complete from the start.
    """
    done_at: dict[int, int] = {}
    for index, batch in enumerate(batches or ()):
        for placement in batch.placements:
            done_at[placement.sample_id] = index
    return sorted(tokenized, key=lambda t: (done_at.get(t.sample_id, -1), t.sample_id))


class ChunkAssembler:
    """Turns a chunk's packed-batch outputs back into per-sample tokens, in parts.

    The parts are planned up front from the samples' token counts (store.shards.split_samples),
    taking the samples in the order the batches complete them (`fill_order`), so parts fill
    one after another; within a part samples are in id order. A sample never spans two
    parts, and a part stays under `shard_size` bytes unless one sample alone is larger. A
    part is handed out as soon as all of its rows have arrived. `select` (--positions)
    says which tokens of each window are stored; the others are computed and dropped here.
    """

    def __init__(self, tokenized: Sequence, widths: dict[str, int], dtype: str, shard_size: int,
                 batches: Sequence | None = None, *, part_base: int = 0, select: PositionSelection = EVERY_POSITION):
        self.tensors = part_tensors(widths, dtype)
        arrival = fill_order(tokenized, batches)
        arrival_stored = [stored_tokens(t, select) for t in arrival]
        spans = split_samples([len(ids) for ids, _ in arrival_stored], token_bytes(list(widths.values()), dtype), shard_size)
        # Within each part, samples in id order (readers and samples.jsonl list them so).
        order = [i for span in spans for i in sorted(span, key=lambda i: arrival[i].sample_id)]
        ordered = [arrival[i] for i in order]
        stored = [arrival_stored[i] for i in order]
        lengths = [len(ids) for ids, _ in stored]
        self.records = sample_records(ordered, lengths)
        self.parts: list[PartBuffer] = []
        # sample id -> (its part, {window start in the sample -> (row in the part, kept tokens)})
        self.rows: dict[int, tuple[PartBuffer, dict[int, WindowRows]]] = {}
        for index, span in enumerate(spans):
            offsets = np.concatenate([[0], np.cumsum([lengths[i] for i in span], dtype=np.int64)]).astype(np.int64)
            token_ids = np.concatenate([stored[i][0] for i in span]) if span else np.zeros(0, np.int32)
            part = PartBuffer(
                part_base + index, np.array([ordered[i].sample_id for i in span], np.int64), offsets, token_ids,
                np.zeros(len(token_ids), np.int32),
            )
            self.parts.append(part)
            for i, base in zip(span, offsets):
                self.rows[ordered[i].sample_id] = (
                    part, {start: (int(base) + at, keep) for start, (at, keep) in stored[i][1].items()})
        self._handed_out: set[int] = set()

    def add(self, placements, token_positions: np.ndarray, host: dict[str, np.ndarray]) -> None:
        """Scatter one batch's rows into their parts. host: {hook: [rows, seq, width]}, the
        rows this process packed (in a slice: its share of the global batch); an int8 hook
        comes as its codes and their scale and exponent tensors (part_tensors)."""
        for sample_id, start, row, col, length in placements:
            part, window_rows = self.rows[sample_id]
            if not part.acts:
                part.acts = empty_tensors(self.tensors, part.num_tokens)
            at, keep = window_rows[start]
            # The window's stored columns: a slice (no copy of the index) when all are kept.
            cols = slice(col, col + length) if keep is None else col + np.flatnonzero(keep)
            n = length if keep is None else len(cols)
            for hook, values in host.items():
                part.acts[hook][at : at + n] = values[row, cols]
            part.positions[at : at + n] = token_positions[row, cols]
            part.filled += n

    def ready_parts(self, final: bool = False) -> list[PartBuffer]:
        """Complete parts not handed out yet; with `final`, every part must be complete."""
        ready = [p for p in self.parts if p.complete and p.index not in self._handed_out]
        self._handed_out.update(p.index for p in ready)
        if final and len(self._handed_out) != len(self.parts):
            part = next(p for p in self.parts if not p.complete)
            raise RuntimeError(
                f"part {part.index} (samples {part.sample_ids.tolist()}): {part.filled} of {part.num_tokens} "
                "tokens came back from the packed batches (packing lost a window)"
            )
        return ready


def sample_records(ordered: Sequence, lengths: Sequence[int]) -> list[dict]:
    """samples.jsonl's lines: sample id, metadata, stored token count (in sample-id order)."""
    return [{"sample_id": t.sample_id, **t.meta, "n_tokens": n} for t, n in zip(ordered, lengths)]


def chunk_records(tokenized: Sequence, select: PositionSelection = EVERY_POSITION) -> list[dict]:
    """samples.jsonl's lines for a whole chunk (what process 0 of a slice writes)."""
    ordered = sorted(tokenized, key=lambda t: t.sample_id)
    return sample_records(ordered, [len(stored_tokens(t, select)[0]) for t in ordered])


def part_tensors(widths: dict[str, int], dtype: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{tensor: (shape after the token axis, dtype)} of a part: one per hook, three per int8 hook."""
    return {name: spec for hook, width in widths.items() for name, spec in q8.stored_tensors(hook, width, dtype).items()}


def empty_tensors(tensors: dict[str, tuple[tuple[int, ...], np.dtype]], tokens: int) -> dict[str, np.ndarray]:
    return {name: np.empty((tokens, *shape), dtype) for name, (shape, dtype) in tensors.items()}


def encode(part: PartBuffer, tensors: dict[str, tuple[tuple[int, ...], np.dtype]], *, chunk: int,
           attempt: str) -> EncodedPart:
    """A part as safetensors bytes (a part of empty samples has empty activations)."""
    acts = part.acts or empty_tensors(tensors, 0)
    return encode_part(
        acts,
        token_ids=part.token_ids,
        positions=part.positions,
        sample_offsets=part.sample_offsets,
        sample_ids=part.sample_ids,
        chunk=chunk,
        attempt=attempt,
        part=part.index,
    )
