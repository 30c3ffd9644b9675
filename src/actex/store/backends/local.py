"""Local disk: rename for atomic writes, link(2) for exclusive create, flock for compare-and-swap.

Every write goes to a fsynced temp file next to its target first and appears under its
final name in one step, so a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets

from actex.store.backends.base import TEMP_PREFIX, Backend
from actex.store.errors import StoreError


def _naming(error: OSError, path: str) -> OSError:
    """`error` as a StoreError naming `path` (errno kept), unless it names a file already.

    A full disk raises ENOSPC from write(2) with no file name at all; the user needs to
    know which store and object. Not-found / exists / permission keep their own types.
    """
    if isinstance(error, (StoreError, FileNotFoundError, FileExistsError, PermissionError)):
        return error
    return StoreError(error.errno, f"write failed: {error.strerror or error}", path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class LocalBackend(Backend):
    """POSIX calls rather than fsspec's local writes, which write the final file in place."""

    def _write_temp(self, path: str, data: bytes) -> str:
        """A fsynced temp file next to `path`; on failure (a full disk, say) none is left
        behind and the StoreError names `path`, not the temp file."""
        directory = os.path.dirname(path)
        try:
            self._make_dirs(directory)
            temp = os.path.join(directory, f"{TEMP_PREFIX}{secrets.token_hex(8)}")
            f = open(temp, "xb")
        except OSError as error:
            raise _naming(error, path) from error
        try:
            with f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as error:
            _unlink_quietly(temp)
            if isinstance(error, OSError):
                raise _naming(error, path) from error
            raise
        return temp

    @classmethod
    def _make_dirs(cls, directory: str) -> None:
        # A new directory's entry lives in its parent: without fsyncing the parent, a crash
        # could keep a commit record yet lose the attempt directory holding its parts.
        missing = []
        while not os.path.isdir(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        for new in reversed(missing):
            try:
                os.mkdir(new)
            except FileExistsError:
                pass  # made by a concurrent writer; its entry is synced below all the same
            cls._fsync_dir(os.path.dirname(new))

    @staticmethod
    def _fsync_dir(directory: str) -> None:
        # The new directory entry must survive a crash too, not just the file's bytes.
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write(self, path: str, data: bytes) -> None:
        temp = self._write_temp(path, data)
        try:
            os.replace(temp, path)
        except BaseException as error:
            _unlink_quietly(temp)
            if isinstance(error, OSError):
                raise _naming(error, path) from error
            raise
        self._fsync_dir(os.path.dirname(path))

    def create_exclusive(self, path: str, data: bytes) -> bool:
        # link(2) publishes the complete, fsynced file under its final name or fails with
        # EEXIST; O_CREAT|O_EXCL on the final name would expose a half-written file.
        temp = self._write_temp(path, data)
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError as error:
            raise _naming(error, path) from error
        finally:
            _unlink_quietly(temp)
        self._fsync_dir(os.path.dirname(path))
        return True

    @staticmethod
    def _version(fd: int, data: bytes) -> str:
        # inode + mtime alone can repeat (inode reuse, coarse timestamps); the content hash
        # closes that gap.
        st = os.fstat(fd)
        return f"{st.st_ino}-{st.st_mtime_ns}-{hashlib.sha256(data).hexdigest()[:16]}"

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        # Files are only ever replaced by rename, never edited, so one open fd gives bytes
        # and metadata of the same version.
        with open(path, "rb") as f:
            data = f.read()
            return data, self._version(f.fileno(), data)

    def replace_if_version(self, path: str, data: bytes, version: str) -> bool:
        directory = os.path.dirname(path)
        lock_fd = os.open(directory, os.O_RDONLY)
        try:
            # One exclusive flock per directory serialises compare-and-swap between
            # processes; plain readers need no lock because rename is atomic.
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                current = self.read_versioned(path)[1]
            except FileNotFoundError:
                return False
            if current != version:
                return False
            self.write(path, data)
            return True
        finally:
            os.close(lock_fd)  # closing the fd releases the flock
