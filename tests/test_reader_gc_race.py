"""actex gc racing a slow worker's commit (issue 26), on every backend.

A worker wrote an attempt long ago (older than the grace period) and commits it just as gc
runs. The commit is injected deterministically at one point of gc's pass, through a store
that runs it right after a given request returns: after gc listed the attempts, or after
it read the commit records. Either way the attempt keeps every file and the chunk reads
back whole, while a real orphan of the same age is still deleted and an undated one kept.
"""

from __future__ import annotations

import numpy as np
import pytest
from race_fixtures import After
from reader_fixtures import write_run

from actex import open_run
from actex.store import layout
from actex.store.folder import open_store
from actex.store.gc import collect_garbage, list_attempts

HOOK = "blocks.0.hook_resid_post"
SLOW = 1  # the chunk whose (old) attempt is committed while gc runs
LOSER = "20250102T000000Z-w9-deadbeef"  # an old attempt of chunk 0 that lost its commit race
UNDATED = "handmade"  # no start stamp: never deleted


# gc lists chunks/ (the attempts), then reads every commit record; the slow commit lands after either.
MOMENTS = {"after listing the attempts": ("list", layout.CHUNKS_DIR),
           "after reading the commit records": ("read_many", layout.COMMITS_DIR)}


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_commit_landing_during_gc_keeps_its_files(store_url, moment):
    url, options = store_url
    expected = write_run(url, options, lengths=[[[3, 5], [2]], [[4, 6], [1]], [[6]]])
    worker = open_store(url, **options)  # the slow worker's own connection
    record = worker.read_bytes(layout.commit_path(SLOW))
    worker.delete(layout.commit_path(SLOW))  # its data is written; its commit has not landed yet
    for attempt in (LOSER, UNDATED):
        worker.write_bytes(layout.part_path(0, attempt, 0), b"x" * 10)
    slow = {path for path in worker.list(layout.CHUNKS_DIR) if path.startswith(f"{layout.CHUNKS_DIR}/{SLOW:06d}/")}

    def slow_commit() -> None:
        assert worker.create_exclusive(layout.commit_path(SLOW), record)

    gc_store = After(open_store(url, **options), *MOMENTS[moment], slow_commit)
    report = collect_garbage(gc_store, grace_s=3600)
    assert gc_store.fired, "the commit was never injected"

    lost = sorted(slow - set(worker.list(layout.CHUNKS_DIR)))
    assert not lost, f"gc deleted {lost} of chunk {SLOW}, committed while it ran"
    assert [(a.chunk, a.attempt) for a in report.deleted] == [(0, LOSER)]
    assert [a.attempt for a in report.kept_recent] == [UNDATED]
    run = open_run(url, **options)
    assert run.chunks == [0, 1, 2]
    for part in run.parts():
        run.check_part(part)  # every byte the record names is there and intact
    assert [s["n_tokens"] for s in run.samples(SLOW)] == [4, 6, 1]
    batches = list(run.iter_batches(HOOK, 4, shuffle=False))
    np.testing.assert_array_equal(np.concatenate([b.activations for b in batches]), expected.hooks[HOOK])
    attempts = {(a.chunk, a.attempt) for a in list_attempts(worker)}
    assert (0, LOSER) not in attempts and (0, UNDATED) in attempts
