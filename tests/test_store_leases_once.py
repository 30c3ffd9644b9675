"""Leases hand each chunk to one live worker (issue 26, item 5): paths of store/claims.py
the fleet tests reach only by timing.

* A worker whose lease was taken over and who then finishes releases nothing: the taker's
  lease stands (a blind release would free the chunk for a third worker).
* A chunk committed (and released) between a worker's listing of commits/ and its claim is
  not handed out: the worker looks again after claiming (injected deterministically).
"""

from __future__ import annotations

import threading

from race_fixtures import After

from actex.store import layout
from actex.store.claims import ClaimedChunks, read_lease
from actex.store.folder import open_store


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def source(store, owner: str, clock: Clock, num_chunks: int = 1) -> ClaimedChunks:
    return ClaimedChunks(store, num_chunks, owner, lease_s=30.0, skew_s=5.0, poll_s=0.01, clock=clock)


def test_a_worker_that_lost_its_lease_releases_nothing(store_url):
    url, options = store_url
    clock = Clock()
    slow, taker = source(open_store(url, **options), "slow", clock), source(open_store(url, **options), "taker", clock)
    assert slow.try_claim(0)
    clock.now += 40.0  # slow stopped renewing (a long pause): its lease expired
    assert taker.try_claim(0)
    slow.finished(0)  # slow comes back, finishes (its commit would lose) and releases
    lease = read_lease(open_store(url, **options), 0)
    assert (lease.owner, lease.expiry) == ("taker", clock.now + 30.0), f"the taker's lease was overwritten: {lease}"
    assert not source(open_store(url, **options), "third", clock).try_claim(0)


def test_a_chunk_committed_while_a_worker_lists_is_not_handed_out(tmp_path):
    url = str(tmp_path / "run")
    clock = Clock()
    other_store = open_store(url)
    other = source(other_store, "other", clock)
    assert other.try_claim(0)

    def commit_and_release() -> None:  # right after the worker listed commits/: chunk 0 looked open
        assert other_store.create_exclusive(layout.commit_path(0), b"{}")
        other.finished(0)

    store = After(open_store(url), "list", layout.COMMITS_DIR, commit_and_release)
    worker = source(store, "worker", clock)
    got = list(worker.chunks(threading.Event()))
    worker.close()
    assert store.fired and got == [], f"handed out committed chunk(s) {got}"
