"""The run folder: store format v2 over local disk, memory, GCS and S3 (see docs/store.md).

    folder.py    Store: one fsspec folder, relative paths, conditional create / replace
    layout.py    every path of format v2
    manifest.py  run.json: created once, checked by every worker
    shards.py    safetensors parts: encode, decode, header, split a chunk into parts
    integrity.py CRC-32C checksums recorded at write time, checked on every read
    stats.py     per-hook statistics, one object per chunk
    commits.py   commit records (the commit is the record's existence), heartbeats
"""

from actex.store.folder import RetryPolicy, Store, StoreError, TransientStoreError, open_store

__all__ = ["RetryPolicy", "Store", "StoreError", "TransientStoreError", "open_store"]
