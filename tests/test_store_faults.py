"""Store operations through a proxy that injects 503s and connection resets (gs and s3).

The real client libraries' errors must be classified as transient and retried, and a
conditional write whose answer was lost (`reset_after`) must still report the truth.
"""

import pytest

from actex.store import RetryPolicy, open_store
from faultproxy import FaultPlan, FaultProxy


@pytest.fixture(params=["gs", "s3"])
def faulty_store(request):
    emulator = request.getfixturevalue("gcs_emulator" if request.param == "gs" else "s3_emulator")
    bucket = request.getfixturevalue("gcs_bucket" if request.param == "gs" else "s3_bucket")
    # The first conditional create and the first compare-and-swap lose their answers for
    # sure; the seeded draw adds faults of every kind elsewhere.
    plan = FaultPlan(seed=7, rate=0.12, kinds=("503", "reset", "reset_after"),
                     targeted=(("create", "reset_after"), ("swap", "reset_after")))
    with FaultProxy(emulator.endpoint, plan) as proxy:
        options = {**emulator.storage_options, "endpoint_url": proxy.url}
        retry = RetryPolicy(attempts=8, base_delay=0.01, max_delay=0.1)
        # skip_instance_cache: a fresh client per test, bound to this proxy's port.
        store = open_store(f"{bucket}/run", retry=retry, skip_instance_cache=True, **options)
        # S3's one-time If-None-Match probe runs here, unfaulted, so the targeted lost
        # answer lands on a commit record's create, not on the probe.
        proxy.set_enabled(False)
        assert store.create_exclusive("warm-up", b"")
        proxy.set_enabled(True)
        yield store, proxy


def test_operations_survive_injected_faults(faulty_store):
    store, proxy = faulty_store
    for chunk in range(4):
        assert store.create_exclusive(f"commits/{chunk:06d}.json", f"attempt-{chunk}".encode())
    assert not store.create_exclusive("commits/000000.json", b"a late worker")
    store.write_bytes("chunks/000000/a/part-00000.safetensors", bytes(range(256)) * 64)
    assert store.read_range("chunks/000000/a/part-00000.safetensors", 256, 512) == bytes(range(256))
    assert store.create_exclusive("claims/000001.json", b"lease-0")
    for renewal in range(1, 4):
        _, version = store.read_versioned("claims/000001.json")
        assert store.replace_if_version("claims/000001.json", f"lease-{renewal}".encode(), version)
    _, version = store.read_versioned("claims/000001.json")
    assert not store.replace_if_version("claims/000001.json", b"stale", "1" if version != "1" else "2")
    proxy.set_enabled(False)
    assert store.read_bytes("claims/000001.json") == b"lease-3"
    assert store.list("commits") == [f"commits/{c:06d}.json" for c in range(4)]
    assert [store.read_bytes(f"commits/{c:06d}.json") for c in range(4)] == [f"attempt-{c}".encode() for c in range(4)]
    # Each kind was injected, and a lost answer hit a conditional create and a
    # compare-and-swap (requests that carried the precondition), yet each reported success.
    assert set(proxy.counts) == {"503", "reset", "reset_after"}, proxy.counts
    lost = {i.precondition for i in proxy.injected if i.kind == "reset_after"}
    assert {"create", "swap"} <= lost, proxy.injected
