"""Store faults: 503s, connection resets (before and after the server acted) and delays.

The proxy from faultproxy.py sits between gcsfs and fake-gcs-server. Every store operation
the engine and the lease logic rely on must come through with the right answer.
"""

from __future__ import annotations

import pytest
from faultproxy import FaultPlan, FaultProxy

from actex.store import layout
from actex.store.claims import ClaimedChunks, read_lease
from actex.store.folder import RetryPolicy, open_store

# Fast backoff: the faults are injected at random, not an outage to ride out.
FAST_RETRY = RetryPolicy(attempts=8, base_delay=0.02, max_delay=0.2)


@pytest.fixture
def faulty_gcs(gcs_emulator, gcs_bucket):
    plan = FaultPlan(seed=7, rate=0.12, kinds=("503", "reset", "reset_after", "delay"), delay_s=0.05)
    with FaultProxy(gcs_emulator.endpoint, plan) as proxy:
        options = {**gcs_emulator.storage_options, "endpoint_url": proxy.url}
        yield proxy, f"{gcs_bucket}/run", options


def test_store_operations_survive_injected_faults(faulty_gcs):
    proxy, url, options = faulty_gcs
    store = open_store(url, retry=FAST_RETRY, **options)
    for k in range(6):
        store.write_bytes(f"chunks/{k}/part.bin", bytes([k]) * 1000)
        # A create whose response was lost must still report that we created it.
        assert store.create_exclusive(layout.commit_path(k), f"commit {k}".encode())
        assert not store.create_exclusive(layout.commit_path(k), b"someone else")
    for k in range(6):
        assert store.read_bytes(f"chunks/{k}/part.bin") == bytes([k]) * 1000
        assert store.read_bytes(layout.commit_path(k)) == f"commit {k}".encode()
    assert len(store.list(layout.COMMITS_DIR)) == 6
    counts = proxy.counts
    assert sum(counts.values()) >= 4 and set(counts) == {"503", "reset", "reset_after", "delay"}, counts


def test_lease_renewals_and_takeover_survive_injected_faults(faulty_gcs):
    proxy, url, options = faulty_gcs
    now = [1_000.0]
    sources = [
        ClaimedChunks(open_store(url, retry=FAST_RETRY, **options), 3, owner, lease_s=30, clock=lambda: now[0])
        for owner in ("a", "b")
    ]
    a, b = sources
    for chunk in range(3):
        assert a.try_claim(chunk) and not b.try_claim(chunk)
    for _ in range(3):
        now[0] += 10
        a.renew()
    assert a.held == [0, 1, 2] and not a.lost(0)
    now[0] += 40  # a stops beating; b takes everything over, exactly once each
    for chunk in range(3):
        assert b.try_claim(chunk)
        assert read_lease(b.store, chunk).owner == "b"
    a.renew()
    assert a.held == [] and all(a.lost(chunk) for chunk in range(3))
    assert sum(proxy.counts.values()) >= 3, proxy.counts
