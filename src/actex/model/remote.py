"""Checkpoints in an object store: `--model gs://bucket/models/qwen2.5-0.5b` (or s3://).

Every host of a slice (each with its own disk, no hub access) copies the checkpoint's files
from the bucket into a local cache once, then loads it like any local directory, so the
run's model fingerprint is the one the same files give on local disk. A cached copy is
trusted only after it is verified against the checkpoint itself: every file the store
lists has the store's size, every file the index names is there, and every safetensors
file is exactly as long as its own header says (8 + header + the last tensor's end).
Files are fetched in ranged reads of RANGE_BYTES and renamed into place when complete, so
an interrupted copy is never taken for a finished one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("gs://", "s3://")
RANGE_BYTES = 64 * 2**20


def is_remote(model: str) -> bool:
    return model.startswith(REMOTE_SCHEMES)


def cache_root() -> Path:
    """$XDG_CACHE_HOME/actex/models (or ~/.cache/actex/models)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "actex" / "models"


def safetensors_length(header: bytes, header_size: int) -> int:
    """The byte length a safetensors file with this header must have."""
    tensors = json.loads(header)
    end = max((t["data_offsets"][1] for name, t in tensors.items() if name != "__metadata__"), default=0)
    return 8 + header_size + end


def verify_checkpoint(folder: Path, sizes: dict[str, int]) -> None:
    """Raise ValueError (one line) unless `folder` holds the checkpoint `sizes` describes."""
    for name, size in sizes.items():
        local = folder / name
        if not local.exists() or local.stat().st_size != size:
            raise ValueError(f"{local}: missing or not {size} bytes as in the store")
        if name.endswith(".safetensors"):
            with open(local, "rb") as f:
                header_size = int.from_bytes(f.read(8), "little")
                expected = safetensors_length(f.read(header_size), header_size)
            if expected != size:
                raise ValueError(f"{local}: {size} bytes, but its header describes {expected}")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        missing = sorted(set(json.loads(index.read_text())["weight_map"].values()) - set(sizes))
        if missing:
            raise ValueError(f"{index}: names {', '.join(missing)}, not in the store")


def fetch_checkpoint(url: str, patterns: list[str], *, root: Path | None = None, storage_options: dict | None = None) -> Path:
    """The checkpoint at `url` as a verified local folder (copied on first use).

    patterns: which files to copy (fnmatch, as for the hub). Raises FileNotFoundError when
    the store holds no config.json there, StoreError when the store keeps failing.
    """
    from actex.store.folder import open_store

    store = open_store(url, **(storage_options or {}))
    names = [n for n in store.list("") if "/" not in n and any(fnmatch.fnmatch(n, p) for p in patterns)]
    if "config.json" not in names:
        raise FileNotFoundError(f"--model {url}: no config.json there (is this a checkpoint folder?)")
    sizes = {name: store.size(name) for name in names}
    folder = (root or cache_root()) / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        local = folder / name
        if local.exists() and local.stat().st_size == size:
            continue
        log.info("fetching %s/%s (%.1f MB)", url.rstrip("/"), name, size / 1e6)
        partial = folder / f".{name}.partial"
        with open(partial, "wb") as out:
            for start in range(0, size, RANGE_BYTES):
                out.write(store.read_range(name, start, min(size, start + RANGE_BYTES)))
        os.replace(partial, local)
    verify_checkpoint(folder, sizes)
    return folder
