"""Where everything lives in a run folder (store format v2). Paths only; no I/O.

    run.json                                         manifest (manifest.py)
    chunks/<chunk>/<attempt>/part-<k>.safetensors    activations (shards.py)
    chunks/<chunk>/<attempt>/samples.jsonl           per-sample metadata
    chunks/<chunk>/<attempt>/stats.safetensors       per-hook statistics of the chunk (v2; stats.py)
    commits/<chunk>.json                             commit record; its existence IS the commit
    claims/<chunk>.json                              lease for dynamic claiming
    workers/<worker>.json                            heartbeat
    plan/index.npz                                   the plan's row index (data/plan.py)

Chunk ids are zero-padded to 6 digits so listings sort numerically. Attempt ids are
unique per write attempt (UTC time + worker + random), so a retried or duplicated chunk
never writes over another attempt's files.
"""

from __future__ import annotations

import re
import secrets
import time
from calendar import timegm

# v2: per-tensor checksums in part headers, header length + CRC in commit records, and
# statistics in their own object instead of the commit record. v1 runs stay readable.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
CHUNK_DIGITS = 6

MANIFEST = "run.json"
CHUNKS_DIR = "chunks"
COMMITS_DIR = "commits"
CLAIMS_DIR = "claims"
WORKERS_DIR = "workers"
PLAN_INDEX = "plan/index.npz"
ATTEMPT_STAMP = "%Y%m%dT%H%M%SZ"  # UTC start time leading every attempt id

# Worker, attempt and run ids: path segments that no shell or terminal reads as anything else.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # whole names: fullmatch ($ would pass a final newline)
_RECORD = re.compile(r"^(?:.*/)?(\d{%d,})\.json$" % CHUNK_DIGITS)


def check_name(kind: str, name: str) -> str:
    """Worker and attempt ids become path segments: letters, digits, '.', '_', '-' only."""
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(f"bad {kind} id {name!r}: use 1-128 of [A-Za-z0-9._-], not starting with '.', '_' or '-'")
    return name


def chunk_name(chunk: int) -> str:
    if chunk < 0:
        raise ValueError(f"chunk id must be >= 0, got {chunk}")
    return f"{chunk:0{CHUNK_DIGITS}d}"


def new_attempt_id(worker: str) -> str:
    """e.g. '20250101T120000Z-w3-9f2c1a0b': sorts by start time, unique without coordination."""
    stamp = time.strftime(ATTEMPT_STAMP, time.gmtime())
    return f"{stamp}-{check_name('worker', worker)}-{secrets.token_hex(4)}"


def attempt_started(attempt: str) -> float | None:
    """Unix time of an attempt id's start stamp, or None when it has none."""
    try:
        return float(timegm(time.strptime(attempt.split("-", 1)[0], ATTEMPT_STAMP)))
    except ValueError:
        return None


def attempt_dir(chunk: int, attempt: str) -> str:
    return f"{CHUNKS_DIR}/{chunk_name(chunk)}/{check_name('attempt', attempt)}"


def part_path(chunk: int, attempt: str, part: int) -> str:
    return f"{attempt_dir(chunk, attempt)}/part-{part:05d}.safetensors"


def samples_path(chunk: int, attempt: str) -> str:
    return f"{attempt_dir(chunk, attempt)}/samples.jsonl"


def stats_path(chunk: int, attempt: str) -> str:
    return f"{attempt_dir(chunk, attempt)}/stats.safetensors"


def commit_path(chunk: int) -> str:
    return f"{COMMITS_DIR}/{chunk_name(chunk)}.json"


def claim_path(chunk: int) -> str:
    return f"{CLAIMS_DIR}/{chunk_name(chunk)}.json"


def worker_path(worker: str) -> str:
    return f"{WORKERS_DIR}/{check_name('worker', worker)}.json"


def chunk_of_record(path: str) -> int | None:
    """The chunk id of a `commits/` or `claims/` record path, or None for any other name."""
    match = _RECORD.match(path)
    return int(match.group(1)) if match else None
