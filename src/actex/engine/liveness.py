"""Liveness: a worker proves it is alive by beating, and proves it is useful by progressing.

Two daemon threads per worker, so that neither a slow store nor a hung XLA call can hide:

* the heartbeat writer writes the worker's heartbeat, `workers/<id>.json` (store/commits.py
  Heartbeat), every `HEARTBEAT_EVERY_S` with the progress counters, whatever the main
  thread is doing; `actex status` calls a worker
  silent from the age of that file alone (a healthy worker's is never older than a beat,
  however long its chunks take);
* the stall watchdog notes when the pipeline last progressed (a batch reached the host, a
  part was written, a chunk committed). Once nothing progressed for `stall_timeout_s`,
  `progressing()` turns False, which stops lease renewal in `--claim` mode, and the
  watchdog ends the process with exit code 1, so a fleet restarts it while another worker
  takes the chunk over when its lease runs out. Only a worker with a chunk in flight can
  stall: one waiting for work (every chunk left is leased to others) is idle, not stuck.

(The third thing once called a heartbeat, the `--claim` lease renewer, is store/claims.py's.)

Why exit rather than raise: the stuck call (an upload that never returns, a device that
never answers) sits on another thread and cannot be interrupted from Python; the chunk is
safe to abandon because it exists only once its commit record does.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from actex.store import layout
from actex.store.commits import Heartbeat

log = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 10.0
DEFAULT_STALL_TIMEOUT_S = 1200.0  # first compiles of a big model take minutes; a stuck upload forever
EXIT_STALLED = 1


def live_twin(heartbeat: Heartbeat, *, beat_every_s: float = HEARTBEAT_EVERY_S) -> str | None:
    """A warning when another process is running as this worker: its heartbeat (the same
    workers/<id>.json) was written by another host or pid, says "running" and is younger
    than three beats. Two static workers with one --worker-index compute every chunk twice
    (each chunk is committed once, the other attempt thrown away); nothing stops them, so
    say what to do instead. None when there is no such heartbeat (or it cannot be read)."""
    try:
        other = json.loads(heartbeat.store.read_bytes(layout.worker_path(heartbeat.worker)))
        who, age = (other["host"], other["pid"]), time.time() - float(other["updated_at"])
        running = other["state"] == "running"
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no heartbeat yet, or one a monitor would skip too
    if who == (socket.gethostname(), os.getpid()) or not running or age > 3 * beat_every_s:
        return None
    if who[0] == socket.gethostname() and not _alive(who[1]):
        return None  # a worker of this machine that died (and was restarted as this one)
    return (f"another process runs as worker {heartbeat.worker} (host {who[0]!r}, pid {who[1]!r}, heartbeat "
            f"{max(age, 0):.0f} s ago): two workers with one index compute every chunk twice. Give each worker its "
            "own --worker-index with --num-workers N, or start them all with --claim to share the chunks")


def write_heartbeat(heartbeat: Heartbeat, *, state: str | None = None, force: bool = False) -> None:
    """`heartbeat.beat(...)`, a failed write logged: monitoring only, a run never fails over it."""
    try:
        heartbeat.beat(state=state, force=force)
    except OSError as error:
        log.warning("heartbeat %s not written: %s", heartbeat.worker, error)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's process, or a pid we cannot judge: assume it lives
    return True


class Liveness:
    """Progress clock, heartbeat writer and stall watchdog of one worker.

    `progressed()` is called by the pipeline at every step forward (any thread);
    `took(chunk)` / `done(chunk)` bracket each chunk's time in flight (outside of them the
    clock does not run). `start()` launches both threads; `close()` stops them (the final heartbeat is the
    caller's). `exit` is os._exit in production (the watchdog runs off the main thread,
    where SystemExit would end only that thread); tests pass a recorder.
    """

    def __init__(
        self,
        heartbeat: Heartbeat,
        *,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        beat_every_s: float = HEARTBEAT_EVERY_S,
        on_stall: Callable[[], None] | None = None,
        exit: Callable[[int], None] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stall_timeout_s <= 0:
            raise ValueError(f"--stall-timeout must be > 0 seconds, got {stall_timeout_s}")
        self.heartbeat = heartbeat
        self.stall_timeout_s = stall_timeout_s
        self.beat_every_s = beat_every_s
        self.on_stall = on_stall
        self._exit = exit
        self._clock = clock
        self._last_progress = clock()
        self._in_flight: set[int] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stalled = False

    # -- progress ------------------------------------------------------------------------

    def progressed(self, **counters: int) -> None:
        """The pipeline moved forward; `counters` are added to the heartbeat's."""
        self._last_progress = self._clock()
        if counters:
            self.heartbeat.add(**counters)

    def took(self, chunk: int) -> None:
        """The worker started on `chunk` (the clock runs while any chunk is in flight)."""
        with self._lock:
            if not self._in_flight:
                self._last_progress = self._clock()
            self._in_flight.add(chunk)

    def done(self, chunk: int) -> None:
        """`chunk` is no longer in flight here (committed, lost, skipped or given up)."""
        with self._lock:
            self._in_flight.discard(chunk)
        self._last_progress = self._clock()

    def idle_s(self) -> float:
        """Seconds since the pipeline last moved forward, while a chunk is in flight (else 0)."""
        with self._lock:
            if not self._in_flight:
                return 0.0
        return self._clock() - self._last_progress

    def progressing(self) -> bool:
        """False once nothing progressed for the stall timeout: leases are no longer renewed."""
        return not self.stalled and self.idle_s() < self.stall_timeout_s

    # -- threads -------------------------------------------------------------------------

    def start(self) -> "Liveness":
        for name, target in (("heartbeat-writer", self._write_loop), ("stall-watchdog", self._watch_loop)):
            thread = threading.Thread(target=target, name=f"actex-{name}-{self.heartbeat.worker}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        self._closed.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                # A heartbeat write hung in a dead store must not hold the exit up.
                thread.join(timeout=self.beat_every_s)

    def _write_loop(self) -> None:
        warned = False
        while not self._closed.wait(self.beat_every_s):
            # Another process wrote our heartbeat since our last beat: a twin started
            # with the same worker id (possibly at the same moment as this one).
            twin = None if warned else live_twin(self.heartbeat, beat_every_s=self.beat_every_s)
            if twin is not None:
                log.warning(twin)
                warned = True
            write_heartbeat(self.heartbeat, force=True)

    def _watch_loop(self) -> None:
        # Check often enough to act within a few percent of the timeout, at most every 5 s.
        period = min(5.0, self.stall_timeout_s / 20)
        while not self._closed.wait(period):
            if self.idle_s() >= self.stall_timeout_s:
                self._stall()
                return

    def _stall(self) -> None:
        self.stalled = True
        message = (
            f"actex: error: no progress for {self.idle_s():.0f} s (--stall-timeout {self.stall_timeout_s:.0f} s): "
            "a store or device call is stuck; leases no longer renewed, exiting 1 so the worker is restarted"
        )
        log.error(message)
        print(message, flush=True)
        # The last word, written on a helper thread: the store may be what hangs.
        final = threading.Thread(target=write_heartbeat, args=(self.heartbeat,), kwargs={"state": "stalled", "force": True},
                                 daemon=True)
        final.start()
        final.join(timeout=min(5.0, self.beat_every_s))
        if self.on_stall is not None:
            try:
                self.on_stall()
            except Exception as error:  # exiting anyway; say why the hook failed
                log.error("while giving up after a stall: %s", error)
        self._exit(EXIT_STALLED)
