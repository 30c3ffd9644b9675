"""Races injected deterministically: a store that runs a step of "another worker" right
after one of its own requests returns, so the interleaving a test needs happens every time."""

from __future__ import annotations

from collections.abc import Callable

from actex.store.folder import Store


class After(Store):
    """A store that runs `then()` once, right after the first `op` request whose path starts with `prefix`."""

    def __init__(self, inner: Store, op: str, prefix: str, then: Callable[[], None]):
        super().__init__(inner.fs, inner.root, inner.url, inner.retry)
        self.op, self.prefix, self.then = op, prefix, then
        self.fired = False

    def _after(self, op: str, path: str) -> None:
        if not self.fired and op == self.op and path.startswith(self.prefix):
            self.fired = True
            self.then()

    def list(self, prefix: str = "") -> list[str]:
        found = super().list(prefix)
        self._after("list", prefix)
        return found

    def read_many(self, rels):
        got = super().read_many(rels)
        self._after("read_many", rels[0] if rels else "")
        return got
