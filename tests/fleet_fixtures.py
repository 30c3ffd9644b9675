"""Helpers for fleet tests: a small claimable run, worker processes, a chaos driver, checks.

A fleet test writes a run config, starts `actex extract --claim` workers with LocalFleet,
disturbs them (signals, store faults), and then checks the store against a reference run
computed in-process by one worker.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from engine_fixtures import TINY_HOOKS, committed_tensors, write_jsonl

from actex.engine.prepare import prepare_run
from actex.engine.worker import extract
from actex.engine.work import StaticChunks
from actex.fleet.local import LocalFleet, WorkerProcess, actex_command
from actex.fleet.monitor import run_complete
from actex.store.commits import read_commits
from actex.store.folder import open_store
from actex.store.gc import list_attempts

RUN_NAME = "fleet"


def fleet_dataset(path: Path, rows: int) -> Path:
    """Rows of 41-59 tokens: one packed shape, so a (re)started worker compiles once."""
    return write_jsonl(path, [{"text": f"row {i}: " + " ".join(f"w{(i * j) % 97}" for j in range(18))} for i in range(rows)])


# Worker processes cache every compiled program (JAX's default skips those compiling in
# under a second, which is all of them for a tiny model), so a replacement worker compiles
# nothing; one XLA thread each, as 4 workers share 2 cores.
WORKER_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
}


def fleet_fields(model_dir: Path, dataset: Path, output: str) -> dict:
    """One sample per chunk: many short chunks, so kills land in every phase of a chunk."""
    return {
        "model": str(model_dir),
        "output": output,
        "run_name": RUN_NAME,
        "hooks": list(TINY_HOOKS),
        "dtype": "float32",
        "batch_tokens": 128,
        "chunk_size": 1,
        "data": {"dataset": str(dataset), "format": "text", "max_seq_len": 64, "long_policy": "split"},
    }


def write_config(path: Path, fields: dict) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def worker_argv(config: Path, *extra: str, lease_s: float = 4.0) -> list[str]:
    return [*actex_command(), "extract", "--config", str(config), "--claim", "--lease-seconds", str(lease_s), "--log-json", *extra]


def reference_tensors(fields: dict, output: Path) -> dict:
    """What one uninterrupted worker stores for the same config (run in this process)."""
    run = prepare_run({**fields, "output": str(output)})
    extract(run, StaticChunks(run.plan.num_chunks), worker="reference")
    return committed_tensors(run.config.run_url)


def fleet_case(model_dir: Path, base: Path, chunks: int) -> tuple[dict, dict]:
    """(run fields without `output`, reference tensors) for a run of `chunks` chunks."""
    fields = fleet_fields(model_dir, fleet_dataset(base / "rows.jsonl", chunks), output="unused")
    return fields, reference_tensors(fields, base / "reference")


@dataclass
class Chaos:
    """Sends `signum` to a random busy worker `times` times, spread evenly over the run.

    Signal k goes once the fleet as a whole has logged (k + 1) * chunks / (times + 1)
    commits, not at wall-clock times: on a fast or a loaded machine alike, every signal
    lands while work remains, and the phase of the chunk it hits is left to chance.
    """

    signum: int
    times: int
    chunks: int
    seed: int = 0
    sent: list[tuple[int, int]] = field(default_factory=list)  # (slot, pid)

    def drive(self, fleet: LocalFleet, idle_timeout_s: float) -> None:
        """Run the fleet to completion, signalling as above. It fails once `idle_timeout_s`
        passed without a new commit (start-up included), not after a fixed time: the limit
        follows progress, so a loaded machine where each worker takes 25 s to start passes
        while a stuck fleet fails as fast as on a quiet one."""
        rng = random.Random(self.seed)
        due = [(k + 1) * self.chunks // (self.times + 1) for k in range(self.times)]
        fleet.start()
        progressed, seen = time.monotonic(), 0
        try:
            while not fleet.poll():
                commits = _fleet_commits(fleet)
                if commits > seen:
                    progressed, seen = time.monotonic(), commits
                if time.monotonic() - progressed > idle_timeout_s:
                    raise TimeoutError(f"no commit for {idle_timeout_s:.0f} s ({seen} so far); "
                                       f"sent {len(self.sent)} signals")
                busy = [slot for slot, w in fleet.live.items() if commits_logged(w.log_path)]
                if len(self.sent) < self.times and busy and commits >= due[len(self.sent)]:
                    slot = rng.choice(busy)
                    self.sent.append((slot, fleet.live[slot].process.pid))
                    fleet.signal(slot, self.signum)
                time.sleep(0.02)
        finally:
            fleet.stop()


def commits_logged(log_path: Path | None) -> int:
    """Commit events in one worker's JSON log; > 0 means it is past start-up (its signal
    handlers are in place)."""
    if log_path is None or not log_path.exists():
        return 0
    return log_path.read_bytes().count(b'"event": "commit"')


def _fleet_commits(fleet: LocalFleet) -> int:
    return sum(commits_logged(w.log_path) for w in [*fleet.result.exited, *fleet.live.values()])


@dataclass(frozen=True)
class WorkerLog:
    """What one worker process said it did, from its --log-json lines."""

    pid: int
    owner: str  # its worker / lease owner id ('<host>-<pid>' for --claim workers)
    commits: tuple[tuple[int, str], ...]  # (chunk, attempt) it won
    lost: tuple[tuple[int, str], ...]  # (chunk, attempt) whose commit another worker won first
    takeovers: tuple[tuple[int, str], ...]  # (chunk, previous owner) of expired leases it took


_LOST = re.compile(r"^chunk (\d+) was committed by another worker first; attempt (\S+) is garbage")
_TAKEOVER = re.compile(r"^chunk (\d+): took over the lease of (\S+) \(expired")


def read_worker_log(worker: WorkerProcess) -> WorkerLog:
    owner, commits, lost, takeovers = "", [], [], []
    for line in worker.log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a plain line (the exit line, a traceback)
        if not isinstance(event, dict):
            continue
        message = str(event.get("message", ""))
        if event.get("event") == "start":
            owner = event["worker"]
        elif event.get("event") == "commit":
            commits.append((int(event["chunk"]), str(event["attempt"])))
        elif match := _LOST.match(message):
            lost.append((int(match.group(1)), match.group(2)))
        elif match := _TAKEOVER.match(message):
            takeovers.append((int(match.group(1)), match.group(2)))
    return WorkerLog(worker.process.pid, owner, tuple(commits), tuple(lost), tuple(takeovers))


def owner_pid(owner: str) -> int | None:
    """The pid in a --claim worker's id ('<host>-<pid>')."""
    tail = owner.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def timeline(fleet: LocalFleet) -> str:
    """One line per worker incarnation (start, commits, exit), printed when a test fails."""
    lines = []
    for worker in sorted(fleet.result.exited, key=lambda w: w.incarnation):
        events = []
        for line in worker.log_path.read_text(errors="replace").splitlines() if worker.log_path else []:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        commits = [e["time"] for e in events if e.get("event") == "commit"]
        first = f"{commits[0] % 1000:.1f}..{commits[-1] % 1000:.1f}" if commits else "-"
        start = next((f"{e['time'] % 1000:.1f}" for e in events if e.get("event") == "start"), "-")
        lines.append(
            f"slot {worker.slot} #{worker.incarnation} pid {worker.process.pid}: "
            f"launched {worker.started_at % 1000:.1f} start {start} "
            f"commits {len(commits)} ({first}) exit {worker.returncode} signal {worker.signalled}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class RunCheck:
    chunks: int
    orphans: list[str]  # attempt ids no commit record names
    takeovers: list[tuple[int, str]]  # (chunk, previous owner), from the workers' logs
    lost: int  # commits workers lost to an earlier one (each after its lease was taken over)


def check_run(url: str, storage_options: dict, reference: dict, workers: Sequence[WorkerProcess] = (),
              disabled: set[int] = frozenset()) -> RunCheck:
    """Every chunk committed once, tensors equal the reference, orphans unreferenced.

    With `workers` (every process of the fleet, e.g. `fleet.result.exited` after it
    stopped), exactly-once is also observed from each worker's log (those stopped by
    `fleet.stop()` included): each chunk was won by one commit, whose attempt
    is the stored record's; a commit a worker lost came after its lease was taken over;
    and leases were taken over only from `disabled` workers (pids the test killed or
    paused), as live workers renew theirs. A chunk with no logged win must have been
    committed by a disabled worker that died before it could log.
    """
    store = open_store(url, **storage_options)
    assert run_complete(store)
    records = read_commits(store)
    assert committed_tensors(url, storage_options) == reference
    named = {r.attempt for r in records.values()}
    attempts = list_attempts(store)
    for record in records.values():  # every committed part is there, in the attempt named
        assert all(p.path.startswith(f"chunks/{record.chunk:06d}/{record.attempt}/") for p in record.parts)
    orphans = [a.attempt for a in attempts if a.attempt not in named]
    if not workers:
        return RunCheck(len(records), orphans, [], 0)
    assert all(w.process.poll() is not None for w in workers), "check a fleet after it stopped"
    logs = [read_worker_log(w) for w in workers]
    wins: dict[int, list[str]] = {}
    for log in logs:
        for chunk, attempt in log.commits:
            wins.setdefault(chunk, []).append(attempt)
    assert set(wins) <= set(records), sorted(set(wins) - set(records))
    for chunk, record in records.items():
        won = wins.get(chunk, [])
        assert len(won) <= 1, f"chunk {chunk} won by {len(won)} commits: {won}"
        if won:
            assert won[0] == record.attempt, f"chunk {chunk}: won by {won[0]}, stored record names {record.attempt}"
        else:
            assert attempt_pid(record.attempt) in disabled, f"chunk {chunk}: committed by {record.attempt}, never logged"
    takeovers = [t for log in logs for t in log.takeovers]
    assert all(owner_pid(previous) in disabled for _, previous in takeovers), (takeovers, disabled)
    taken = {(chunk, previous) for chunk, previous in takeovers}
    lost = [(log.owner, chunk) for log in logs for chunk, _ in log.lost]
    assert all((chunk, owner) in taken for owner, chunk in lost), f"lost commits without a lease takeover: {lost}"
    return RunCheck(len(records), orphans, takeovers, len(lost))


def attempt_pid(attempt: str) -> int | None:
    """The pid inside a --claim worker's attempt id ('<stamp>-<host>-<pid>-<random>')."""
    match = re.match(r"^\d{8}T\d{6}Z-.+-(\d+)-[0-9a-f]+$", attempt)
    return int(match.group(1)) if match else None


SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}

# What a worker stopped by SIGTERM exits with, its in-flight chunk finished: 0 from a bare
# `actex extract --claim`; 75 once pre-emption exits 75 everywhere (issue 11).
PREEMPTED_EXITS = (0, 75)


def assert_ended_cleanly(worker: WorkerProcess) -> None:
    """A worker nobody disturbed exited 0; one stopped by `fleet.stop()` finished its chunk
    and exited as pre-empted, or had no signal handler in place: still starting up (nothing
    committed) or already exiting after its work was done."""
    text = worker.log_path.read_text(errors="replace") if worker.log_path else ""
    if worker.signalled is None:
        assert worker.returncode == 0, text[-2000:]
    elif worker.returncode == -signal.SIGTERM:
        assert '"event": "done"' in text or not commits_logged(worker.log_path), text[-2000:]
    else:
        assert worker.returncode in PREEMPTED_EXITS, text[-2000:]
