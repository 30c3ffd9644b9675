"""Parts: the safetensors files that hold a chunk's activations.

One part holds whole samples, concatenated along the token axis:

    <hook name>      [tokens, width]   bfloat16 | float16 | float32   one tensor per hook
                                       | int8, with <hook>/scale and <hook>/block_exp (store/quantize.py)
    token_ids        [tokens]          int32
    positions        [tokens]          int32    position of each token within its sample
    sample_offsets   [samples + 1]     int64    sample i is rows offsets[i]:offsets[i+1]
    sample_ids       [samples]         int64    ids in the run's deterministic enumeration
    __metadata__     {"format_version", "chunk", "attempt", "part", "crc32c"}  (strings)

Any safetensors reader opens a part; `read_header` gives the byte range of each tensor so a
reader fetches only the hook it wants (one ranged GET), and (format v2) the CRC-32C of each
block of its rows, so those bytes are checked too (store/integrity.py). `read_header`
refuses a header that cannot describe the part (a length past its end, offsets outside
it, sizes that disagree with shapes) with one CorruptPartError line naming the part.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from actex.store import integrity, quantize
from actex.store.dtypes import ACTIVATION_DTYPES, activation_dtype
from actex.store.integrity import CorruptPartError
from actex.store.layout import FORMAT_VERSION

# safetensors' dtype codes for every tensor we write.
_FROM_SAFETENSORS: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "I8": np.dtype(np.int8),  # int8 codes
    "U8": np.dtype(np.uint8),  # their packed block exponents
}
INDEX_TENSORS = ("token_ids", "positions", "sample_offsets", "sample_ids")

# Room kept in a part for the safetensors header (JSON with one entry per tensor) when
# planning splits against the shard size. Checksums take 8 hex digits per MiB of data
# (plus one block per tensor), so the allowance covers parts of tens of GB.
HEADER_ALLOWANCE = 64 * 1024
# safetensors' own limit on a header: a length field above it is corruption, not a part.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class Part:
    """A decoded part. Arrays are views of one buffer; copy before mutating."""

    hooks: dict[str, np.ndarray]   # name -> [tokens, width]
    token_ids: np.ndarray          # [tokens] int32
    positions: np.ndarray          # [tokens] int32
    sample_offsets: np.ndarray     # [samples + 1] int64
    sample_ids: np.ndarray         # [samples] int64
    metadata: dict[str, str]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.sample_ids.shape[0])

    def sample(self, i: int) -> slice:
        """Rows of sample i (its position within this part, not its id)."""
        return slice(int(self.sample_offsets[i]), int(self.sample_offsets[i + 1]))


@dataclass(frozen=True)
class EncodedPart:
    data: bytes
    sha256: str           # of the whole file (commit record; a contract with other tools)
    tokens: int
    samples: int
    header_bytes: int     # 8 + header length: one ranged read fetches the whole header
    header_crc32c: str    # 8 hex digits of CRC-32C over data[:header_bytes]


def encode_part(
    hooks: Mapping[str, np.ndarray],
    token_ids: np.ndarray,
    positions: np.ndarray,
    sample_offsets: np.ndarray,
    sample_ids: np.ndarray,
    *,
    chunk: int,
    attempt: str,
    part: int,
) -> EncodedPart:
    """Check shapes and serialise with safetensors, checksums of every tensor in the header.

    The sha256, header length and header CRC go into the commit record.
    """
    tokens = int(np.shape(token_ids)[0])
    samples = int(np.shape(sample_ids)[0])
    offsets = np.asarray(sample_offsets, dtype=np.int64)
    if offsets.shape != (samples + 1,) or offsets[0] != 0 or offsets[-1] != tokens or np.any(np.diff(offsets) < 0):
        raise ValueError(
            f"chunk {chunk} part {part}: sample_offsets must rise from 0 to {tokens} over "
            f"{samples + 1} entries, got shape {offsets.shape} ending at {offsets[-1] if offsets.size else None}"
        )
    if np.shape(positions) != (tokens,):
        raise ValueError(f"chunk {chunk} part {part}: positions shape {np.shape(positions)}, expected ({tokens},)")
    tensors: dict[str, np.ndarray] = {}
    for name, array in hooks.items():
        if name in INDEX_TENSORS:
            raise ValueError(f"hook name {name!r} collides with an index tensor")
        _check_hook_tensor(name, array, tokens, hooks, f"chunk {chunk} part {part}")
        tensors[name] = np.ascontiguousarray(array)
    tensors["token_ids"] = np.ascontiguousarray(token_ids, dtype=np.int32)
    tensors["positions"] = np.ascontiguousarray(positions, dtype=np.int32)
    tensors["sample_offsets"] = offsets
    tensors["sample_ids"] = np.ascontiguousarray(sample_ids, dtype=np.int64)
    metadata = {
        "format_version": str(FORMAT_VERSION), "chunk": str(chunk), "attempt": attempt, "part": str(part),
        integrity.METADATA_KEY: integrity.tensor_checksums(tensors),
    }
    data = safetensors.numpy.save(tensors, metadata=metadata)
    header = header_length(data)
    return EncodedPart(
        data=data, sha256=hashlib.sha256(data).hexdigest(), tokens=tokens, samples=samples,
        header_bytes=header, header_crc32c=integrity.hex32(integrity.crc32c(memoryview(data)[:header])),
    )


def _check_hook_tensor(name: str, array: np.ndarray, tokens: int, hooks: Mapping[str, np.ndarray], where: str) -> None:
    """A hook's [tokens, width] values, or an int8 hook's codes with both companions, or a companion."""
    if quantize.is_companion(name):
        if array.shape[:1] != (tokens,) or name.rsplit("/", 1)[0] not in hooks:
            raise ValueError(f"{where}: {name} shape {array.shape} without its hook, expected ({tokens}, ...)")
        return
    if array.ndim != 2 or array.shape[0] != tokens:
        raise ValueError(f"{where}: hook {name} shape {array.shape}, expected ({tokens}, width)")
    if array.dtype == np.int8:
        expected = quantize.stored_tensors(name, array.shape[1], quantize.INT8)
        for other, (shape, dtype) in expected.items():
            got = hooks.get(other)
            if got is None or got.shape != (tokens, *shape) or got.dtype != dtype:
                raise ValueError(f"{where}: int8 hook {name} needs {other} {(tokens, *shape)} {dtype}")
    elif array.dtype not in ACTIVATION_DTYPES.values():
        raise ValueError(f"hook {name}: dtype {array.dtype} is not one of {sorted([*ACTIVATION_DTYPES, quantize.INT8])}")


def _to_numpy(dtype: str, shape: Sequence[int], raw) -> np.ndarray:
    try:
        np_dtype = _FROM_SAFETENSORS[dtype]
    except KeyError:
        raise ValueError(f"unexpected safetensors dtype {dtype!r} in a part") from None
    return np.frombuffer(raw, dtype=np_dtype).reshape(shape)


def decode_part(data: bytes, where: str = "part") -> Part:
    """Parse a whole part; every tensor is checked against its header checksums (format v2).

    Raises CorruptPartError (one line naming `where` and the tensor) on any mismatch.
    """
    header = read_header(data, where=where, size=len(data))
    view = memoryview(data)  # slices without copies; the arrays are views of `data`
    arrays = {name: info.read(view[info.start : info.stop], where, name) for name, info in header.tensors.items()}
    missing = [name for name in INDEX_TENSORS if name not in arrays]
    if missing:
        raise CorruptPartError(f"{where}: not an actex part: missing tensors {missing}")
    return Part(
        hooks={name: a for name, a in arrays.items() if name not in INDEX_TENSORS},
        token_ids=arrays["token_ids"],
        positions=arrays["positions"],
        sample_offsets=arrays["sample_offsets"],
        sample_ids=arrays["sample_ids"],
        metadata={k: v for k, v in header.metadata.items() if k != integrity.METADATA_KEY},
    )


# ----------------------------------------------------------------------------- header


@dataclass(frozen=True)
class TensorInfo:
    dtype: str               # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int               # absolute byte offsets in the file
    stop: int
    crc_rows: int = 0        # rows per checksum block; 0: no checksums (format v1)
    crcs: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return (self.stop - self.start) // max(self.rows, 1)

    def to_numpy(self, raw: bytes) -> np.ndarray:
        """Array from exactly the bytes [start, stop) of the file (unchecked)."""
        return _to_numpy(self.dtype, self.shape, raw)

    def covering(self, lo: int, hi: int) -> tuple[int, int]:
        """Rows [lo, hi) widened to whole checksum blocks (unchanged without checksums)."""
        if not self.crc_rows or lo >= hi:
            return lo, hi
        return lo - lo % self.crc_rows, min(self.rows, -(-hi // self.crc_rows) * self.crc_rows)

    def check(self, raw: bytes | memoryview, where: str, name: str, lo: int, hi: int) -> None:
        """Check rows [lo, hi) (from `covering`) against the checksums; always checks the length."""
        if self.crc_rows:
            integrity.check_rows(raw, where=where, tensor=name, row_bytes=self.row_bytes,
                                 rows_per_block=self.crc_rows, crcs=self.crcs, lo=lo, hi=hi)
        elif len(raw) != (hi - lo) * self.row_bytes:
            raise CorruptPartError(f"{where}: truncated: tensor {name} rows [{lo}, {hi}) need "
                                   f"{(hi - lo) * self.row_bytes} bytes, got {len(raw)}")

    def read(self, raw: bytes | memoryview, where: str, name: str) -> np.ndarray:
        """The whole tensor from its bytes, checked."""
        self.check(raw, where, name, 0, self.rows)
        return self.to_numpy(raw)


@dataclass(frozen=True)
class PartHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int           # 8 + header length


def header_length(prefix: bytes, where: str = "part", size: int | None = None) -> int:
    """Total bytes of the header (length field included) from the file's first 8 bytes.

    CorruptPartError when the length cannot be right: past `size` (the part's byte count,
    when known) or above safetensors' own limit, as a flipped or garbage length field is.
    """
    if len(prefix) < 8:
        raise CorruptPartError(f"{where}: truncated: {len(prefix)} bytes, a part starts with an 8-byte header length")
    length = 8 + struct.unpack("<Q", prefix[:8])[0]
    if length - 8 > MAX_HEADER_BYTES or (size is not None and length > size):
        raise CorruptPartError(f"{where}: header length {length - 8} is impossible for a part of "
                               f"{'unknown size' if size is None else f'{size} bytes'}")
    return length


def read_header(data: bytes, where: str = "part", size: int | None = None) -> PartHeader:
    """Parse the safetensors header at the start of `data` (which may be just the header).

    `size`: the part's total bytes, when known, so offsets past its end are caught here.
    Every tensor's byte count must match its dtype and shape. CorruptPartError otherwise.
    """
    start = header_length(data, where, size)
    if len(data) < start:
        raise CorruptPartError(f"{where}: truncated header: need {start} bytes, have {len(data)}")
    try:
        raw = json.loads(bytes(data[8:start]))
        metadata = raw.pop("__metadata__", None) or {}
        tensors = {
            name: TensorInfo(str(t["dtype"]), tuple(int(n) for n in t["shape"]),
                             start + int(t["data_offsets"][0]), start + int(t["data_offsets"][1]))
            for name, t in raw.items()
        }
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise CorruptPartError(f"{where}: not a safetensors header ({type(err).__name__}: {err})") from None
    checksums = integrity.parse_checksums(metadata[integrity.METADATA_KEY], where) if integrity.METADATA_KEY in metadata else {}
    for name, info in tensors.items():
        if info.dtype not in _FROM_SAFETENSORS:
            raise CorruptPartError(f"{where}: tensor {name}: unexpected dtype {info.dtype!r}")
        nbytes = math.prod(info.shape) * _FROM_SAFETENSORS[info.dtype].itemsize
        if info.stop - info.start != nbytes or info.start < start or (size is not None and info.stop > size):
            raise CorruptPartError(f"{where}: tensor {name}: bytes [{info.start}, {info.stop}) do not fit shape "
                                   f"{list(info.shape)} {info.dtype} in a part of {size if size is not None else '?'} bytes")
        if checksums:
            if name not in checksums:
                raise CorruptPartError(f"{where}: tensor {name} has no checksum")
            per_block, crcs = checksums[name]
            if len(crcs) != -(-info.rows // per_block) and nbytes:
                raise CorruptPartError(f"{where}: tensor {name}: {len(crcs)} checksums for {info.rows} rows")
            tensors[name] = TensorInfo(info.dtype, info.shape, info.start, info.stop, per_block, crcs)
    return PartHeader(tensors=tensors, metadata=metadata, data_start=start)


def missing_rows(tensors: Mapping[str, TensorInfo], length: int) -> str | None:
    """What a part cut short at `length` bytes lacks: "tensor X rows [r, n)" for the first
    tensor (in file order) that ends past the cut, plus how many tensors after it are gone;
    None when every tensor ends before `length`."""
    cut = sorted((info.start, name) for name, info in tensors.items() if info.stop > length)
    if not cut:
        return None
    name = cut[0][1]
    info = tensors[name]
    row = max(0, length - info.start) // max(info.row_bytes, 1)
    after = f" and {len(cut) - 1} tensor(s) after it" if len(cut) > 1 else ""
    return f"tensor {name} rows [{row}, {info.rows}){after}"


# ----------------------------------------------------------------------------- splitting


def part_bytes(sample_tokens: Sequence[int], token_bytes: int) -> int:
    """Upper bound on the size of a part holding these samples (header allowance included)."""
    return HEADER_ALLOWANCE + sum(sample_tokens) * token_bytes + 16 * (len(sample_tokens) + 1)


def token_bytes(hook_widths: Sequence[int], dtype: str) -> int:
    """Stored bytes per token: every hook's row (int8: with its scale and exponents) plus
    token_ids and positions (int32 each)."""
    if dtype == quantize.INT8:
        return sum(quantize.token_bytes(w) for w in hook_widths) + 8
    return sum(hook_widths) * activation_dtype(dtype).itemsize + 8


def split_samples(sample_tokens: Sequence[int], token_bytes: int, shard_size: int) -> list[range]:
    """Cut samples (in order) into runs whose parts stay <= shard_size bytes.

    A sample is never split; one sample larger than the shard size gets a part of its
    own. Every chunk has at least one part, even with no samples, so a commit always
    names its data.
    """
    parts: list[range] = []
    start, size = 0, part_bytes([], token_bytes)
    for i, n in enumerate(sample_tokens):
        grow = n * token_bytes + 16
        if i > start and size + grow > shard_size:
            parts.append(range(start, i))
            start, size = i, part_bytes([], token_bytes)
        size += grow
    parts.append(range(start, len(sample_tokens)))
    return parts


def encode_samples_jsonl(records: Sequence[Mapping]) -> bytes:
    """samples.jsonl: one JSON object per sample, keys sorted so equal runs give equal bytes."""
    return b"".join(json.dumps(dict(r), sort_keys=True, separators=(",", ":")).encode() + b"\n" for r in records)


def decode_samples_jsonl(data: bytes, where: str = "samples.jsonl") -> list[dict]:
    records = []
    for line_no, line in enumerate(data.decode().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}:{line_no}: bad JSON ({exc.msg})") from None
    return records
