"""A run's live progress, read from the store alone: commits/, claims/ and workers/.

Nothing here talks to a worker. Whoever can read the bucket can see how far a fleet got,
which chunks are leased to whom, and which workers stopped beating. Silence is judged by
the heartbeat's age: a worker's heartbeat thread writes it every HEARTBEAT_EVERY_S
whatever its chunks take (engine/liveness.py), so an old one means a dead or frozen process.
A worker that ran on the machine reading the progress is also checked by its pid.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass

from actex.engine.liveness import HEARTBEAT_EVERY_S
from actex.store import layout
from actex.store.claims import read_lease
from actex.store.commits import committed_chunks, read_heartbeats
from actex.store.folder import Store
from actex.store.manifest import read_manifest

# A worker whose last heartbeat is older than this is reported as silent (likely dead):
# six missed beats, so a slow store write of the heartbeat itself is not enough.
DEFAULT_SILENT_AFTER_S = 6 * HEARTBEAT_EVERY_S
# A heartbeat this old is a worker that is gone, whatever its last state said: the monitor's
# dashboard leaves it out of what it shows as live (each process writes its own, so a long
# run with restarts keeps many; they stay in the store, for `actex status`).
PRUNE_AFTER_S = 3600.0


# C0 and C1 control characters (escape sequences start with one) and bidirectional overrides.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(value: object) -> str:
    """`value` as text fit for a terminal: what workers write (heartbeat states, lease owners)
    reaches `actex status` and the dashboard, and an escape sequence in it must not."""
    return _UNPRINTABLE.sub("?", str(value))


@dataclass(frozen=True)
class WorkerView:
    worker: str
    state: str  # the worker's own word: running, finished, stopped
    chunks_done: int
    tokens_per_s: float
    age_s: float  # seconds since its last heartbeat
    silent: bool  # 'running' but no heartbeat for too long: probably killed
    gone: bool = False  # 'running', on this host, and its process no longer exists: dead for sure


@dataclass(frozen=True)
class Progress:
    total: int  # chunks in the plan
    committed: int
    leased: dict[int, str]  # uncommitted chunk -> owner of its live lease
    workers: tuple[WorkerView, ...]

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.committed == self.total


def process_gone(beat: dict, host: str) -> bool:
    """True when the heartbeat's worker ran on `host` (this machine) and its pid is gone.

    A worker SIGKILLed or OOM-killed leaves its last beat saying "running"; on its own
    machine that is known at once instead of after `silent_after_s`. (A pid reused by
    another process reads as alive: the silence check still catches that worker.)"""
    pid = beat.get("pid")
    if beat.get("host") != host or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def prune_beats(beats: dict[str, dict], *, now: float, host: str,
                prune_after_s: float = PRUNE_AFTER_S) -> tuple[dict[str, dict], tuple[str, ...]]:
    """Split heartbeats (worker id -> beat) into those of workers that may be alive and the
    sorted ids of those that are not: a "running" beat of this host whose pid is gone
    (`process_gone`), or any beat older than `prune_after_s` seconds."""
    gone = sorted(worker for worker, beat in beats.items()
                  if now - float(beat.get("updated_at", 0.0)) > prune_after_s
                  or (beat.get("state") == "running" and process_gone(beat, host)))
    left_out = set(gone)
    return {w: b for w, b in beats.items() if w not in left_out}, tuple(gone)


def read_progress(store: Store, *, silent_after_s: float = DEFAULT_SILENT_AFTER_S, now: float | None = None,
                  host: str | None = None, beats: dict[str, dict] | None = None) -> Progress:
    """Progress of the run at `store`; FileNotFoundError if no worker created run.json yet.

    host: the machine this runs on (default socket.gethostname()): its workers' processes
    are checked directly (WorkerView.gone). beats: the heartbeats, if the caller read them
    already (else read here)."""
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    total = read_manifest(store).plan.num_chunks
    committed = committed_chunks(store)
    leased = {}
    for path in store.list(layout.CLAIMS_DIR):
        chunk = layout.chunk_of_record(path)
        if chunk is None or chunk in committed:
            continue
        lease = read_lease(store, chunk)
        if lease is not None and lease.expiry > now:
            leased[chunk] = lease.owner
    workers = []
    for name, beat in sorted((read_heartbeats(store) if beats is None else beats).items()):
        age = now - float(beat.get("updated_at", 0.0))
        state = str(beat.get("state", "unknown"))
        workers.append(
            WorkerView(
                worker=name,
                state=state,
                chunks_done=int(beat.get("chunks_done", 0)),
                tokens_per_s=float(beat.get("tokens_per_s", 0.0)),
                age_s=age,
                silent=state == "running" and age > silent_after_s,
                gone=state == "running" and process_gone(beat, host),
            )
        )
    return Progress(total, len(committed), leased, tuple(workers))


def run_complete(store: Store) -> bool:
    """True once every chunk of the plan has its commit record (False before run.json exists)."""
    try:
        total = read_manifest(store).plan.num_chunks
    except FileNotFoundError:
        return False
    return len(committed_chunks(store)) == total
