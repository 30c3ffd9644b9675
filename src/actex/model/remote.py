"""Checkpoints in an object store: `--model gs://bucket/models/qwen2.5-0.5b` (or s3://).

Every host of a slice (each with its own disk, no hub access) copies the checkpoint's files
from the bucket into a local cache once, then loads it like any local directory, so the
run's model fingerprint is the one the same files give on local disk. A cached copy is
trusted only after it is verified against the checkpoint itself: every file the store
lists has the store's size, every file the index names is there, and every safetensors
file is exactly as long as its own header says (8 + header + the last tensor's end).
Files are fetched in ranged reads of RANGE_BYTES, checked against the store's own checksum
(GCS CRC-32C, S3 MD5 ETag) and renamed into place when complete, so an interrupted or
corrupted copy is never taken for a finished one; a copy is reused only while the store
still holds the same object (a checkpoint uploaded over the old one is fetched again).
"""

from __future__ import annotations

import base64
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
from pathlib import Path

from actex.store import StoreError, open_store

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("gs://", "s3://")
RANGE_BYTES = 64 * 2**20
# In the cache folder: what the store said of each file when it was fetched (source_entry).
MANIFEST = ".actex-source.json"


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


def store_checksum(info: dict) -> tuple[str, str] | None:
    """The checksum the store keeps of an object's bytes, if any: ("crc32c", base64 of the
    big-endian value) on GCS, ("md5", hex) for a single-part S3 upload (its ETag); None for
    local files and multipart S3 uploads, whose bytes are then checked by size only."""
    if info.get("crc32c"):
        return "crc32c", str(info["crc32c"])
    etag = str(info.get("ETag") or "").strip('"')
    if re.fullmatch(r"[0-9a-f]{32}", etag):
        return "md5", etag
    return None


def source_entry(info: dict) -> dict:
    """What identifies one file of the checkpoint in the store: a cached copy is reused only
    while this is unchanged (same size is not enough: a fine-tuned checkpoint uploaded over
    the old one has the same sizes)."""
    version = info.get("generation") or info.get("ETag") or info.get("mtime") or ""
    return {"size": int(info["size"]), "checksum": store_checksum(info), "version": str(version)}


class _Digest:
    """The running digest `store_checksum` names, over bytes as they are written."""

    def __init__(self, kind: str | None):
        self.kind = kind
        if kind == "crc32c":
            import google_crc32c

            self._hash = google_crc32c.Checksum()
        elif kind == "md5":
            self._hash = hashlib.md5(usedforsecurity=False)
        else:
            self._hash = None

    def update(self, data: bytes) -> None:
        if self._hash is not None:
            self._hash.update(data)

    def value(self) -> str | None:
        if self.kind == "crc32c":
            return base64.b64encode(self._hash.digest()).decode()
        return self._hash.hexdigest() if self._hash is not None else None


def fetch_checkpoint(url: str, patterns: list[str], *, root: Path | None = None, storage_options: dict | None = None) -> Path:
    """The checkpoint at `url` as a verified local folder (copied on first use).

    patterns: which files to copy (fnmatch, as for the hub). Each file's bytes are checked
    against the store's own checksum as they arrive (GCS CRC-32C, S3 MD5 ETag). A cached
    file is reused only while the store's entry for it (size, checksum, generation) is the
    one recorded when it was fetched. Processes sharing the cache (several per host) take
    turns through a file lock. Raises FileNotFoundError when the store holds no config.json
    there, StoreError when the store keeps failing or delivers bytes that fail its checksum.
    """
    store = open_store(url, **(storage_options or {}))
    names = [n for n in store.list("") if "/" not in n and any(fnmatch.fnmatch(n, p) for p in patterns)]
    if "config.json" not in names:
        raise FileNotFoundError(f"--model {url}: no config.json there (is this a checkpoint folder?)")
    entries = {name: source_entry(store.info(name)) for name in names}
    folder = (root or cache_root()) / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest_path = folder / MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        for name, entry in entries.items():
            local = folder / name
            if manifest.get(name) == entry and local.exists() and local.stat().st_size == entry["size"]:
                continue
            _fetch_file(store, f"{url.rstrip('/')}/{name}", name, entry, local)
            manifest[name] = entry
            _write_atomically(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    verify_checkpoint(folder, {name: entry["size"] for name, entry in entries.items()})
    return folder


def _fetch_file(store, shown: str, name: str, entry: dict, local: Path) -> None:
    """Copy one object in ranged reads, checking its checksum; renamed into place when whole."""
    log.info("fetching %s (%.1f MB)", shown, entry["size"] / 1e6)
    kind, expected = entry["checksum"] or (None, None)
    digest = _Digest(kind)
    partial = local.with_name(f".{name}.partial")
    with open(partial, "wb") as out:
        for start in range(0, entry["size"], RANGE_BYTES):
            data = store.read_range(name, start, min(entry["size"], start + RANGE_BYTES))
            digest.update(data)
            out.write(data)
    if kind is not None and digest.value() != expected:
        partial.unlink()
        raise StoreError(f"{shown}: the bytes read have {kind} {digest.value()}, the store says {expected} "
                         "(corrupted in transit or changed while read); rerun to fetch it again")
    os.replace(partial, local)


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)
