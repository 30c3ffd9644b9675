"""Run N `actex extract --claim` workers as local processes and restart the ones that die.

The executor knows nothing about chunks: the store does. Workers claim chunks with leases,
so a restarted worker simply joins in again; the executor's only decision is "is the run
complete?", which it reads from the store (every chunk has a commit record). A worker that
exits before then, for any reason (killed, crashed, pre-empted, a failed upload), gets a
replacement, up to `max_restarts` in total; an exit code in `fatal_codes` (a bad flag, a
config mismatch) ends the fleet at once, as a replacement would fail the same way. A slot
whose workers keep dying young (a hub or bucket that is down: exit 1 within seconds) is
restarted after a growing delay (restart_delay), not in a tight loop.

    fleet = LocalFleet(["actex", "extract", "--config", "run.yaml", "--claim"], workers=4,
                       is_complete=lambda: run_complete(open_store(run_url)))
    result = fleet.run()
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


def actex_command() -> list[str]:
    """How to start `actex` from here: the console script next to this interpreter (a venv's
    bin/), else the one on PATH, else the CLI module run by this interpreter."""
    beside = Path(sys.executable).parent / "actex"
    if beside.exists():
        return [str(beside)]
    if found := shutil.which("actex"):
        return [found]
    return [sys.executable, "-c", "from actex.cli import app; app()"]


# A worker that lived this long before exiting was healthy: its slot's next restart is
# immediate. Each younger death in a row doubles the delay, from BACKOFF_S up to BACKOFF_MAX_S.
HEALTHY_S = 60.0
BACKOFF_S = 1.0
BACKOFF_MAX_S = 60.0


def restart_delay(young_deaths: int, base_s: float = BACKOFF_S, max_s: float = BACKOFF_MAX_S) -> float:
    """Seconds to wait before restarting a slot whose last `young_deaths` workers in a row
    died before HEALTHY_S: 0 for the first (a pre-emption, a crash), then base, 2 base, ..."""
    if young_deaths <= 1:
        return 0.0
    return min(max_s, base_s * 2 ** (young_deaths - 2))


class FleetError(RuntimeError):
    """The fleet gave up: a worker's fatal exit (`exit_code` is that code, 2 for a bad
    config), too many worker restarts or a timeout (`exit_code` 1: restartable)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class WorkerProcess:
    """One incarnation of a worker slot."""

    slot: int
    incarnation: int
    process: subprocess.Popen
    log_path: Path | None
    started_at: float = field(default_factory=time.time)
    returncode: int | None = None
    signalled: int | None = None  # the signal this executor (or its driver) sent, if any


@dataclass
class FleetResult:
    exited: list[WorkerProcess] = field(default_factory=list)  # every incarnation, in exit order
    restarts: int = 0
    seconds: float = 0.0


class LocalFleet:
    """`workers` slots, each running `argv` until the run is complete."""

    def __init__(
        self,
        argv: Sequence[str],
        workers: int,
        *,
        is_complete: Callable[[], bool],
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        max_restarts: int = 50,
        fatal_codes: tuple[int, ...] = (2,),
        poll_s: float = 0.5,
        backoff_s: float = BACKOFF_S,
    ) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.argv = list(argv)
        self.workers = workers
        self.is_complete = is_complete
        self.env = {**os.environ, **(env or {})}
        self.log_dir = log_dir
        self.max_restarts = max_restarts
        # Exit codes a replacement would hit again (`actex extract` exits 2 on a bad flag or
        # a config that disagrees with run.json): restarting would only loop.
        self.fatal_codes = fatal_codes
        self.poll_s = poll_s
        self.backoff_s = backoff_s
        self.live: dict[int, WorkerProcess] = {}
        self.young_deaths: dict[int, int] = {}  # slot -> workers in a row that died young
        self.waiting: dict[int, float] = {}  # slot -> time.monotonic() of its delayed restart
        self.result = FleetResult()
        self._incarnations = 0

    def _launch(self, slot: int) -> WorkerProcess:
        self._incarnations += 1
        log_path = None
        out = None  # without a log dir, workers write to this process's stdout/stderr
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"worker-{slot}-{self._incarnations}.log"
            out = open(log_path, "wb")
        try:
            # A session of its own: a Ctrl-C in the terminal reaches the executor only, which
            # then stops the workers itself (instead of each one exiting 0 as if done).
            process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            if out is not None:
                out.close()  # the child holds its own copy of the descriptor
        worker = WorkerProcess(slot, self._incarnations, process, log_path)
        self.live[slot] = worker
        return worker

    def start(self) -> None:
        for slot in range(self.workers):
            self._launch(slot)

    def signal(self, slot: int, signum: int) -> None:
        """Send `signum` to the worker in `slot` (how a chaos driver plays pre-emption)."""
        worker = self.live[slot]
        worker.signalled = signum
        worker.process.send_signal(signum)

    def poll(self) -> bool:
        """Reap exited workers, replace them while work remains. True once the run is complete.

        Workers still alive then have nothing left to commit (any attempt they are writing
        would lose the commit race), so `run` stops them rather than waiting.
        """
        exited = [(slot, w) for slot, w in self.live.items() if w.process.poll() is not None]
        for slot, worker in exited:
            worker.returncode = worker.process.returncode
            self.result.exited.append(worker)
            del self.live[slot]
        if self.is_complete():
            return True
        for slot, worker in exited:
            if worker.returncode in self.fatal_codes:
                raise FleetError(f"worker slot {slot} exited with {worker.returncode} (bad arguments or config); not restarting",
                                 worker.returncode)
            if self.result.restarts >= self.max_restarts:
                raise FleetError(f"gave up after {self.result.restarts} worker restarts (last exit code {worker.returncode})")
            self.result.restarts += 1
            young = time.time() - worker.started_at < HEALTHY_S
            self.young_deaths[slot] = self.young_deaths.get(slot, 0) + 1 if young else 0
            delay = restart_delay(self.young_deaths[slot], self.backoff_s)
            log.warning("worker slot %d exited with %s before the run completed; restarting it%s", slot,
                        worker.returncode, f" in {delay:.0f} s ({self.young_deaths[slot]} young exits in a row)" if delay else "")
            self.waiting[slot] = time.monotonic() + delay
        for slot, due in list(self.waiting.items()):
            if time.monotonic() >= due:
                del self.waiting[slot]
                self._launch(slot)
        return False

    def run(self, timeout_s: float | None = None) -> FleetResult:
        """Start the workers (if not yet) and supervise them until the run is complete."""
        started = time.monotonic()
        if not self.live and not self.result.exited:
            self.start()
        try:
            while not self.poll():
                if timeout_s is not None and time.monotonic() - started > timeout_s:
                    raise FleetError(f"run not complete after {timeout_s:.0f} s")
                time.sleep(self.poll_s)
        finally:
            self.stop()
        self.result.seconds = time.monotonic() - started
        return self.result

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM every live worker (they finish their chunk), SIGKILL what outlives `grace_s`."""
        for worker in self.live.values():
            if worker.process.poll() is None:
                worker.signalled = signal.SIGTERM
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for worker in list(self.live.values()):
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.returncode = worker.process.returncode
            self.result.exited.append(worker)
        self.live.clear()
        self.waiting.clear()
