"""One block read: the hook's rows of a part with their index rows, every byte checked.

A block is one ranged read of the hook's rows plus one of the matching rows of
`token_ids`/`positions` and the part's small sample index (the small gaps between those
are read too; they never hold another hook's bytes). Other hooks' bytes are never
requested. int8 codes come back dequantized (store/quantize.py), tile by tile when the
result is not float32, so no full-size intermediate is made.

Every range is checked against its CRC-32C before a row of it is decoded, and the check
runs with the GIL released (store/integrity.py): while one prefetch thread checks block
n, the others read and decode blocks n+1, n+2, ... on the other cores, so the check
overlaps the next reads instead of following them.
"""

from __future__ import annotations

import numpy as np

from actex.reader.batch import Batch
from actex.reader.parts import Block, PartRef
from actex.reader.ranges import INDEX_GAP_BYTES, checked_rows, only_index_between, read_ranges, row_range, whole
from actex.store import quantize, shards
from actex.store.folder import Store
from actex.store.shards import TensorInfo

# Index tensors every part holds besides one tensor per hook (docs/store.md, "Parts").
TOKEN_IDS, POSITIONS, SAMPLE_OFFSETS, SAMPLE_IDS = shards.INDEX_TENSORS
# int8 rows are dequantized this many bytes of float32 at a time when the result is not
# float32 (`dequantized`): about an L2 cache, so the tile is cast while it is still there.
DEQUANTIZE_TILE_BYTES = 1 << 20


def read_block(store: Store, block: Block, hook: str, spec: dict[str, TensorInfo], value_dtype: np.dtype) -> Batch:
    """The hook's rows of one block with their index rows, every byte checked: two ranged
    reads when the index tensors sit together (the store format's layout), more only if
    a hook lies between (an int8 hook: two more, its scales and exponents). Ranges widen
    to whole checksum blocks (v2). int8 codes come back dequantized as `value_dtype`; other
    stored dtypes come back as stored (the caller converts)."""
    where = store.url_of(block.part.path)
    lo, hi = block.lo, block.hi
    names = (TOKEN_IDS, POSITIONS, SAMPLE_IDS, SAMPLE_OFFSETS)
    rows = [spec[TOKEN_IDS].covering(lo, hi), spec[POSITIONS].covering(lo, hi),
            (0, spec[SAMPLE_IDS].rows), (0, spec[SAMPLE_OFFSETS].rows)]
    index = [row_range(spec[n], *r) for n, r in zip(names, rows)]
    gap = INDEX_GAP_BYTES if only_index_between(spec, index) else 0
    raws = read_ranges(store, block.part.path, index, max_gap=gap)
    tokens, positions, ids, offsets = (
        checked_rows(spec[n], n, where, raw, r, full) for n, raw, r, full in
        zip(names, raws, rows, [(lo, hi), (lo, hi), rows[2], rows[3]])
    )
    # Token t belongs to sample s where offsets[s] <= t < offsets[s+1].
    owner = np.searchsorted(offsets, np.arange(lo, hi), side="right") - 1
    return Batch(
        activations=read_values(store, block, hook, spec, value_dtype),
        token_ids=tokens,
        positions=positions,
        sample_ids=ids[owner],
    )


def read_rows(store: Store, block: Block, name: str, spec: dict[str, TensorInfo]) -> np.ndarray:
    """Rows [lo, hi) of one tensor of the block's part: one ranged read, checked."""
    info, rows = spec[name], spec[name].covering(block.lo, block.hi)
    raw = store.read_range(block.part.path, *row_range(info, *rows))
    return checked_rows(info, name, store.url_of(block.part.path), raw, rows, (block.lo, block.hi))


def read_values(store: Store, block: Block, hook: str, spec: dict[str, TensorInfo], value_dtype: np.dtype) -> np.ndarray:
    """The hook's rows; int8 codes dequantized straight into a `value_dtype` array."""
    codes = read_rows(store, block, hook, spec)
    if spec[hook].dtype != "I8":
        return codes
    scale, exps = (read_rows(store, block, quantize.companion(hook, what), spec)
                   for what in (quantize.SCALE, quantize.BLOCK_EXP))
    return dequantized(codes, scale, exps, value_dtype)


def dequantized(codes: np.ndarray, scale: np.ndarray, packed: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Values [tokens, W] as `dtype` from int8 codes [tokens, W], scales [tokens] and packed
    exponents (store/quantize.py), with no full-size intermediate.

    float32 of a width divisible by 8 is one pass of quantize.dequantize already. Any other
    result (bfloat16, float16, a ragged width) is made DEQUANTIZE_TILE_BYTES of float32 at a
    time and cast into the one output array: the float32 tile stays in cache, where one call
    for the block would write a float32 copy of the whole block and then cast it.
    """
    dtype = np.dtype(dtype)
    tokens, width = codes.shape
    if dtype == np.float32 and width % quantize.BLOCK == 0:
        return quantize.dequantize(codes, scale, packed)
    out = np.empty((tokens, width), dtype)
    rows = max(1, DEQUANTIZE_TILE_BYTES // (4 * max(width, 1)))
    for lo in range(0, tokens, rows):
        hi = lo + rows
        out[lo:hi] = quantize.dequantize(codes[lo:hi], scale[lo:hi], packed[lo:hi])
    return out


def read_index(store: Store, part: PartRef, spec: dict[str, TensorInfo]) -> tuple[np.ndarray, np.ndarray]:
    """The part's sample_ids [samples] and sample_offsets [samples+1] (token offsets), checked."""
    where = store.url_of(part.path)
    raws = read_ranges(store, part.path, [whole(spec[SAMPLE_IDS]), whole(spec[SAMPLE_OFFSETS])])
    return tuple(spec[n].read(raw, where, n) for n, raw in zip((SAMPLE_IDS, SAMPLE_OFFSETS), raws))
