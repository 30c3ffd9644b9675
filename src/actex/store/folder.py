"""Store: one folder on local disk, memory, GCS or S3, addressed by paths relative to its root.

Every byte actex stores goes through `Store` (import it from `actex.store`). Plain reads,
listings and deletes use the fsspec filesystem as is; the four operations whose semantics
differ per backend live in store/backends/, one class per family:

* `write`              local: temp file + fsync + rename, so a reader never sees half a file;
                       object stores: one single-shot or resumable upload (atomic by nature).
* `create_exclusive`   conditional create, the primitive behind commit records and run.json:
                       GCS `if_generation_match=0`, S3 `If-None-Match: *`, local `link(2)` of
                       a fsynced temp file (fails with EEXIST), memory: a process-wide lock.
* `read_versioned`     bytes plus an opaque version token (GCS generation, S3 ETag, local
                       inode + mtime + content hash, memory counter), read in one response.
* `replace_if_version` compare-and-swap on that token (GCS `if_generation_match=<gen>`,
                       S3 `If-Match: <etag>`, local rename under flock of the directory).

Every operation runs under one `RetryPolicy` (store/retry.py): transient failures are
retried, except those the filesystem's client retried already; the final error names the
object and the cause.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

import fsspec

from actex.store.backends import PROVEN_PROTOCOLS, TEMP_PREFIX, Backend, backend_for, unproven
from actex.store.errors import exception_chain, http_status, s3_error_code
from actex.store.retry import RetryPolicy, client_retries

T = TypeVar("T")


def _is_temp(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)


def _modified(info: dict) -> float | None:
    """Last-modified unix time from an fsspec info dict (local mtime, S3 LastModified, GCS updated)."""
    value = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return value.timestamp() if isinstance(value, datetime) else None


def _past_the_end(exc: BaseException) -> bool:
    """A ranged read that starts at or after the object's end: HTTP 416 / S3 InvalidRange."""
    return any(http_status(e) == 416 or s3_error_code(e) == "InvalidRange"
               for e in exception_chain(exc, explicit_only=True))


class Store:
    """A folder: every method takes a path relative to its root, with `/` separators."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str, retry: RetryPolicy):
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        self.retry = retry
        self._backend: Backend = backend_for(fs, self.url)
        self._client_retries = client_retries(fs)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- paths

    def path(self, rel: str) -> str:
        """Absolute path of `rel` in the filesystem's own spelling."""
        rel = rel.strip("/")
        if any(part in ("", ".", "..") for part in rel.split("/")) and rel:
            raise ValueError(f"bad relative path {rel!r} in {self.url}")
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel.strip('/')}"

    def child(self, rel: str) -> Store:
        """The sub-folder `rel` as a Store of its own (shares filesystem and retry policy)."""
        return Store(self.fs, self.path(rel), self.url_of(rel), self.retry)

    def _call(self, op: str, rel: str, fn: Callable[[], T]) -> T:
        return self.retry.call(fn, what=f"{op} {self.url_of(rel)}", already_retried=self._client_retries)

    def _fresh(self, path: str) -> None:
        # gcsfs / s3fs cache listings; other workers write here, so never trust that cache.
        self.fs.invalidate_cache(path)

    # -- reads

    def read_bytes(self, rel: str) -> bytes:
        path = self.path(rel)
        return self._call("read", rel, lambda: self.fs.cat_file(path))

    def read_many(self, rels: Sequence[str]) -> dict[str, bytes]:
        """Several whole objects; concurrent requests on object stores (fsspec `cat`)."""
        if not rels:
            return {}
        paths = {self.path(rel): rel for rel in rels}

        def cat() -> dict[str, bytes]:
            got = self.fs.cat(list(paths), on_error="raise")
            return {paths[self.fs._strip_protocol(p)]: data for p, data in got.items()}

        return self._call("read", f"{len(rels)} objects under {rels[0].rsplit('/', 1)[0]}", cat)

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of one object: one ranged GET on object stores.

        Short (maybe empty) where the object ends first, on every backend alike: a local
        read stops at the end, and GCS / S3 answer a range wholly past it with 416, which
        is returned as b"" so callers see a truncated object as a short read.
        """
        if not 0 <= start <= stop:
            raise ValueError(f"bad byte range [{start}, {stop}) for {self.url_of(rel)}")
        if start == stop:
            return b""
        path = self.path(rel)

        def read() -> bytes:
            try:
                return self.fs.cat_file(path, start=start, end=stop)
            except Exception as exc:  # gcsfs's HttpError is no OSError
                if _past_the_end(exc):
                    return b""
                raise

        return self._call("read", rel, read)

    def size(self, rel: str) -> int:
        return int(self.info(rel)["size"])

    def info(self, rel: str) -> dict:
        """The backend's metadata of one object: "size" always; GCS adds "crc32c" (base64
        of the big-endian CRC-32C), "md5Hash" and "generation"; S3 adds "ETag"."""
        path = self.path(rel)

        def info() -> dict:
            self._fresh(path)
            return dict(self.fs.info(path))

        return self._call("stat", rel, info)

    def exists(self, rel: str) -> bool:
        path = self.path(rel)

        def exists() -> bool:
            self._fresh(path)
            return self.fs.exists(path)

        return self._call("stat", rel, exists)

    def list(self, prefix: str = "") -> list[str]:
        """Relative paths of all objects under the folder `prefix`, sorted; [] if none.

        One recursive listing (paged by the backend), never one request per object.
        Temp files of unfinished local writes are left out (see `list_temp`).
        """
        return sorted(rel for rel in self._find(prefix, detail=False) if not _is_temp(rel))

    def list_temp(self, prefix: str = "") -> dict[str, float | None]:
        """Temp files under `prefix` ({relative path: modified unix time, None if unknown}).

        A local write that died (killed process, full disk before this version cleaned up)
        leaves its `.actex-tmp-*` file; `gc` deletes the stale ones.
        """
        return {rel: _modified(info) for rel, info in self._find(prefix, detail=True).items() if _is_temp(rel)}

    def _find(self, prefix: str, detail: bool) -> dict[str, dict]:
        """{relative path: fsspec info (empty unless `detail`, which costs a stat per file locally)}."""
        base = self.path(prefix)

        def find() -> dict[str, dict]:
            self._fresh(base)
            try:
                found = self.fs.find(base, detail=True) if detail else dict.fromkeys(self.fs.find(base), {})
            except FileNotFoundError:
                return {}
            root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
            rels = {}
            for full, info in found.items():
                full = self.fs._strip_protocol(full)
                if full.startswith(root):
                    rels[full[len(root):]] = info
            return rels

        return self._call("list", prefix or ".", find)

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        """Bytes and an opaque version token for `replace_if_version`; FileNotFoundError if absent."""
        path = self.path(rel)
        return self._call("read", rel, lambda: self._backend.read_versioned(path))

    # -- writes

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Create or overwrite; readers see the old or the new bytes, never a mix."""
        path = self.path(rel)
        self._call("write", rel, lambda: self._backend.write(path, bytes(data)))

    def delete(self, rel: str) -> None:
        """Remove one object; a missing object is not an error."""
        path = self.path(rel)

        def delete() -> None:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass
            self._fresh(path)

        self._call("delete", rel, delete)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create `rel` holding `data` unless it exists. True iff the object now holds our bytes.

        When a retried request finds the object already there, it may be our own first
        try that landed before its response was lost; reading it back tells the two
        apart (our payloads name their attempt, so equal bytes mean it is ours).
        """
        path, data = self.path(rel), bytes(data)

        def create() -> bool:
            if self._backend.create_exclusive(path, data):
                return True
            return self._holds(path, data)

        return self._call("create", rel, create)

    def replace_if_version(self, rel: str, data: bytes, version: str) -> bool:
        """Overwrite `rel` only if it is still at `version` (from `read_versioned`).

        False if someone replaced or deleted it since. As with `create_exclusive`, a
        retried request whose first try landed is recognised by reading back.
        """
        path, data = self.path(rel), bytes(data)

        def replace() -> bool:
            if self._backend.replace_if_version(path, data, version):
                return True
            return self._holds(path, data)

        return self._call("replace", rel, replace)

    def _holds(self, path: str, data: bytes) -> bool:
        self._fresh(path)
        try:
            return self.fs.cat_file(path) == data
        except FileNotFoundError:
            return False


def open_store(url: str | os.PathLike, *, retry: RetryPolicy | None = None, **storage_options) -> Store:
    """Open a folder: a local path, file://, memory://, gs://bucket/prefix or s3://bucket/prefix.

    `storage_options` go to the fsspec filesystem (e.g. `token=` for gcsfs,
    `endpoint_url=` / `key=` / `secret=` for s3fs). Opening creates nothing: the folder
    (and any parent directory on local disk) appears with the first write.
    """
    url = os.fspath(url)
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol not in PROVEN_PROTOCOLS:
        # Refused before fsspec builds (or fails to import) the filesystem.
        raise ValueError(unproven(url, protocol))
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    if "://" not in url:
        shown = url
    elif url.startswith("file://"):
        shown = "file://" + root
    else:
        shown = url.rstrip("/")
    return Store(fs, root, shown, retry or RetryPolicy())



__all__ = ["Store", "open_store"]
