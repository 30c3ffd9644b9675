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
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from engine_fixtures import TINY_HOOKS, committed_tensors, write_jsonl

from actex.engine.extract import extract, open_run
from actex.engine.work import StaticChunks
from actex.fleet.local import LocalFleet, actex_command
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
    run = open_run({**fields, "output": str(output)})
    extract(run, StaticChunks(run.plan.num_chunks), worker="reference")
    return committed_tensors(run.config.run_url)


def fleet_case(model_dir: Path, base: Path, chunks: int) -> tuple[dict, dict]:
    """(run fields without `output`, reference tensors) for a run of `chunks` chunks."""
    fields = fleet_fields(model_dir, fleet_dataset(base / "rows.jsonl", chunks), output="unused")
    return fields, reference_tensors(fields, base / "reference")


@dataclass
class Chaos:
    """Sends `signum` to a random busy worker every `every_s` (jittered), `times` times."""

    signum: int
    every_s: float
    times: int
    seed: int = 0
    sent: list[tuple[int, int]] = field(default_factory=list)  # (slot, pid)

    def drive(self, fleet: LocalFleet, timeout_s: float) -> None:
        rng = random.Random(self.seed)
        fleet.start()
        started = time.monotonic()
        # The first signal goes as soon as a worker is busy: a small run on a warm compile
        # cache can finish within one period, and a chaos test that sent nothing proves nothing.
        next_at = started
        try:
            while not fleet.poll():
                now = time.monotonic()
                if now - started > timeout_s:
                    raise TimeoutError(f"run not complete after {timeout_s:.0f} s; sent {len(self.sent)} signals")
                busy = [slot for slot, w in fleet.live.items() if _has_committed(w.log_path)]
                if len(self.sent) < self.times and now >= next_at and busy:
                    slot = rng.choice(busy)
                    self.sent.append((slot, fleet.live[slot].process.pid))
                    fleet.signal(slot, self.signum)
                    next_at = now + self.every_s * rng.uniform(0.5, 1.5)
                time.sleep(0.02)
        finally:
            fleet.stop()


def _has_committed(log_path: Path | None) -> bool:
    """The worker is past start-up: it committed a chunk (its signal handlers are in place)."""
    return log_path is not None and log_path.exists() and b'"event": "commit"' in log_path.read_bytes()


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


def check_run(url: str, storage_options: dict, reference: dict) -> RunCheck:
    """Every chunk committed once, tensors equal the reference, orphans unreferenced."""
    store = open_store(url, **storage_options)
    assert run_complete(store)
    records = read_commits(store)
    assert committed_tensors(url, storage_options) == reference
    named = {r.attempt for r in records.values()}
    attempts = list_attempts(store)
    for record in records.values():  # every committed part is there, in the attempt named
        assert all(p.path.startswith(f"chunks/{record.chunk:06d}/{record.attempt}/") for p in record.parts)
    orphans = [a.attempt for a in attempts if a.attempt not in named]
    return RunCheck(len(records), orphans)


def attempt_pid(attempt: str) -> int | None:
    """The pid inside a --claim worker's attempt id ('<stamp>-<host>-<pid>-<random>')."""
    match = re.match(r"^\d{8}T\d{6}Z-.+-(\d+)-[0-9a-f]+$", attempt)
    return int(match.group(1)) if match else None


SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}
