"""Chaos: 4 `--claim` workers on fake-gcs-server while a driver kills or pre-empts them.

The run must complete with every chunk committed once and tensors byte-equal to one
uninterrupted worker's; SIGKILL leaves only unreferenced attempts behind, SIGTERM loses no
more than the chunk in flight and every pre-empted worker exits 0.
"""

from __future__ import annotations

import collections
import signal

import pytest
from engine_fixtures import jax_cache, tiny_model_dir  # noqa: F401 (fixtures)
from fleet_fixtures import (
    WORKER_ENV,
    Chaos,
    attempt_pid,
    check_run,
    fleet_case,
    timeline,
    worker_argv,
    write_config,
)

from actex.fleet.local import LocalFleet
from actex.fleet.monitor import run_complete
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
    chaos = Chaos(signum, every_s=1.5, times=6, seed=3)
    try:
        chaos.drive(fleet, timeout_s=85)
    finally:
        print(timeline(fleet))

    check = check_run(url, gcs_emulator.storage_options, reference)
    print(
        f"chaos {signame}: {len(chaos.sent)} signals, {fleet.result.restarts} restarts, "
        f"{len(fleet.result.exited)} worker processes, {len(check.orphans)} orphan attempts, "
        f"{check.chunks} chunks committed once"
    )
    assert check.chunks == CHUNKS
    assert len(chaos.sent) >= 3, f"only {len(chaos.sent)} signals landed before the run completed"
    hit = {pid for _, pid in chaos.sent}
    by_pid = {w.process.pid: w for w in fleet.result.exited}
    if signum == signal.SIGKILL:
        assert all(by_pid[pid].returncode == -signal.SIGKILL for pid in hit)
    else:
        for pid in hit:
            worker = by_pid[pid]
            text = worker.log_path.read_text()
            if worker.returncode == -signal.SIGTERM and '"event": "done"' in text:
                continue  # the signal came after its work was done, while it exited
            # 75: stopped with chunks left; 0: the run was complete by the time it stopped.
            assert worker.returncode in (75, 0), text[-2000:]
            assert "stopped by SIGTERM after finishing the in-flight chunk" in text, text[-2000:]
        # No work lost beyond the chunk in flight: at most one orphan per pre-empted worker,
        # and none from a worker that finished normally.
        orphans_by_pid = collections.Counter(attempt_pid(a) for a in check.orphans)
        assert all(orphans_by_pid[pid] <= 1 for pid in hit), orphans_by_pid
        assert set(orphans_by_pid) <= hit, orphans_by_pid
    # Workers left alone (neither hit nor stopped once the run was complete) ended cleanly.
    assert all(w.returncode == 0 for w in fleet.result.exited if w.signalled is None)
