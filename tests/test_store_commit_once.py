"""A chunk commits once, on every backend (issue 26): a second commit of a chunk returns
False and the first record stands, whether it comes later or at the same moment.

Fast unit tests for what only a timing-dependent SIGSTOP fleet test caught before: a commit
record written unconditionally lets a late worker replace the record, and a reader then
reads the late attempt (or, after gc, missing data) under a chunk someone else committed.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from actex.store import layout
from actex.store.commits import CommitRecord, PartRecord, commit, read_commit
from actex.store.folder import open_store


def record(chunk: int, worker: str) -> CommitRecord:
    attempt = f"20250101T000000Z-{worker}-00000000"
    part = PartRecord(layout.part_path(chunk, attempt, 0), 100, "0" * 64, 64, "00000000")
    return CommitRecord(chunk, attempt, (part,), samples=1, tokens=5, worker=worker, committed_at=1.0)


def test_a_second_commit_returns_false_and_the_first_record_stands(store_url):
    url, options = store_url
    first, late = open_store(url, **options), open_store(url, **options)  # two workers' connections
    assert commit(first, record(3, "w1"))
    assert not commit(late, record(3, "w2")), "a second commit of chunk 3 won"
    assert read_commit(open_store(url, **options), 3) == record(3, "w1")
    # A retry of the winner's own commit (its response lost) is still its commit.
    assert commit(first, record(3, "w1"))
    assert open_store(url, **options).read_bytes(layout.commit_path(3)) == record(3, "w1").to_json()


def test_racing_commits_have_exactly_one_winner(store_url):
    url, options = store_url
    workers = [f"w{i}" for i in range(3)]
    stores = [open_store(url, **options) for _ in workers]
    barrier = threading.Barrier(len(workers))

    def race(i: int) -> bool:
        barrier.wait()
        return commit(stores[i], record(7, workers[i]))

    with ThreadPoolExecutor(len(workers)) as pool:
        won = list(pool.map(race, range(len(workers))))
    assert sum(won) == 1, f"{sum(won)} of {len(won)} racing commits of chunk 7 won"
    assert read_commit(open_store(url, **options), 7).worker == workers[won.index(True)]
