"""Checksums recorded when a part is written and checked on every read (store format v2).

Chain of trust, from the commit record (whose existence is the commit) down to every byte:

    commit record  parts[k].header_bytes, parts[k].header_crc32c   -> the part's header
    part header    __metadata__["crc32c"]: per tensor, CRC-32C of each block of rows
    tensor bytes   checked block by block as they are read

Each tensor is checksummed in blocks of whole rows of about CRC_BLOCK_BYTES, so a reader
that wants rows [lo, hi) of one hook widens the range to whole blocks (at most one block
more at each end; the reader's own blocks are aligned to them), checks each, and returns
its rows. CRC-32C is GCS's own object checksum; google-crc32c computes it at several GB/s.
The part's sha256 in the commit record stays as well (a contract with other tools); it
covers the whole file, so only a whole-part read (`actex verify`) can check it.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable, Mapping

import google_crc32c
import numpy as np

# Target bytes per checksum block. Reads widen to block boundaries, so this bounds the
# extra bytes of a ranged read; the header holds 8 hex digits per block (~0.001% of data).
CRC_BLOCK_BYTES = 1 << 20
METADATA_KEY = "crc32c"


class CorruptPartError(ValueError):
    """Stored bytes are not what was written (flipped, truncated, or not a part at all).

    The message is one line naming the part (its URL) and, where one is to blame, the tensor.
    """


# Buffers at least this long are checked with the GIL released (below it, the release
# costs more than it frees: a 64 KiB CRC takes ~10 us).
RELEASE_GIL_BYTES = 64 << 10


def _c_value() -> Callable[[int, int], int] | None:
    """`uint32_t crc32c_value(const uint8_t*, size_t)` of the crc32c C library google-crc32c
    loads, called through ctypes, which releases the GIL for the call's length.

    google_crc32c.value holds the GIL unless its argument is a `bytes` of 1 MiB or more,
    and a checksum block (1 MiB of whole rows, so a little less) sliced from a read never
    is: its checks then ran one at a time and stopped every other reader thread. Through
    ctypes, the check of one block runs on another core while the next block is read and
    decoded. None where the library is not reachable (google-crc32c's pure-Python build):
    google_crc32c.value is used instead, with the same results.
    """
    try:
        from google_crc32c import _crc32c  # the C extension; it links the library

        function = ctypes.CDLL(_crc32c.__file__).crc32c_value
    except (ImportError, OSError, AttributeError):
        return None
    function.restype = ctypes.c_uint32
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return function


_C_VALUE = _c_value()


def releases_gil() -> bool:
    """True where checks of RELEASE_GIL_BYTES or more run without holding the GIL."""
    return _C_VALUE is not None


def _value(flat: np.ndarray) -> int:
    """CRC-32C of a contiguous uint8 array, the GIL released for long ones."""
    if _C_VALUE is not None and flat.nbytes >= RELEASE_GIL_BYTES:
        return _C_VALUE(flat.ctypes.data, flat.nbytes)
    return google_crc32c.value(flat)


def crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """CRC-32C of a bytes-like object, without copying it (a uint8 view of its buffer:
    a copy of a MiB-sized block would cost more than the check, page faults included)."""
    return _value(_uint8(data))


def _uint8(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, np.uint8)


def hex32(value: int) -> str:
    return f"{value:08x}"


def block_rows(row_bytes: int) -> int:
    """Rows per checksum block for rows of `row_bytes` bytes (at least one row)."""
    return max(1, CRC_BLOCK_BYTES // max(row_bytes, 1))


def block_crcs(raw: bytes | memoryview | np.ndarray, row_bytes: int, rows_per_block: int) -> list[int]:
    """CRC-32C of each run of `rows_per_block` rows of `raw` (the last run may be shorter)."""
    step = row_bytes * rows_per_block
    flat = _uint8(raw)
    return [_value(flat[at : at + step]) for at in range(0, len(flat), step)] if step else []


def tensor_checksums(tensors: Mapping[str, np.ndarray]) -> str:
    """The header metadata value: JSON {tensor: [rows per block, concatenated 8-hex CRCs]}."""
    out = {}
    for name, array in tensors.items():
        rows = array.shape[0] if array.ndim else 1
        row_bytes = array.nbytes // max(rows, 1)
        per_block = block_rows(row_bytes)
        out[name] = [per_block, "".join(hex32(c) for c in block_crcs(array, row_bytes, per_block))]
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def parse_checksums(value: str, where: str) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Inverse of tensor_checksums: {tensor: (rows per block, CRCs)}; CorruptPartError if malformed."""
    try:
        raw = json.loads(value)
        out = {}
        for name, (per_block, digits) in raw.items():
            if int(per_block) < 1 or len(digits) % 8:
                raise ValueError(f"tensor {name}: {per_block} rows per block, {len(digits)} hex digits")
            out[name] = (int(per_block), tuple(int(digits[i : i + 8], 16) for i in range(0, len(digits), 8)))
        return out
    except (ValueError, TypeError, AttributeError) as err:
        raise CorruptPartError(f"{where}: bad checksum metadata ({err})") from None


def check_rows(raw: bytes | memoryview, *, where: str, tensor: str, row_bytes: int, rows_per_block: int,
               crcs: tuple[int, ...], lo: int, hi: int) -> None:
    """Check rows [lo, hi) of a tensor (block-aligned, `hi` may be the tensor's end) against `crcs`.

    Raises CorruptPartError naming the part, the tensor, the rows and expected vs actual CRC;
    a short `raw` (the object ended early) is reported as truncation.
    """
    need = (hi - lo) * row_bytes
    if len(raw) != need:
        raise CorruptPartError(
            f"{where}: truncated: tensor {tensor} rows [{lo}, {hi}) need {need} bytes, got {len(raw)}")
    first = lo // rows_per_block
    for i, actual in enumerate(block_crcs(raw, row_bytes, rows_per_block)):
        block = first + i
        expected = crcs[block] if block < len(crcs) else None
        if actual != expected:
            start = block * rows_per_block
            shown = "none" if expected is None else hex32(expected)
            raise CorruptPartError(
                f"{where}: tensor {tensor} rows [{start}, {min(start + rows_per_block, hi)}): "
                f"crc32c expected {shown}, actual {hex32(actual)}")
