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

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from actex.store import layout
from actex.store.folder import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartRecord:
    path: str       # relative to the run root
    bytes: int
    sha256: str     # of the whole file: a contract with other tools
    header_bytes: int | None = None    # v2: 8 + header length (one ranged read gets the header)
    header_crc32c: str | None = None   # v2: CRC-32C of those bytes, 8 hex digits

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}
        if self.header_bytes is not None:
            d |= {"header_bytes": self.header_bytes, "header_crc32c": self.header_crc32c}
        return d

    @classmethod
    def from_dict(cls, p: Mapping[str, Any]) -> PartRecord:
        header = p.get("header_bytes")
        return cls(str(p["path"]), int(p["bytes"]), str(p["sha256"]),
                   None if header is None else int(header), None if header is None else str(p["header_crc32c"]))


@dataclass(frozen=True)
class CommitRecord:
    chunk: int
    attempt: str
    parts: tuple[PartRecord, ...]
    samples: int
    tokens: int
    worker: str
    timings: dict[str, float] = field(default_factory=dict)   # seconds per phase, engine's names
    stats_path: str | None = None      # v2: the chunk's stats object (stats.encode_stats)
    stats_crc32c: str | None = None    # v2: its CRC-32C, 8 hex digits
    stats: dict[str, Any] = field(default_factory=dict)       # v1 only: {hook: HookStats.to_json()}
    committed_at: float = field(default_factory=time.time)
    format_version: int = layout.FORMAT_VERSION
    token_slots: int = 0  # packed-batch slots computed for the chunk, padding included (0: not recorded)
    # {hook: values not finite as stored}, only hooks that had any (absent: none), so that
    # `inspect` and `verify` see an overflow anywhere in the run from the records alone.
    overflow: dict[str, int] = field(default_factory=dict)

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
        d = {
            "chunk": self.chunk,
            "attempt": self.attempt,
            "parts": [p.to_dict() for p in self.parts],
            "samples_path": self.samples_path,
            "samples": self.samples,
            "tokens": self.tokens,
            "worker": self.worker,
            "timings": self.timings,
            "committed_at": self.committed_at,
            "format_version": self.format_version,
            "token_slots": self.token_slots,
        }
        if self.stats_path is not None:
            d |= {"stats_path": self.stats_path, "stats_crc32c": self.stats_crc32c}
        if self.stats:
            d["stats"] = self.stats
        if self.overflow:
            d["overflow"] = self.overflow
        return d

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> CommitRecord:
        try:
            d = json.loads(data)
            return cls(
                chunk=int(d["chunk"]),
                attempt=str(d["attempt"]),
                parts=tuple(PartRecord.from_dict(p) for p in d["parts"]),
                samples=int(d["samples"]),
                tokens=int(d["tokens"]),
                worker=str(d.get("worker", "")),
                timings=dict(d.get("timings", {})),
                stats_path=None if d.get("stats_path") is None else str(d["stats_path"]),
                stats_crc32c=None if d.get("stats_crc32c") is None else str(d["stats_crc32c"]),
                stats=dict(d.get("stats", {})),
                committed_at=float(d.get("committed_at", 0.0)),
                format_version=int(d.get("format_version", 1)),
                token_slots=int(d.get("token_slots", 0)),
                overflow={str(k): int(v) for k, v in d.get("overflow", {}).items()},
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: not a commit record ({type(exc).__name__}: {exc})") from None


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
    return store.exists(layout.commit_path(chunk))


def committed_chunks(store: Store) -> set[int]:
    """Ids of committed chunks, from one listing of commits/ (not one request per chunk)."""
    found = (layout.chunk_of_record(path) for path in store.list(layout.COMMITS_DIR))
    return {chunk for chunk in found if chunk is not None}


def read_commit(store: Store, chunk: int) -> CommitRecord:
    return read_commits(store, [chunk])[chunk]


def read_commits(store: Store, chunks: Sequence[int] | None = None) -> dict[int, CommitRecord]:
    """All commit records (or those of `chunks`), by chunk id."""
    wanted = sorted(committed_chunks(store) if chunks is None else chunks)
    raw = store.read_many([layout.commit_path(chunk) for chunk in wanted])
    records = {}
    for chunk in wanted:
        path = layout.commit_path(chunk)
        record = CommitRecord.from_json(raw[path], store.url_of(path))
        if record.chunk != chunk:
            raise ValueError(f"{store.url_of(path)}: record says chunk {record.chunk}")
        records[chunk] = record
    return records


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
            self.store.write_bytes(layout.worker_path(self.worker), (json.dumps(self.snapshot(), sort_keys=True) + "\n").encode())
            self._last_write = now
            return True


# A heartbeat or claim is well under 1 KB: anything past this is not one (and is not parsed).
MAX_CONTROL_BYTES = 64 * 1024
_BEAT_NUMBERS = ("started_at", "updated_at", "tokens_per_s", *Heartbeat.COUNTERS)


def parse_heartbeat(data: bytes, where: str) -> dict[str, Any]:
    """A heartbeat's fields; ValueError naming `where` unless it is a JSON object of at most
    MAX_CONTROL_BYTES whose times and counters are numbers (workers write these objects, and
    a monitor reading them must not be stopped by a bad one)."""
    if len(data) > MAX_CONTROL_BYTES:
        raise ValueError(f"{where}: {len(data):,} bytes, over the {MAX_CONTROL_BYTES:,} of a heartbeat")
    try:
        beat = json.loads(data)
    except ValueError as error:
        raise ValueError(f"{where}: not JSON ({error})") from None
    if not isinstance(beat, dict):
        raise ValueError(f"{where}: not a JSON object")
    bad = [key for key in _BEAT_NUMBERS if key in beat and (isinstance(beat[key], bool) or not isinstance(beat[key], (int, float)))]
    if bad:
        raise ValueError(f"{where}: {', '.join(bad)} not a number")
    return beat


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
