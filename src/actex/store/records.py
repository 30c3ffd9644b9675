"""The store's JSON records (run.json, commit records, claims, heartbeats) as frozen models.

Every record is a frozen pydantic model. It is read with `parse_record`, which bounds the
bytes before parsing: workers, and anyone who can write the bucket, write these objects,
so a reader treats them as untrusted input (an oversized or malformed record is a
ValueError naming the object and the reason; nothing in a record is ever executed).

It is written with `record_bytes`: `json.dumps(..., sort_keys=True)` of the model's fields,
the exact bytes actex wrote before the records were models (tests/golden/ holds them), so
runs written before and after read the same and field order never depends on the code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

# Caps per record kind, in bytes: each is far above what actex writes, far below what
# would hurt a monitor or worker that reads thousands of them.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024   # run.json: config, hooks, up to 1,000 skipped rows (~0.3 MB)
MAX_COMMIT_BYTES = 16 * 1024 * 1024    # a v2 record is a few KB; v1 carried per-hook stats inline
MAX_CONTROL_BYTES = 64 * 1024          # a claim or heartbeat is well under 1 KB

R = TypeVar("R", bound="Record")


class Record(BaseModel):
    """A frozen record; fields may also be given by position, in declaration order (as the
    dataclasses these records were)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    # With an __init__ of its own, pydantic validates stored bytes through it too (as
    # keywords), which drops any validation context: so no record validator relies on one.
    def __init__(self, *args: Any, **fields: Any) -> None:
        names = list(type(self).model_fields)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional fields, got {len(args)}")
        super().__init__(**dict(zip(names, args)), **fields)


def parse_record(cls: type[R], data: bytes, where: str, kind: str, max_bytes: int) -> R:
    """`data` as a `cls`. Raises ValueError naming `where` when it is over `max_bytes`
    (checked before parsing) or not a valid `kind` (first failing field and why)."""
    if len(data) > max_bytes:
        raise ValueError(f"{where}: {len(data):,} bytes, over the {max_bytes:,} of a {kind}")
    try:
        return cls.model_validate_json(data)
    except ValidationError as error:
        raise ValueError(f"{where}: {validation_reason(error, kind)}") from None


def validation_reason(error: ValidationError, kind: str) -> str:
    """Why a record is not a `kind`, in one line: 'not JSON (...)', a record validator's own
    reason, or 'not a <kind> (field.path: why)' for the first failing field."""
    first = error.errors(include_url=False)[0]
    why = reason(first)
    if first["type"] == "json_invalid":
        return f"not JSON ({why})"
    if not first["loc"]:  # a whole-record check (model validator) says what is wrong itself
        return why
    field = ".".join(str(part) for part in first["loc"])
    if not why.startswith(field):  # a field validator's message may name its field already
        why = f"{field}: {why}"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"not a {kind} ({why}{more})"


def record_bytes(fields: Mapping[str, Any], *, indent: int | None = None) -> bytes:
    """The bytes of a record: sorted keys (stable whatever the code's field order)."""
    return json.dumps(fields, indent=indent, sort_keys=True).encode()


def differing_fields(ours: Any, theirs: Any, prefix: str = "", *, whole_lists: bool = False) -> list[tuple[str, Any, Any]]:
    """(dotted path, ours, theirs) for every leaf where two JSON values differ; nested
    objects by key (sorted), lists of equal length by index (as a whole with
    `whole_lists`: a list-valued setting), anything else as a whole."""
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        out = []
        for key in sorted(set(ours) | set(theirs), key=str):
            out += differing_fields(ours.get(key), theirs.get(key), f"{prefix}{key}.", whole_lists=whole_lists)
        return out
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs) and not whole_lists:
        out = []
        for i, (a, b) in enumerate(zip(ours, theirs)):
            out += differing_fields(a, b, f"{prefix}{i}.")
        return out
    return [] if ours == theirs else [(prefix.rstrip("."), ours, theirs)]


def reason(problem: Mapping[str, Any]) -> str:
    """One pydantic problem's message without pydantic's "Value error, " / "Assertion
    failed, " label: the reason our validators gave, as they gave it (config fields and
    stored records alike)."""
    return str(problem["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
