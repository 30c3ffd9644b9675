"""An abandoned `iter_batches` iterator can be closed from any thread (issue 26).

An iterator whose failure a traceback still holds (a frame <-> traceback cycle, as any
`except ... as error` that keeps the error makes) is closed later by the cyclic garbage
collector, on whichever thread happens to run it, the iterator's own reader threads
included. Closing must then neither wait for those threads (from one of them it would wait
for itself, or for a sibling blocked on a lock the collecting thread holds: a hang) nor
raise. Driven deterministically here: one of the reader threads closes the iterator.
"""

from __future__ import annotations

import sys
import threading

from reader_fixtures import write_run

from actex.reader.run import Run
from actex.store.folder import Store, open_store

HOOK = "blocks.0.hook_resid_post"


class ClosingStore(Store):
    """Its first read of chunk 3's part data (on a reader thread) waits until the test's
    thread has left the iterator, then closes the iterator right there."""

    def __init__(self, inner: Store):
        super().__init__(inner.fs, inner.root, inner.url, inner.retry)
        self.iterator = None
        self.outside = threading.Event()
        self.closed = threading.Event()
        self.outcome: list[BaseException | None] = []

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        if rel.startswith("chunks/000003/") and start > 0 and not self.outcome:
            self.outside.wait(10)
            try:
                self.iterator.close()
                self.outcome.append(None)
            except BaseException as error:  # noqa: BLE001 (what close raised is the finding)
                self.outcome.append(error)
            self.closed.set()
        return super().read_range(rel, start, stop)


def test_an_iterator_closed_on_its_own_reader_thread_neither_waits_nor_raises(tmp_path, monkeypatch):
    # What a generator raises while it is torn down never reaches close()'s caller: Python
    # reports it as "Exception ignored in ...". Collect those too.
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", lambda report: ignored.append(report.exc_value))
    expected = write_run(str(tmp_path / "run"), lengths=[[[2]]] * 8)  # one 2-token part (one block) per chunk
    store = ClosingStore(open_store(expected.url))
    store.iterator = Run(store).iter_batches(HOOK, 4, shuffle=False, prefetch=2, threads=2)
    assert len(next(store.iterator)) == 4  # chunks 0 and 1; chunks 2 and 3 are being fetched
    store.outside.set()
    assert store.closed.wait(10), "closing the iterator on its reader thread hung"
    raised = [error for error in store.outcome + ignored if error is not None]
    assert not raised, f"closing the iterator on its reader thread raised {raised[0]!r}"
