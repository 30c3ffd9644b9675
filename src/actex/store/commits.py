"""Commit records and worker heartbeats.

A chunk is done iff `commits/<chunk>.json` exists. The engine writes every part and
samples.jsonl of an attempt first, and creates the record last, with a conditional create:
so a record never points at missing data, a chunk is committed at most once however many
workers raced on it, and the loser's attempt is unreferenced garbage for `actex gc`.

    commits/000042.json = {
      "chunk": 42, "attempt": "20250101T120000Z-w3-9f2c1a0b",
      "parts": [{"path": "chunks/000042/<attempt>/part-00000.safetensors",
                 "bytes": 123456, "sha256": "...", "header_bytes": 2504, "header_crc32c": "93d37d6b"}],
      "samples_path": "chunks/000042/<attempt>/samples.jsonl",
      "stats_path": "chunks/000042/<attempt>/stats.safetensors", "stats_crc32c": "0c1d2e3f",
      "samples": 64, "tokens": 581234, "token_slots": 589824, "worker": "w3",
      "timings": {...}, "committed_at": 1735732800.0, "format_version": 2}

A record stays a few hundred bytes per part whatever the hooks and widths: statistics
live in their own object (v2). Format v1 records carried them inline under "stats" and
no header fields; both versions are read.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from actex.store import layout
from actex.store.folder import Store
from actex.store.integrity import CorruptPartError, crc32c, hex32
from actex.store.records import (MAX_COMMIT_BYTES, MAX_CONTROL_BYTES, Record, parse_record,  # noqa: F401 (MAX_CONTROL_BYTES: claims and tests read it here)
                                 record_bytes)

log = logging.getLogger(__name__)


class PartRecord(Record):
    path: str       # relative to the run root
    bytes: int
    sha256: str     # of the whole file: a contract with other tools
    header_bytes: int | None = None    # v2: 8 + header length (one ranged read gets the header)
    header_crc32c: str | None = None   # v2: CRC-32C of those bytes, 8 hex digits

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude=set() if self.header_bytes is not None else {"header_bytes", "header_crc32c"})


class CommitRecord(Record):
    chunk: int
    attempt: str
    parts: tuple[PartRecord, ...]
    samples: int
    tokens: int
    worker: str = ""
    timings: dict[str, float] = {}     # seconds per phase, engine's names
    stats_path: str | None = None      # v2: the chunk's stats object (stats.encode_stats)
    stats_crc32c: str | None = None    # v2: its CRC-32C, 8 hex digits
    stats: dict[str, Any] = {}         # v1 only: {hook: HookStats.to_json()}
    committed_at: float = Field(default_factory=time.time)
    format_version: int = layout.FORMAT_VERSION
    token_slots: int = 0  # packed-batch slots computed for the chunk, padding included (0: not recorded)
    # {hook: values not finite as stored}, only hooks that had any (absent: none), so that
    # `inspect` and `verify` see an overflow anywhere in the run from the records alone.
    overflow: dict[str, int] = {}
    # CRC-32C of samples.jsonl, 8 hex digits (absent in records written before it was kept:
    # their samples.jsonl is read unchecked, as it was). See check_samples.
    samples_crc32c: str | None = None

    @property
    def useful_fraction(self) -> float | None:
        """Stored tokens / computed slots (1.0: no padding); None for records without slots."""
        return self.tokens / self.token_slots if self.token_slots else None

    @property
    def samples_path(self) -> str:
        return layout.samples_path(self.chunk, self.attempt)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored: optional fields only when set (the bytes of older actex)."""
        d = self.model_dump(exclude={"parts"}) | {"parts": [p.to_dict() for p in self.parts], "samples_path": self.samples_path}
        absent = [key for key in ("stats", "overflow") if not d[key]]
        absent += ["stats_path", "stats_crc32c"] if self.stats_path is None else []
        absent += ["samples_crc32c"] if self.samples_crc32c is None else []
        return {k: v for k, v in d.items() if k not in absent}

    def to_json(self) -> bytes:
        return record_bytes(self.to_dict()) + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> CommitRecord:
        """A stored record; ValueError naming `where` if over MAX_COMMIT_BYTES or not one."""
        record = parse_record(cls, data, where, "commit record", MAX_COMMIT_BYTES)
        unstated = {key: value for key, value in _UNSTATED.items() if key not in record.model_fields_set}
        return record.model_copy(update=unstated) if unstated else record


# What a stored record without these fields means (format v1 wrote neither at first); a
# record made here gets the current format and time instead.
_UNSTATED = {"format_version": 1, "committed_at": 0.0}


def check_samples(record: CommitRecord, data: bytes, where: str) -> bytes:
    """`data` (the chunk's samples.jsonl) if its CRC-32C is the one the commit record holds
    (or the record holds none: written before it was kept). Raises CorruptPartError naming
    `where` otherwise: an edited samples.jsonl would pair activations with wrong identities."""
    if record.samples_crc32c is not None:
        actual = hex32(crc32c(data))
        if actual != record.samples_crc32c:
            raise CorruptPartError(f"{where}: crc32c expected {record.samples_crc32c}, actual {actual} "
                                   "(samples.jsonl changed since its chunk was committed)")
    return data


def useful_token_fraction(records) -> float | None:
    """Stored tokens / computed slots over the records that have slots (None if none has)."""
    counted = [r for r in records if r.token_slots]
    slots = sum(r.token_slots for r in counted)
    return sum(r.tokens for r in counted) / slots if slots else None


def commit(store: Store, record: CommitRecord) -> bool:
    """Create the commit record: True if this attempt is now the chunk's, False if another won.

    Call only after every part and samples.jsonl of the attempt is written: the record's
    existence is the commit, readers trust it without checking the data.
    """
    return store.create_exclusive(layout.commit_path(record.chunk), record.to_json())


def is_committed(store: Store, chunk: int) -> bool:
    """Whether `chunk` has a commit record (one request; `committed_chunks` for many)."""
    return store.exists(layout.commit_path(chunk))


def committed_chunks(store: Store) -> set[int]:
    """Ids of committed chunks, from one listing of commits/ (not one request per chunk)."""
    found = (layout.chunk_of_record(path) for path in store.list(layout.COMMITS_DIR))
    return {chunk for chunk in found if chunk is not None}


def read_commit(store: Store, chunk: int) -> CommitRecord:
    return read_commits(store, [chunk])[chunk]


def read_commits(store: Store, chunks: Sequence[int] | None = None, *, skip_bad: bool = False) -> dict[int, CommitRecord]:
    """All commit records (or those of `chunks`), by chunk id. A record that is not one
    (over MAX_COMMIT_BYTES, malformed, another chunk's) raises ValueError naming it; with
    `skip_bad` (monitoring: `actex status`) it is left out with a warning instead."""
    wanted = sorted(committed_chunks(store) if chunks is None else chunks)
    raw = store.read_many([layout.commit_path(chunk) for chunk in wanted])
    records = {}
    for chunk in wanted:
        try:
            records[chunk] = _record_of(chunk, raw[layout.commit_path(chunk)], store.url_of(layout.commit_path(chunk)))
        except ValueError as error:
            if not skip_bad:
                raise
            log.warning("%s: skipped", error)
    return records


def _record_of(chunk: int, data: bytes, where: str) -> CommitRecord:
    record = CommitRecord.from_json(data, where)
    if record.chunk != chunk:
        raise ValueError(f"{where}: record says chunk {record.chunk}")
    return record


# ----------------------------------------------------------------------------- heartbeat


class Heartbeat:
    """A worker's counters, written to workers/<worker>.json (by the engine's heartbeat
    thread every HEARTBEAT_EVERY_S, and at start, commit and exit).

    Monitoring only (nothing decides correctness from it), so a failed write is logged by
    the caller and the worker goes on. Overwrites are atomic per backend (see folder.py).
    Writes are serialised, and a final state (`abandoned` or `stalled`: the process is about
    to exit from another thread) is never overwritten by a later beat, so the last word stands.
    """

    FINAL_STATES = frozenset({"abandoned", "stalled"})
    COUNTERS = ("chunks_done", "batches", "samples", "tokens", "bytes", "token_slots")

    def __init__(self, store: Store, worker: str, *, interval_s: float = 10.0, info: Mapping[str, Any] | None = None):
        self.store = store
        self.worker = layout.check_name("worker", worker)
        self.interval_s = interval_s
        self.info = dict(info or {})
        self.started_at = time.time()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.state = "running"
        self._last_write = float("-inf")
        self._writing = threading.Lock()
        self._counting = threading.Lock()

    def add(self, **counts: int) -> None:
        """Add to the counters (chunks_done, batches, samples, tokens, bytes, token_slots); any thread."""
        with self._counting:
            for key, value in counts.items():
                self.counters[key] += value

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        elapsed = max(now - self.started_at, 1e-9)
        return {
            "worker": self.worker,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "state": self.state,
            "started_at": self.started_at,
            "updated_at": now,
            **dict(self.counters),
            "tokens_per_s": self.counters["tokens"] / elapsed,
            "bytes_per_s": self.counters["bytes"] / elapsed,
            # Real tokens / computed slots of the chunks committed so far (padding waste).
            "useful_fraction": self.counters["tokens"] / self.counters["token_slots"] if self.counters["token_slots"] else None,
            **self.info,
        }

    def beat(self, *, state: str | None = None, force: bool = False) -> bool:
        """Write the heartbeat if `interval_s` passed (or `force`); True if it wrote."""
        with self._writing:
            if self.state in self.FINAL_STATES:
                return False
            if state is not None:
                self.state = state
            now = time.monotonic()
            if not force and now - self._last_write < self.interval_s:
                return False
            record = HeartbeatRecord.model_validate(self.snapshot())
            self.store.write_bytes(layout.worker_path(self.worker), record_bytes(record.to_dict()) + b"\n")
            self._last_write = now
            return True


class HeartbeatRecord(Record):
    """workers/<worker>.json as stored. Every field is optional on read (a reader gets back
    only what the worker wrote, `to_dict`); fields a worker adds (`info`) are kept."""

    model_config = ConfigDict(frozen=True, extra="allow")

    worker: str = ""
    host: str = ""
    pid: int = 0
    state: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0
    chunks_done: int = 0
    batches: int = 0
    samples: int = 0
    tokens: int = 0
    bytes: int = 0
    token_slots: int = 0
    tokens_per_s: float = 0.0
    bytes_per_s: float = 0.0
    useful_fraction: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _numbers(cls, fields: Any) -> Any:
        # Named in one reason (`chunks_done not a number`) rather than pydantic's per-field text.
        if isinstance(fields, dict):
            bad = [key for key in _BEAT_NUMBERS if key in fields and not _is_number(fields[key])]
            if bad:
                raise ValueError(f"{', '.join(bad)} not a number")
        return fields

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


_BEAT_NUMBERS = ("started_at", "updated_at", "tokens_per_s", *Heartbeat.COUNTERS)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_heartbeat(data: bytes, where: str) -> dict[str, Any]:
    """A heartbeat's fields (those the worker wrote); ValueError naming `where` unless it is
    a HeartbeatRecord of at most MAX_CONTROL_BYTES (workers write these objects, and a
    monitor reading them must not be stopped by a bad one)."""
    return parse_record(HeartbeatRecord, data, where, "heartbeat", MAX_CONTROL_BYTES).to_dict()


def read_heartbeats(store: Store) -> dict[str, dict[str, Any]]:
    """Every worker's last heartbeat, by worker id (for monitors and `actex inspect`), read in
    one batched call. A heartbeat that is not one (see parse_heartbeat) is skipped with a
    warning naming it."""
    ids = {path: path[len(layout.WORKERS_DIR) + 1 : -len(".json")] for path in store.list(layout.WORKERS_DIR) if path.endswith(".json")}
    # An id no worker could have written (check_name) may carry terminal escapes: named by repr.
    for path in [p for p, worker in ids.items() if not layout.SAFE_NAME.fullmatch(worker)]:
        log.warning("%r: not a worker id: skipped", ids.pop(path))
    out = {}
    for path, data in sorted(store.read_many(list(ids)).items()):
        try:
            out[ids[path]] = parse_heartbeat(data, store.url_of(path))
        except ValueError as error:
            log.warning("%s: skipped", error)
    return out
