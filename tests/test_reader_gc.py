"""actex gc: orphaned attempts past the grace period go; committed data stays intact."""

from __future__ import annotations

import time

import numpy as np
from reader_fixtures import write_run

from actex import open_run
from actex.store import layout
from actex.store.folder import open_store
from actex.store.gc import collect_garbage, list_attempts

HOOK = "blocks.0.hook_resid_post"


def test_gc_deletes_old_orphans_only(tmp_path):
    expected = write_run(str(tmp_path / "run"), lengths=[[[3, 5], [2]], [[4]], [[6]]], uncommitted=(1,))
    store = open_store(expected.url)
    # A commit race's loser for chunk 0 (old), and an attempt a live worker is writing now.
    loser = "20250102T000000Z-w9-deadbeef"
    store.write_bytes(layout.part_path(0, loser, 0), b"x" * 10)
    fresh = layout.new_attempt_id("w5")
    store.write_bytes(layout.part_path(2, fresh, 0), b"y" * 10)
    before = {path: store.read_bytes(path) for path in store.list() if path.startswith(("commits/", "run.json"))}

    dry = collect_garbage(store, grace_s=3600, dry_run=True)
    assert sorted((a.chunk, a.attempt) for a in dry.deleted) == [(0, loser), (1, "20250101T000000Z-w0-00000001")]
    assert len(list_attempts(store)) == 5  # dry run deleted nothing

    report = collect_garbage(store, grace_s=3600)
    assert [a.attempt for a in report.deleted] == [a.attempt for a in dry.deleted]
    assert [a.attempt for a in report.kept_recent] == [fresh] and report.committed == 2
    assert {(a.chunk, a.attempt) for a in list_attempts(store)} == {
        (0, "20250101T000000Z-w0-00000000"), (2, "20250101T000000Z-w0-00000002"), (2, fresh)}
    assert {path: store.read_bytes(path) for path in before} == before
    batches = list(open_run(expected.url).iter_batches(HOOK, 4, shuffle=False))
    np.testing.assert_array_equal(np.concatenate([b.activations for b in batches]), expected.hooks[HOOK])


def test_attempt_stamp():
    assert layout.attempt_started("20250101T000000Z-w0-00") == 1735689600.0
    assert layout.attempt_started("handmade") is None
    assert abs(layout.attempt_started(layout.new_attempt_id("w")) - time.time()) < 5
