"""Chaos: 4 `--claim` workers on fake-gcs-server while a driver kills or pre-empts them.

The run must complete with every chunk committed once and tensors byte-equal to one
uninterrupted worker's; SIGKILL leaves only unreferenced attempts behind, SIGTERM loses no
more than the chunk in flight and every pre-empted worker exits 0.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

import pytest
from engine_fixtures import jax_cache, tiny_model_dir  # noqa: F401 (fixtures)
from fleet_fixtures import (
    PREEMPTED_EXITS,
    WORKER_ENV,
    Chaos,
    commits_logged,
    assert_ended_cleanly,
    attempt_pid,
    check_run,
    fleet_case,
    owner_pid,
    read_worker_log,
    timeline,
    worker_argv,
    write_config,
)

from actex.fleet.local import LocalFleet
from actex.fleet.monitor import run_complete
from actex.store import layout
from actex.store.claims import read_lease
from actex.store.commits import is_committed, read_commits
from actex.store.folder import open_store

CHUNKS = 400
WORKERS = 4


@pytest.fixture(scope="module")
def case(tiny_model_dir, tmp_path_factory):  # noqa: F811
    return fleet_case(tiny_model_dir, tmp_path_factory.mktemp("chaos"), CHUNKS)


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_fleet_completes_exactly_once_under_chaos(signame, case, gcs_emulator, gcs_bucket, tmp_path):
    fields, reference = case
    fields = {**fields, "output": gcs_bucket}
    url = f"{gcs_bucket}/{fields['run_name']}"
    store = open_store(url, **gcs_emulator.storage_options)
    fleet = LocalFleet(
        worker_argv(write_config(tmp_path / "run.yaml", fields)),
        WORKERS,
        is_complete=lambda: run_complete(store),
        env={**gcs_emulator.env, **WORKER_ENV},
        log_dir=tmp_path / "logs",
        poll_s=0.1,
    )
    signum = getattr(signal, signame)
    chaos = Chaos(signum, times=6, chunks=CHUNKS, seed=3)
    try:
        chaos.drive(fleet, idle_timeout_s=60)
    finally:
        print(timeline(fleet))

    hit = {pid for _, pid in chaos.sent}
    killed = hit if signum == signal.SIGKILL else set()
    check = check_run(url, gcs_emulator.storage_options, reference, workers=fleet.result.exited, disabled=killed)
    print(
        f"chaos {signame}: {len(chaos.sent)} signals, {fleet.result.restarts} restarts, "
        f"{len(fleet.result.exited)} worker processes, {len(check.orphans)} orphan attempts, "
        f"{len(check.takeovers)} lease takeovers, {check.lost} lost commits, {check.chunks} chunks committed once"
    )
    assert check.chunks == CHUNKS
    assert len(chaos.sent) == chaos.times, f"only {len(chaos.sent)} of {chaos.times} signals landed"
    by_pid = {w.process.pid: w for w in fleet.result.exited}
    if signum == signal.SIGKILL:
        assert all(by_pid[pid].returncode == -signal.SIGKILL for pid in hit)
        # At least one kill hit a chunk in flight: its attempt is an orphan, or its lease
        # had to be taken over (a kill between chunks alone would prove little).
        orphaned = {attempt_pid(a) for a in check.orphans} & hit
        taken_from = {owner_pid(previous) for _, previous in check.takeovers} & hit
        assert orphaned or taken_from, (check.orphans, check.takeovers)
    else:
        for pid in hit:
            worker = by_pid[pid]
            text = worker.log_path.read_text()
            if worker.returncode == -signal.SIGTERM and '"event": "done"' in text:
                continue  # the signal came after its work was done, while it exited
            assert worker.returncode in PREEMPTED_EXITS, text[-2000:]
            assert "stopped by SIGTERM after finishing the in-flight chunk" in text, text[-2000:]
        # No work lost beyond the chunk in flight: at most one orphan per pre-empted worker,
        # and none from a worker that finished normally.
        orphans_by_pid = collections.Counter(attempt_pid(a) for a in check.orphans)
        assert all(orphans_by_pid[pid] <= 1 for pid in hit), orphans_by_pid
        assert set(orphans_by_pid) <= hit, orphans_by_pid
    # Every other worker, those stopped by fleet.stop() once the run was complete included,
    # ended cleanly.
    for worker in fleet.result.exited:
        if worker.process.pid not in hit:
            assert_ended_cleanly(worker)


PAUSE_CHUNKS = 16


@pytest.fixture(scope="module")
def small_case(tiny_model_dir, tmp_path_factory):  # noqa: F811
    return fleet_case(tiny_model_dir, tmp_path_factory.mktemp("pause"), PAUSE_CHUNKS)


def _freeze(process) -> None:
    """SIGSTOP, and wait until the kernel has actually stopped it (kill() returns before)."""
    os.kill(process.pid, signal.SIGSTOP)
    while (state := Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "T":
        assert state not in ("Z", "X"), "the worker exited before it could be frozen"
        time.sleep(0.001)


def _holds_a_lock(pid: int) -> bool:
    """True if the process holds a file lock: the local store's compare-and-swap takes a
    directory flock for a moment, and a worker frozen inside it would freeze the others."""
    return any(line.split()[4] == str(pid) for line in Path("/proc/locks").read_text().splitlines()
               if "->" not in line)


def _parts_written(run_dir: str, chunk: int, owner: str) -> bool:
    """True if `owner` wrote a part of `chunk` (an attempt id holds its worker's name)."""
    folder = Path(run_dir) / layout.CHUNKS_DIR / layout.chunk_name(chunk)
    return any(f"-{owner}-" in part.parent.name for part in folder.glob("*/part-*.safetensors"))


def test_paused_worker_loses_its_chunk_to_the_taker(small_case, tmp_path):
    """A worker frozen mid-chunk (a long GC pause, a partitioned VM) past its lease: another
    takes the chunk over and commits it; the frozen one, resumed, must lose its commit, not
    overwrite the record or count the chunk as its own."""
    fields, reference = small_case
    fields = {**fields, "output": str(tmp_path / "out")}
    url = f"{fields['output']}/{fields['run_name']}"
    store = open_store(url)
    argv = worker_argv(write_config(tmp_path / "run.yaml", fields), lease_s=1.0)
    # One worker first, alone, so the run cannot end before it is frozen; the taker after.
    fleets = [LocalFleet(argv, 1, is_complete=lambda: run_complete(store), env=WORKER_ENV,
                         log_dir=tmp_path / f"logs-{name}", max_restarts=0, poll_s=0.1) for name in ("paused", "taker")]
    fleets[0].start()
    paused = fleets[0].live[0]
    try:
        deadline = time.monotonic() + 60
        # Freeze it while it holds the lease of a chunk not yet committed. The store is a
        # local folder, so once the process is stopped nothing of its can land any more.
        while True:
            assert time.monotonic() < deadline and paused.process.poll() is None, timeline(fleets[0])
            if commits_logged(paused.log_path):
                _freeze(paused.process)
                owner = read_worker_log(paused).owner
                held = [k for k in range(PAUSE_CHUNKS) if (lease := read_lease(store, k)) is not None
                        and lease.owner == owner and lease.expiry > 0 and not is_committed(store, k)]
                # Mid-chunk: parts written, commit not. (It may also hold leases of chunks it
                # has not begun; resumed, it skips those once they are committed.)
                begun = [k for k in held if _parts_written(url, k, owner)]
                if begun and not _holds_a_lock(paused.process.pid):
                    break
                os.kill(paused.process.pid, signal.SIGCONT)
            time.sleep(0.005)
        # The taker takes them over once the leases expire (1 s + 5 s of clock skew).
        fleets[1].start()
        deadline = time.monotonic() + 90
        while not all(is_committed(store, k) for k in held):
            assert time.monotonic() < deadline, timeline(fleets[1])
            time.sleep(0.05)
        os.kill(paused.process.pid, signal.SIGCONT)
        while len(read_worker_log(paused).lost) < len(begun) and paused.process.poll() is None:
            assert time.monotonic() < deadline, timeline(fleets[0])
            time.sleep(0.05)
        for fleet in fleets:
            fleet.run(timeout_s=60)
    finally:
        if paused.process.poll() is None:
            os.kill(paused.process.pid, signal.SIGCONT)
        for fleet in fleets:
            fleet.stop()
            print(timeline(fleet))

    workers = [w for fleet in fleets for w in fleet.result.exited]
    check = check_run(url, {}, reference, workers=workers, disabled={paused.process.pid})
    assert check.chunks == PAUSE_CHUNKS
    log = read_worker_log(paused)
    lost = sorted(chunk for chunk, _ in log.lost)
    assert set(begun) <= set(lost) <= set(held), (begun, lost, held)
    assert {chunk for chunk, previous in check.takeovers if previous == owner} == set(held)
    records = read_commits(store)
    assert all(records[k].worker != owner for k in held)
    assert {attempt for _, attempt in log.lost} <= set(check.orphans)
    for worker in workers:
        assert_ended_cleanly(worker)
