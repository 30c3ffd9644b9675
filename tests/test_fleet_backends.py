"""`--claim` fleets on local disk and on s3:// (moto), and a worker with a different config.

The gs:// fleet is exercised hardest in test_fleet_chaos.py; here each backend gets a
smaller fleet with one worker killed mid-run, then the run is compared to one clean worker.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys

import pytest
from engine_fixtures import jax_cache, tiny_model_dir  # noqa: F401 (fixtures)
from fleet_fixtures import (
    WORKER_ENV,
    Chaos,
    assert_ended_cleanly,
    check_run,
    fleet_case,
    timeline,
    worker_argv,
    write_config,
)

from actex.fleet.local import FleetError, LocalFleet, actex_command, restart_delay
from actex.fleet.monitor import run_complete
from actex.store.commits import read_commits
from actex.store.folder import open_store

CHUNKS = 48


@pytest.fixture(scope="module")
def case(tiny_model_dir, tmp_path_factory):  # noqa: F811
    return fleet_case(tiny_model_dir, tmp_path_factory.mktemp("backends"), CHUNKS)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_claim_fleet_with_a_killed_worker(backend, case, tmp_path, request):
    fields, reference = case
    if backend == "s3":
        emulator = request.getfixturevalue("s3_emulator")
        output, options, env = request.getfixturevalue("s3_bucket"), emulator.storage_options, emulator.env
    else:
        output, options, env = str(tmp_path / "out"), {}, {}
    fields = {**fields, "output": output}
    url = f"{output}/{fields['run_name']}"
    config = write_config(tmp_path / "run.yaml", fields)
    fleet = LocalFleet(
        worker_argv(config),
        2,
        is_complete=lambda: run_complete(open_store(url, **options)),
        env={**env, **WORKER_ENV},
        log_dir=tmp_path / "logs",
        poll_s=0.1,
    )
    chaos = Chaos(signal.SIGKILL, times=1, chunks=CHUNKS, seed=1)
    try:
        chaos.drive(fleet, idle_timeout_s=60)
    finally:
        print(timeline(fleet))
    assert len(chaos.sent) == 1
    killed = {pid for _, pid in chaos.sent}
    check = check_run(url, options, reference, workers=fleet.result.exited, disabled=killed)
    assert check.chunks == CHUNKS
    for worker in fleet.result.exited:
        if worker.process.pid not in killed:
            assert_ended_cleanly(worker)
    print(f"{backend}: 1 kill, {fleet.result.restarts} restarts, {len(check.orphans)} orphan attempts")

    # A worker that joins with a different stored dtype refuses before touching anything.
    changed = write_config(tmp_path / "changed.yaml", {**fields, "dtype": "bfloat16"})
    before = sorted(open_store(url, **options).list())
    refused = subprocess.run(worker_argv(changed), env={**fleet.env}, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr[-2000:]
    # Workers log with --log-json: stderr is JSON lines only, the error one record among them.
    records = [json.loads(line) for line in refused.stderr.splitlines()]
    errors = [r["message"] for r in records if r["level"] == "error"]
    assert len(errors) == 1 and "dtype" in errors[0] and "bfloat16" in errors[0], refused.stderr[-2000:]
    assert sorted(open_store(url, **options).list()) == before


def test_fleet_and_status_commands(case, tmp_path):
    """`actex fleet` runs claim workers to completion; `actex status` reads progress back."""
    fields, reference = case
    fields = {**fields, "output": str(tmp_path / "out")}
    url = f"{fields['output']}/{fields['run_name']}"
    config = write_config(tmp_path / "run.yaml", fields)
    env = {**os.environ, **WORKER_ENV}
    fleet = subprocess.run(
        [*actex_command(), "fleet", "--workers", "2", "--log-dir", str(tmp_path / "logs"), "--", "--config", str(config), "--lease-seconds", "4"],
        env=env, capture_output=True, text=True, timeout=80,
    )
    assert fleet.returncode == 0 and "run complete" in fleet.stdout, fleet.stderr[-2000:]
    assert check_run(url, {}, reference).chunks == CHUNKS
    status = subprocess.run([*actex_command(), "status", url, "--json"], env=env, capture_output=True, text=True, timeout=60)
    progress = json.loads(status.stdout)
    assert progress["complete"] and progress["committed"] == CHUNKS and progress["leased"] == {}
    # Each chunk counted once, by the worker whose commit record it is: a worker that also
    # counted a commit it lost (or one it skipped) would show here.
    by_worker = collections.Counter(r.worker for r in read_commits(open_store(url)).values())
    assert {w["worker"]: w["chunks_done"] for w in progress["workers"] if w["chunks_done"]} == dict(by_worker)
    assert sum(w["chunks_done"] for w in progress["workers"]) == CHUNKS
    # The first worker to finish ends the fleet; the other is stopped gracefully.
    assert all(w["state"] in ("finished", "stopped") and not w["silent"] for w in progress["workers"])
    # A worker's bad config ends the fleet with the worker's exit 2, not 1: a supervisor
    # restarts a fleet that exited 1.
    bad = subprocess.run(
        [*actex_command(), "fleet", "--workers", "2", "--", "--config", str(config), "--model", str(tmp_path / "no-such-model")],
        env=env, capture_output=True, text=True, timeout=80,
    )
    assert bad.returncode == 2, bad.stdout + bad.stderr[-2000:]
    assert "exited with 2 (bad arguments or config); not restarting" in bad.stderr


def test_a_slot_whose_workers_die_young_is_restarted_after_a_growing_delay(tmp_path):
    """A worker that exits 1 at once (its hub or bucket is down) is not restarted in a tight
    loop: the second restart in a row waits backoff_s, the third twice that, and the fleet
    gives up after max_restarts."""
    fleet = LocalFleet([sys.executable, "-c", "import sys; sys.exit(1)"], 1, is_complete=lambda: False,
                       max_restarts=4, poll_s=0.01, backoff_s=0.4)
    with pytest.raises(FleetError, match="gave up after 4 worker restarts"):
        fleet.run(timeout_s=30)
    starts = [w.started_at for w in sorted(fleet.result.exited, key=lambda w: w.incarnation)]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(gaps) == 4
    # Each gap is the delay plus a Python start-up (slow on a loaded machine: upper bounds loose).
    assert gaps[0] < 0.4 + 1.5, gaps  # the first death may be a pre-emption: replaced at once
    assert 0.4 <= gaps[1] < 0.4 + 1.5 and 0.8 <= gaps[2] < 0.8 + 1.5 and 1.6 <= gaps[3] < 1.6 + 1.5, gaps
    assert [restart_delay(n) for n in (1, 2, 3, 4, 9, 20)] == [0, 1, 2, 4, 60, 60]
