"""One folder on local disk, memory, GCS or S3, addressed by paths relative to its root.

Every byte actex stores goes through `Store`. Plain reads, listings and deletes use the
fsspec filesystem as is; the four operations whose semantics differ per backend live in a
small backend class each:

* `write`              local: temp file + fsync + rename, so a reader never sees half a file;
                       object stores: one single-shot or resumable upload (atomic by nature).
* `create_exclusive`   conditional create, the primitive behind commit records and run.json:
                       GCS `ifGenerationMatch=0`, S3 `If-None-Match: *`, local `link(2)` of a
                       fsynced temp file (fails with EEXIST), memory: a process-wide lock.
* `read_versioned`     bytes plus an opaque version token (GCS generation, S3 ETag, local
                       inode + mtime + content hash, memory counter), read in one response.
* `replace_if_version` compare-and-swap on that token (GCS `ifGenerationMatch=<gen>`,
                       S3 `If-Match: <etag>`, local rename under flock of the directory).

Transient failures (5xx, 429, timeouts, resets) are retried by one `RetryPolicy` that
wraps every operation (and every dataset read, data/sources.py), except those the
filesystem's client retried already; the final error names the object and the cause.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import quote

import fsspec
import tenacity

T = TypeVar("T")

# Local temp files carry this prefix; `Store.list` hides them.
TEMP_PREFIX = ".actex-tmp-"


class StoreError(OSError):
    """A store operation failed for good (after retries, or for a non-transient reason)."""


class TransientStoreError(StoreError):
    """A failure worth retrying; also what tests raise to inject faults."""


# ----------------------------------------------------------------------------- retries

_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
# S3 answers concurrent conditional writes on one key with 409 ConditionalRequestConflict
# and asks the client to retry; the other codes are its spellings of 5xx / throttling.
_TRANSIENT_S3_CODES = {
    "ConditionalRequestConflict", "InternalError", "ServiceUnavailable", "SlowDown",
    "RequestTimeout", "RequestTimeTooSkewed", "Throttling", "ThrottlingException",
}


def _transient_library_errors() -> tuple[type[BaseException], ...]:
    """Connection-level error classes of the HTTP stacks under gcsfs and s3fs, if installed."""
    found: list[type[BaseException]] = []
    try:
        import aiohttp

        found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    try:
        import botocore.exceptions as bce

        found += [bce.HTTPClientError, bce.ConnectionError]
    except ImportError:
        pass
    return tuple(found)


_LIBRARY_TRANSIENT = _transient_library_errors()


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries: gcsfs HttpError `.code`, botocore `.response`."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures another attempt may cure: 5xx/429/408, timeouts, resets.

    Libraries wrap their errors (s3fs turns botocore errors into OSError), so the whole
    `__cause__` / `__context__` chain is inspected.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (FileNotFoundError, FileExistsError, PermissionError)):
            return False
        if isinstance(cur, (TransientStoreError, ConnectionError, TimeoutError) + _LIBRARY_TRANSIENT):
            return True
        if _http_status(cur) in _TRANSIENT_HTTP:
            return True
        response = getattr(cur, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in _TRANSIENT_S3_CODES:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def client_retries(fs: fsspec.AbstractFileSystem) -> Callable[[BaseException], bool]:
    """Which failures the filesystem's own client already retried before raising them.

    gcsfs retries 408/429/5xx and connection errors itself (6 tries, `gcsfs.retry`); s3fs
    retries its S3_RETRYABLE_ERRORS and botocore retries 5xx, throttling and connection
    errors. Retrying those again would multiply the attempts (36 instead of 6) and the
    time before a dead store is reported; what they do not retry (S3's 409
    ConditionalRequestConflict, a timeout raised outside the client) is still ours.
    """
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"gs", "gcs"}:
        from gcsfs.retry import is_retriable

        return lambda exc: any(is_retriable(e) for e in _chain(exc))
    if protocols & {"s3", "s3a"}:
        import botocore.exceptions as bce
        from s3fs.core import S3_RETRYABLE_ERRORS

        retried = (*S3_RETRYABLE_ERRORS, bce.HTTPClientError, bce.ConnectionError)
        return lambda exc: any(
            isinstance(e, retried) or (_http_status(e) or 0) >= 500 for e in _chain(exc)
        )
    return lambda exc: False


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not e for e in seen):
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy of actex, for store operations and dataset reads alike
    (tenacity: exponential backoff with full jitter, bounded attempts).

    Delay before retry n (1-based) is uniform in [0, min(max_delay, base_delay * 2**(n-1))];
    full jitter spreads a fleet of workers that all saw the same outage. Only transient
    failures (`is_transient`) are retried, and not those the client already retried
    (`already_retried`, see `client_retries`). The final error is a StoreError naming
    `what` (the object or file) and the cause.
    """

    attempts: int = 6
    base_delay: float = 0.25
    max_delay: float = 10.0

    def call(self, fn: Callable[[], T], *, what: str,
             already_retried: Callable[[BaseException], bool] = lambda exc: False) -> T:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_random_exponential(multiplier=self.base_delay, max=self.max_delay),
            retry=tenacity.retry_if_exception(lambda exc: is_transient(exc) and not already_retried(exc)),
            reraise=True,
        )
        try:
            return retrying(fn)
        except Exception as exc:
            if not is_transient(exc) or isinstance(exc, StoreError) and not isinstance(exc, TransientStoreError):
                raise
            attempts = retrying.statistics.get("attempt_number", 1)
            client = " (each with the client's own retries)" if already_retried(exc) else ""
            raise StoreError(f"{what} failed after {attempts} attempt{'s' if attempts != 1 else ''}{client}: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------- backends


class _Backend:
    """Writes and conditional operations of one filesystem family; `path` is absolute."""

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

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        raise StoreError(f"{self.fs.protocol} has no versioned reads; use gs://, s3://, memory:// or a local path")

    def replace_if_version(self, path: str, data: bytes, version: str) -> bool:
        raise StoreError(f"{self.fs.protocol} has no conditional replace; use gs://, s3://, memory:// or a local path")


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


class _LocalBackend(_Backend):
    """POSIX: rename for atomic writes, link(2) for exclusive create, flock for compare-and-swap."""

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


class _MemoryBackend(_Backend):
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


class _GCSBackend(_Backend):
    """gcsfs: `pipe_file(mode="create")` sends ifGenerationMatch=0; a 412 is FileExistsError."""

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        # One GET returns the bytes and the generation they belong to (x-goog-generation).
        headers, data = self.fs.call("GET", self.fs.url(path))
        return data, str(headers["x-goog-generation"])

    def replace_if_version(self, path: str, data: bytes, version: str) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        # A multipart upload (object resource + bytes), as gcsfs itself sends small files:
        # fake-gcs-server ignores preconditions on `uploadType=media`, GCS honours both.
        body = b"".join([
            b"--==0==\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n",
            json.dumps({"name": key}).encode(),
            b"\r\n--==0==\r\nContent-Type: application/octet-stream\r\n\r\n",
            data,
            b"\r\n--==0==--",
        ])
        try:
            self.fs.call(
                "POST",
                f"{self.fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
                uploadType="multipart",
                ifGenerationMatch=version,
                data=body,
                headers={"Content-Type": 'multipart/related; boundary="==0=="'},
            )
        except (FileExistsError, FileNotFoundError):  # gcsfs maps 412 to FileExistsError
            return False
        finally:
            self.fs.invalidate_cache(path)
        return True


def _past_the_end(exc: BaseException) -> bool:
    """A ranged read that starts at or after the object's end: HTTP 416 / S3 InvalidRange."""
    cur: BaseException | None = exc
    while cur is not None:
        response = getattr(cur, "response", None)
        if _http_status(cur) == 416 or (isinstance(response, dict)
                                        and response.get("Error", {}).get("Code") == "InvalidRange"):
            return True
        cur = cur.__cause__
    return False


def _is_precondition_failure(exc: BaseException) -> bool:
    cur: BaseException | None = exc
    while cur is not None:
        response = getattr(cur, "response", None)
        if isinstance(response, dict) and (
            response.get("Error", {}).get("Code") == "PreconditionFailed"
            or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412
        ):
            return True
        cur = cur.__cause__
    return False


# Set to 1 to skip the probe of If-None-Match on S3-compatible stores. UNSAFE: on a store
# that ignores the header, a conditional create overwrites, so two workers racing on one
# chunk can both "commit" (the later record wins; nothing is lost but exactly-once is).
UNSAFE_S3_ENV = "ACTEX_UNSAFE_S3_NO_CONDITIONAL_CREATE"


class _S3Backend(_Backend):
    """s3fs: `pipe_file(mode="create")` sends If-None-Match: *; replace sends If-Match: <etag>.

    Some S3-compatible stores accept If-None-Match and ignore it. So before the first
    conditional create in a bucket (the run's run.json, before anything else is written),
    the backend proves the store enforces it: it creates a probe object twice, and the
    second create must fail. The verdict is cached per (endpoint, bucket) for the process.
    """

    _verdicts: dict[tuple[str, str], bool] = {}
    _probing = threading.Lock()

    def create_exclusive(self, path: str, data: bytes) -> bool:
        self._require_conditional_create(path)
        return super().create_exclusive(path, data)

    def _require_conditional_create(self, path: str) -> None:
        if os.environ.get(UNSAFE_S3_ENV) == "1":
            return
        bucket = self.fs.split_path(path)[0]
        key = (str(getattr(self.fs, "endpoint_url", None) or ""), bucket)
        with self._probing:
            if key not in self._verdicts:
                self._verdicts[key] = self._enforces_if_none_match(os.path.dirname(path))
        if not self._verdicts[key]:
            raise ValueError(
                f"s3://{bucket}{' at ' + key[0] if key[0] else ''} ignores If-None-Match, so actex cannot "
                f"commit exactly once there; use another store, or set {UNSAFE_S3_ENV}=1 to run anyway (UNSAFE)")

    def _enforces_if_none_match(self, directory: str) -> bool:
        probe = f"{directory}/{TEMP_PREFIX}probe-{secrets.token_hex(8)}"
        # The first write is unconditional: a retried write whose answer was lost cannot
        # then be mistaken for a refusal. Only the second, conditional one tests the store.
        self.fs.pipe_file(probe, b"first")
        try:
            self.fs.pipe_file(probe, b"second", mode="create")
        except FileExistsError:
            return True
        except OSError as exc:
            if _is_precondition_failure(exc):
                return True
            raise
        finally:
            self.fs.rm_file(probe)
        return False

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(path)

        async def get() -> tuple[bytes, str]:
            # One GET: the body and the ETag of that very object version.
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        return fsspec.asyn.sync(self.fs.loop, get)

    def replace_if_version(self, path: str, data: bytes, version: str) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _is_precondition_failure(exc):
                return False
            raise
        finally:
            self.fs.invalidate_cache(path)
        return True


def _backend_for(fs: fsspec.AbstractFileSystem, url: str) -> _Backend:
    """The backend of a filesystem with a proven conditional create; ValueError for any other.

    Exactly-once rests on the conditional create: a generic fsspec filesystem (az://,
    hdfs://, ...) can only check-then-write, which two workers can both pass.
    """
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"file", "local"}:
        return _LocalBackend(fs)
    if "memory" in protocols:
        return _MemoryBackend(fs)
    if protocols & {"gs", "gcs"}:
        return _GCSBackend(fs)
    if protocols & {"s3", "s3a"}:
        return _S3Backend(fs)
    raise ValueError(_unproven(url, "/".join(sorted(protocols))))


# URL schemes whose conditional create is proven (by the tests, on the real client libraries).
PROVEN_PROTOCOLS = ("file", "memory", "gs", "gcs", "s3", "s3a")


def _unproven(url: str, protocol: str) -> str:
    return (f"{url}: {protocol}:// has no conditional create actex can prove, and exactly-once commits need one; "
            "use a local path, memory://, gs:// or s3://")


# ----------------------------------------------------------------------------- the folder


class Store:
    """A folder: every method takes a path relative to its root, with `/` separators."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str, retry: RetryPolicy):
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        self.retry = retry
        self._backend = _backend_for(fs, self.url)
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
        raise ValueError(_unproven(url, protocol))
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    if "://" not in url:
        shown = url
    elif url.startswith("file://"):
        shown = "file://" + root
    else:
        shown = url.rstrip("/")
    return Store(fs, root, shown, retry or RetryPolicy())


__all__ = [
    "RetryPolicy",
    "Store",
    "client_retries",
    "StoreError",
    "TransientStoreError",
    "is_transient",
    "open_store",
]
