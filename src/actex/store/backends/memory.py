"""memory://: fsspec's process-wide memory filesystem, for tests and dry runs."""

from __future__ import annotations

import itertools
import threading

from actex.store.backends.base import Backend


class MemoryBackend(Backend):
    """fsspec's process-wide memory filesystem; a lock makes conditional ops atomic."""

    _lock = threading.Lock()
    _generations: dict[str, int] = {}
    _counter = itertools.count(1)

    def _put(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)
        self._generations[path] = next(self._counter)

    def write(self, path: str, data: bytes) -> None:
        with self._lock:
            self._put(path, data)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        with self._lock:
            if self.fs.exists(path):
                return False
            self._put(path, data)
            return True

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        with self._lock:
            return self.fs.cat_file(path), str(self._generations.get(path, 0))

    def replace_if_version(self, path: str, data: bytes, version: str) -> bool:
        with self._lock:
            if not self.fs.exists(path) or str(self._generations.get(path, 0)) != version:
                return False
            self._put(path, data)
            return True
