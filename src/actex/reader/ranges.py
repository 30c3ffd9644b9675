"""Ranged reads of a part's bytes, each checked against the CRC-32C recorded at write time.

Every range is checked (store/integrity.py) before it is returned: a mismatch, a short
read or an impossible header raises CorruptPartError naming the part and the tensor.
A part's safetensors header is one ranged read (v2 records give its length and CRC; v1
parts take a guess of 64 KiB and a second read if longer).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from actex.reader.parts import PartRef
from actex.store import integrity, shards
from actex.store.folder import Store
from actex.store.integrity import CorruptPartError
from actex.store.shards import TensorInfo

# A request to an object store costs tens of milliseconds, the time to stream about a MiB:
# a block's index rows (token ids, positions, sample index) closer than this are one request.
INDEX_GAP_BYTES = 1 << 20
# Format v1 records do not say how long a part's header is: read this much and hope
# (a second read fetches the rest of a longer one).
V1_HEADER_GUESS = 64 * 1024


def fetch_header(store: Store, part: PartRef) -> dict[str, TensorInfo]:
    """A part's tensor index, checked, from one ranged read (two for a long v1 header).

    v2: the commit record gives the header's length and CRC-32C, so the header is checked
    before any offset in it is trusted. Raises CorruptPartError (one line naming the part)
    for a wrong CRC, a length past the part's end, or offsets outside it.
    """
    where = store.url_of(part.path)
    if part.header_bytes is not None:
        raw = store.read_range(part.path, 0, part.header_bytes)
        actual = integrity.hex32(integrity.crc32c(raw))
        if len(raw) != part.header_bytes:
            raise CorruptPartError(f"{where}: truncated: header needs {part.header_bytes} bytes, got {len(raw)}")
        if actual != part.header_crc32c:
            raise CorruptPartError(f"{where}: header crc32c expected {part.header_crc32c}, actual {actual}")
    else:
        raw = store.read_range(part.path, 0, min(part.bytes, V1_HEADER_GUESS))
        length = shards.header_length(raw, where, part.bytes)
        if length > len(raw):
            raw += store.read_range(part.path, len(raw), length)
    return shards.read_header(raw, where, part.bytes).tensors


def size_problem(data: bytes, size: int, where: str) -> str:
    """Why a whole part of len(data) bytes is not the `size` bytes its commit record says,
    naming the tensor rows a truncation cut off when the header survived it."""
    said = f"{len(data)} bytes, the commit record says {size}"
    if len(data) > size:
        return f"longer than written: {said}"
    try:
        missing = shards.missing_rows(shards.read_header(data, where, size).tensors, len(data))
    except CorruptPartError:  # the cut reached into the header
        missing = None
    return f"truncated: {said}" + (f"; {missing} missing" if missing else "")


def checked_rows(info: TensorInfo, name: str, where: str, raw: bytes | memoryview,
                 got: tuple[int, int], want: tuple[int, int]) -> np.ndarray:
    """Rows `want` of a tensor from the bytes of rows `got` (covering them), checked first."""
    info.check(raw, where, name, *got)
    lo, hi = want
    return decode_rows(info, memoryview(raw)[(lo - got[0]) * info.row_bytes : (hi - got[0]) * info.row_bytes], lo, hi)


def aligned(block_tokens: int, info: TensorInfo) -> int:
    """Block rows rounded to whole checksum blocks, so no block is read twice."""
    if not info.crc_rows:
        return block_tokens
    return max(1, block_tokens // info.crc_rows) * info.crc_rows


def row_range(info: TensorInfo, lo: int, hi: int) -> tuple[int, int]:
    """Absolute byte range of rows [lo, hi) along the tensor's first axis."""
    row_bytes = (info.stop - info.start) // max(info.shape[0], 1)
    return info.start + lo * row_bytes, info.start + hi * row_bytes


def whole(info: TensorInfo) -> tuple[int, int]:
    return info.start, info.stop


def decode_rows(info: TensorInfo, raw: bytes, lo: int, hi: int) -> np.ndarray:
    return replace(info, shape=(hi - lo, *info.shape[1:])).to_numpy(raw)


def read_ranges(store: Store, path: str, ranges: Sequence[tuple[int, int]], max_gap: int = 0) -> list[bytes]:
    """Fetch byte ranges of one file; ranges at most `max_gap` bytes apart share one request."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    out: list[bytes] = [b""] * len(ranges)
    group: list[int] = []
    end = 0

    def flush() -> None:
        lo = ranges[group[0]][0]
        data = memoryview(store.read_range(path, lo, end))
        for i in group:
            out[i] = data[ranges[i][0] - lo : ranges[i][1] - lo]
        group.clear()

    for i in order:
        if group and ranges[i][0] > end + max_gap:
            flush()
        end = max(end, ranges[i][1]) if group else ranges[i][1]
        group.append(i)
    if group:
        flush()
    return out


def only_index_between(spec: dict[str, TensorInfo], ranges: Sequence[tuple[int, int]]) -> bool:
    """True when no hook tensor has bytes inside the span of `ranges` (so the gaps may be read)."""
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    return all(t.stop <= lo or t.start >= hi for name, t in spec.items() if name not in shards.INDEX_TENSORS)


def check_whole_part(store: Store, part: PartRef) -> None:
    """Read a whole part and check every byte: size and sha256 from the commit record,
    header CRC (v2), each tensor's CRCs (v2). CorruptPartError names the part and, where
    the checksums can tell, the tensor (v1 parts have only the sha256)."""
    where = store.url_of(part.path)
    data = store.read_bytes(part.path)
    if part.header_bytes is not None and len(data) >= part.header_bytes:
        actual = integrity.hex32(integrity.crc32c(memoryview(data)[: part.header_bytes]))
        if actual != part.header_crc32c:
            raise CorruptPartError(f"{where}: header crc32c expected {part.header_crc32c}, actual {actual}")
    if len(data) != part.bytes:
        raise CorruptPartError(f"{where}: {size_problem(data, part.bytes, where)}")
    shards.decode_part(data, where)
    actual = hashlib.sha256(data).hexdigest()
    if part.sha256 is not None and actual != part.sha256:
        raise CorruptPartError(f"{where}: sha256 expected {part.sha256}, actual {actual}")
