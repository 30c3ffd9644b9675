"""Parts: the safetensors files that hold a chunk's activations.

One part holds whole samples, concatenated along the token axis:

    <hook name>      [tokens, width]   bfloat16 | float16 | float32   one tensor per hook
    token_ids        [tokens]          int32
    positions        [tokens]          int32    position of each token within its sample
    sample_offsets   [samples + 1]     int64    sample i is rows offsets[i]:offsets[i+1]
    sample_ids       [samples]         int64    ids in the run's deterministic enumeration
    __metadata__     {"format_version", "chunk", "attempt", "part"}  (strings)

Any safetensors reader opens a part; `read_header` + `tensor_range` give the byte range of
one tensor so a reader fetches only the hook it wants (one ranged GET).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from actex.store.layout import FORMAT_VERSION

# Stored activation dtypes by name, and safetensors' dtype codes for every tensor we write.
ACTIVATION_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
_FROM_SAFETENSORS: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
}
INDEX_TENSORS = ("token_ids", "positions", "sample_offsets", "sample_ids")

# Room kept in a part for the safetensors header (JSON with one entry per tensor) when
# planning splits against the shard size.
HEADER_ALLOWANCE = 64 * 1024


def activation_dtype(name: str) -> np.dtype:
    try:
        return ACTIVATION_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown activation dtype {name!r}; expected one of {sorted(ACTIVATION_DTYPES)}") from None


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
    sha256: str
    tokens: int
    samples: int


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
    """Check shapes and serialise with safetensors; the sha256 goes into the commit record."""
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
        if array.ndim != 2 or array.shape[0] != tokens:
            raise ValueError(f"chunk {chunk} part {part}: hook {name} shape {array.shape}, expected ({tokens}, width)")
        if array.dtype not in ACTIVATION_DTYPES.values():
            raise ValueError(f"hook {name}: dtype {array.dtype} is not one of {sorted(ACTIVATION_DTYPES)}")
        tensors[name] = np.ascontiguousarray(array)
    tensors["token_ids"] = np.ascontiguousarray(token_ids, dtype=np.int32)
    tensors["positions"] = np.ascontiguousarray(positions, dtype=np.int32)
    tensors["sample_offsets"] = offsets
    tensors["sample_ids"] = np.ascontiguousarray(sample_ids, dtype=np.int64)
    metadata = {"format_version": str(FORMAT_VERSION), "chunk": str(chunk), "attempt": attempt, "part": str(part)}
    data = safetensors.numpy.save(tensors, metadata=metadata)
    return EncodedPart(data=data, sha256=hashlib.sha256(data).hexdigest(), tokens=tokens, samples=samples)


def _to_numpy(dtype: str, shape: Sequence[int], raw) -> np.ndarray:
    try:
        np_dtype = _FROM_SAFETENSORS[dtype]
    except KeyError:
        raise ValueError(f"unexpected safetensors dtype {dtype!r} in a part") from None
    return np.frombuffer(raw, dtype=np_dtype).reshape(shape)


def decode_part(data: bytes) -> Part:
    """Parse a whole part (tensors via safetensors, metadata from its header)."""
    header = read_header(data)
    arrays = {name: _to_numpy(t["dtype"], t["shape"], t["data"]) for name, t in safetensors.deserialize(data)}
    missing = [name for name in INDEX_TENSORS if name not in arrays]
    if missing:
        raise ValueError(f"not an actex part: missing tensors {missing}")
    return Part(
        hooks={name: a for name, a in arrays.items() if name not in INDEX_TENSORS},
        token_ids=arrays["token_ids"],
        positions=arrays["positions"],
        sample_offsets=arrays["sample_offsets"],
        sample_ids=arrays["sample_ids"],
        metadata=header.metadata,
    )


# ----------------------------------------------------------------------------- header


@dataclass(frozen=True)
class TensorInfo:
    dtype: str               # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int               # absolute byte offsets in the file
    stop: int

    def to_numpy(self, raw: bytes) -> np.ndarray:
        """Array from exactly the bytes [start, stop) of the file."""
        return _to_numpy(self.dtype, self.shape, raw)


@dataclass(frozen=True)
class PartHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int           # 8 + header length


def header_length(prefix: bytes) -> int:
    """Total bytes of the header (length field included) from the file's first 8 bytes."""
    if len(prefix) < 8:
        raise ValueError("a safetensors file starts with an 8-byte header length")
    return 8 + struct.unpack("<Q", prefix[:8])[0]


def read_header(data: bytes) -> PartHeader:
    """Parse the safetensors header at the start of `data` (which may be just the header)."""
    start = header_length(data)
    if len(data) < start:
        raise ValueError(f"truncated safetensors header: need {start} bytes, have {len(data)}")
    raw = json.loads(data[8:start])
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {
        name: TensorInfo(t["dtype"], tuple(t["shape"]), start + t["data_offsets"][0], start + t["data_offsets"][1])
        for name, t in raw.items()
    }
    return PartHeader(tensors=tensors, metadata=metadata, data_start=start)


# ----------------------------------------------------------------------------- splitting


def part_bytes(sample_tokens: Sequence[int], token_bytes: int) -> int:
    """Upper bound on the size of a part holding these samples (header allowance included)."""
    return HEADER_ALLOWANCE + sum(sample_tokens) * token_bytes + 16 * (len(sample_tokens) + 1)


def token_bytes(hook_widths: Sequence[int], dtype: str) -> int:
    """Stored bytes per token: every hook's row plus token_ids and positions (int32 each)."""
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
