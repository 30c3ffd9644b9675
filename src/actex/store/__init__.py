"""The run folder: store format v2 over local disk, memory, GCS and S3 (see docs/store.md).

    folder.py    Store: one fsspec folder, relative paths, conditional create / replace
    backends/    per filesystem family: atomic write, conditional create, compare-and-swap
    retry.py     RetryPolicy: which failures are transient, retried with tenacity
    errors.py    StoreError, and reading a client library's chain of causes
    layout.py    every path of format v2
    manifest.py  run.json: created once, checked by every worker
    shards.py    safetensors parts: encode, decode, header, split a chunk into parts
    integrity.py CRC-32C checksums recorded at write time, checked on every read
    stats.py     per-hook statistics, one object per chunk
    commits.py   commit records (the commit is the record's existence), heartbeats
"""

from actex.store.errors import StoreError, TransientStoreError
from actex.store.folder import Store, open_store
from actex.store.retry import RetryPolicy

__all__ = ["RetryPolicy", "Store", "StoreError", "TransientStoreError", "open_store"]
