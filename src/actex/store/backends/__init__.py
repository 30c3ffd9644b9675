"""The four operations whose semantics differ per filesystem family, one backend each.

    base.py    Backend: write, create_exclusive, read_versioned, replace_if_version
    local.py   temp file + fsync + rename; link(2) fails with EEXIST; flock'd compare-and-swap
    memory.py  fsspec's memory filesystem under one process-wide lock
    gcs.py     gcsfs writes; google-cloud-storage uploads with if_generation_match (0 / <gen>)
    s3.py      s3fs: If-None-Match: * (proven by a probe first), If-Match: <etag>

Exactly-once commits rest on the conditional create: a generic fsspec filesystem (az://,
hdfs://, ...) can only check-then-write, which two workers can both pass, so only the
families above are accepted.
"""

from __future__ import annotations

import fsspec

from actex.store.backends.base import TEMP_PREFIX, Backend
from actex.store.backends.gcs import GCSBackend
from actex.store.backends.local import LocalBackend
from actex.store.backends.memory import MemoryBackend
from actex.store.backends.s3 import S3Backend

# URL schemes whose conditional create is proven (by the tests, on the real client libraries).
PROVEN_PROTOCOLS = ("file", "memory", "gs", "gcs", "s3", "s3a")


def unproven(url: str, protocol: str) -> str:
    """The one-line refusal of a store URL whose scheme is not in PROVEN_PROTOCOLS."""
    return (f"{url}: {protocol}:// has no conditional create actex can prove, and exactly-once commits need one; "
            "use a local path, memory://, gs:// or s3://")


def backend_for(fs: fsspec.AbstractFileSystem, url: str) -> Backend:
    """The backend of filesystem `fs` (opened from `url`); ValueError for an unproven family."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"file", "local"}:
        return LocalBackend(fs)
    if "memory" in protocols:
        return MemoryBackend(fs)
    if protocols & {"gs", "gcs"}:
        return GCSBackend(fs)
    if protocols & {"s3", "s3a"}:
        return S3Backend(fs)
    raise ValueError(unproven(url, "/".join(sorted(protocols))))


__all__ = ["PROVEN_PROTOCOLS", "TEMP_PREFIX", "Backend", "backend_for", "unproven"]
