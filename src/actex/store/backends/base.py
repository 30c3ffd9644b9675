"""What every backend does, and the plain fsspec way of doing it.

A backend holds the four operations whose semantics differ per filesystem family; `path`
is always absolute, in the filesystem's own spelling. Everything else a Store does (reads,
listings, deletes) is the same on every fsspec filesystem and lives in store/folder.py.
"""

from __future__ import annotations

import abc

import fsspec

# Temp files (local writes in progress, S3's probe objects) carry this prefix; listings
# hide them and `gc` deletes the stale ones.
TEMP_PREFIX = ".actex-tmp-"


class Backend(abc.ABC):
    """Writes and conditional operations of one filesystem family.

    * `write`              create or overwrite; a reader sees the old or the new bytes.
    * `create_exclusive`   create unless present; True iff this call created it.
    * `read_versioned`     bytes plus an opaque version token, read in one response.
    * `replace_if_version` compare-and-swap on that token; False if it moved on or is gone.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs

    def write(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    @abc.abstractmethod
    def read_versioned(self, path: str) -> tuple[bytes, str]:
        """Bytes and version token; FileNotFoundError if absent."""

    @abc.abstractmethod
    def replace_if_version(self, path: str, data: bytes, version: str) -> bool:
        """Overwrite iff still at `version`; True iff this call wrote."""
