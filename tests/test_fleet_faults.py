"""Store faults: 503s, connection resets (before and after the server acted) and delays.

The proxy from faultproxy.py sits between gcsfs and fake-gcs-server. The store's own
primitives under faults are tested in test_store_faults.py; here, the lease logic and a
whole `--claim` fleet must come through with the right answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from engine_fixtures import committed_tensors, jax_cache, tiny_model_dir  # noqa: F401 (fixtures)
from faultproxy import FaultPlan, FaultProxy
from fleet_fixtures import WORKER_ENV, assert_ended_cleanly, check_run, fleet_case, timeline, worker_argv, write_config

from actex.fleet.local import LocalFleet
from actex.fleet.monitor import run_complete
from actex.store.claims import ClaimedChunks, read_lease
from actex.store.commits import committed_chunks, read_commits
from actex.store import RetryPolicy, open_store

# Fast backoff: the faults are injected at random, not an outage to ride out.
FAST_RETRY = RetryPolicy(attempts=8, base_delay=0.02, max_delay=0.2)
FAULT_CHUNKS = 24


@pytest.fixture(scope="module")
def case(tiny_model_dir, tmp_path_factory):  # noqa: F811
    return fleet_case(tiny_model_dir, tmp_path_factory.mktemp("faults"), FAULT_CHUNKS)


@pytest.fixture
def faulty_gcs(gcs_emulator, gcs_bucket):
    plan = FaultPlan(seed=7, rate=0.12, kinds=("503", "reset", "reset_after", "delay"), delay_s=0.05)
    with FaultProxy(gcs_emulator.endpoint, plan) as proxy:
        options = {**gcs_emulator.storage_options, "endpoint_url": proxy.url}
        yield proxy, f"{gcs_bucket}/run", options


def test_lease_renewals_and_takeover_survive_injected_faults(faulty_gcs):
    proxy, url, options = faulty_gcs
    now = [1_000.0]
    sources = [
        ClaimedChunks(open_store(url, retry=FAST_RETRY, **options), 2, owner, lease_s=30, clock=lambda: now[0])
        for owner in ("a", "b")
    ]
    a, b = sources
    for chunk in range(2):
        assert a.try_claim(chunk) and not b.try_claim(chunk)
    for _ in range(3):
        now[0] += 10
        a.renew()
    assert a.held == [0, 1] and not a.lost(0)
    now[0] += 40  # a stops beating; b takes everything over, exactly once each
    for chunk in range(2):
        assert b.try_claim(chunk)
        assert read_lease(b.store, chunk).owner == "b"
    a.renew()
    assert a.held == [] and all(a.lost(chunk) for chunk in range(2))
    assert sum(proxy.counts.values()) >= 3, proxy.counts


def test_claim_fleet_through_faulty_network_stores_identical_output(case, gcs_emulator, gcs_bucket, tmp_path):
    """Two `--claim` workers whose every store request crosses the fault proxy."""
    fields, reference = case
    fields = {**fields, "output": gcs_bucket}
    url = f"{gcs_bucket}/{fields['run_name']}"
    plan = FaultPlan(seed=11, rate=0.05, kinds=("503", "reset", "reset_after", "delay"), delay_s=0.2,
                     targeted=(("create", "reset_after"), ("swap", "reset_after")))
    with FaultProxy(gcs_emulator.endpoint, plan) as proxy:
        fleet = LocalFleet(
            worker_argv(write_config(tmp_path / "run.yaml", fields)),
            2,
            is_complete=lambda: run_complete(open_store(url, **gcs_emulator.storage_options)),
            env={**gcs_emulator.env, "STORAGE_EMULATOR_HOST": proxy.url, **WORKER_ENV},
            log_dir=tmp_path / "logs",
            max_restarts=0,  # a worker that fails on a transient fault fails the test
            poll_s=0.2,
        )
        fleet.run(timeout_s=85)
        injected, requests, lost = proxy.counts, proxy.requests, proxy.injected
    print(f"faults: {injected} in {requests} requests")
    # Lost answers hit a conditional create (a claim, a commit or run.json) and a lease
    # compare-and-swap, and the run still came out exactly once.
    assert {"create", "swap"} <= {i.precondition for i in lost if i.kind == "reset_after"}, lost
    check = check_run(url, gcs_emulator.storage_options, reference, workers=fleet.result.exited)
    assert check.chunks == FAULT_CHUNKS
    assert sum(injected.values()) >= 10 and set(injected) == set(plan.kinds), injected
    for worker in fleet.result.exited:
        assert_ended_cleanly(worker)


def test_preempted_worker_abandons_a_slow_chunk_at_the_deadline(case, gcs_emulator, gcs_bucket, tmp_path):
    """SIGTERM while every store request takes 1 s: the in-flight chunk cannot finish within a
    0.5 s deadline, so it is abandoned, its lease handed back, the heartbeat says so, exit 75."""
    fields, reference = case
    fields = {**fields, "output": gcs_bucket}
    url = f"{gcs_bucket}/{fields['run_name']}"
    store = open_store(url, **gcs_emulator.storage_options)
    with FaultProxy(gcs_emulator.endpoint, FaultPlan(rate=1.0, kinds=("delay",), delay_s=1.0)) as proxy:
        proxy.set_enabled(False)
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            worker = subprocess.Popen(
                worker_argv(write_config(tmp_path / "run.yaml", fields), "--preempt-deadline", "0.5"),
                env={**os.environ, **gcs_emulator.env, "STORAGE_EMULATOR_HOST": proxy.url, **WORKER_ENV},
                stdout=out, stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 60
            while b'"event": "commit"' not in log.read_bytes():
                assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.05)
            proxy.set_enabled(True)  # from now on every request is slow
            time.sleep(0.3)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 75, log.read_text()[-2000:]
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    text = log.read_text()
    assert "in-flight chunk was abandoned" in text, text[-2000:]
    # A request the proxy was still delaying when the worker exited lands up to 1 s later
    # (the in-flight chunk may still commit, atomically): let it land before looking.
    time.sleep(1.5)
    committed = committed_chunks(store)
    assert 0 < len(committed) < FAULT_CHUNKS
    leases = [read_lease(store, k) for k in range(FAULT_CHUNKS)]
    assert all(lease.expiry == 0.0 for lease in leases if lease is not None)  # all handed back
    # The chunk in flight may still have committed while the worker was abandoning it (the
    # commit lane runs on): either way, whatever is committed reads back whole, and
    # the committed chunks hold exactly the reference's tensors for their samples.
    stored = committed_tensors(url, gcs_emulator.storage_options)
    samples = {sid for k in committed for sid in _chunk_samples(store, k)}
    assert len(samples) == len(committed) and stored == {sid: reference[sid] for sid in samples}
    assert [json.loads(b) for b in [store.read_bytes(p) for p in store.list("workers")]][0]["state"] == "abandoned"


def _chunk_samples(store, chunk: int) -> list[int]:
    """Sample ids of a committed chunk, from its samples.jsonl."""
    record = read_commits(store, [chunk])[chunk]
    return [json.loads(line)["sample_id"] for line in store.read_bytes(record.samples_path).splitlines() if line.strip()]
