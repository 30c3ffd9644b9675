"""The plan: a deterministic enumeration of samples, cut into chunks of fixed id ranges.

Building it takes one pass over the rows (parse + validate + count, no rendering or
tokenizing): an ARC row yields n_test x predictions_per_task samples, a text row one (each
times samples_per_prompt).
Sample ids are positions in that enumeration, so any worker computing the plan alone gets
the same chunk k.

The pass also records a row index: for every row that yields samples, its global index,
the id of its first sample and its locator (JSONL byte offset, Parquet row group + row,
Arrow row number; see sources.Row). `samples(k)` reads only the rows chunk k touches,
straight from their locators: O(chunk), whatever k. The index is a few numpy arrays
(`index_bytes`, about 30 bytes a row), stored with the run so that every other worker and
every restart loads it instead of making the pass again (engine/extract.py). A source
that cannot seek (a streamed HF dataset) is materialised once, during the pass, into a
local JSONL file the locators point into.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from actex.data import arc
from actex.data.config import DataConfig
from actex.data.sample import Sample
from actex.data.sources import Row, can_seek, dataset_identity, iter_rows, read_rows
from actex.data.tokenize import bos_id

log = logging.getLogger(__name__)

INDEX_VERSION = 1
_INDEX_ARRAYS = ("row_indices", "row_first_ids", "file_nos", "locator_a", "locator_b")


def parse_row(row: Row, cfg: DataConfig) -> arc.ArcTask | str:
    """The row's ARC task or text; raises arc.BadRow with the reason if it has none."""
    if row.error is not None:
        raise arc.BadRow(row.error)
    if cfg.format == "arc":
        return arc.task_from_row(row.data, row.index, cfg.examples_column)
    return _row_text(row, cfg)


def valid_rows(cfg: DataConfig, skipped: list[dict], rows: Iterator[Row] | None = None) -> Iterator[tuple[Row, arc.ArcTask | str]]:
    """Rows (default: all of the source's) that parse, under the bad-row policy: a bad row
    raises a one-line ValueError ("path:row N: reason") or is appended to `skipped` as
    {source, row, index, reason}."""
    for row in iter_rows(cfg) if rows is None else rows:
        try:
            yield row, parse_row(row, cfg)
        except arc.BadRow as e:
            if cfg.on_bad_row == "error":
                raise ValueError(f"{row.where}: {e}") from None
            skipped.append({"source": row.source, "row": row.row, "index": row.index, "reason": str(e)})


def _row_text(row: Row, cfg: DataConfig) -> str:
    if not isinstance(row.data, dict) or cfg.text_column not in row.data:
        raise arc.BadRow(f"no text column {cfg.text_column!r}")
    text = row.data[cfg.text_column]
    if not isinstance(text, str):
        raise arc.BadRow(f"column {cfg.text_column!r} is {type(text).__name__}, not a string")
    if not text:
        raise arc.BadRow(f"column {cfg.text_column!r} is empty")
    return text


def row_samples(row: Row, cfg: DataConfig, tokenizer, first_id: int, wanted: range) -> Iterator[Sample]:
    """The row's samples whose ids lie in `wanted`; only those are rendered.

    With samples_per_prompt N > 1 every prompt gives N consecutive samples, told apart by
    their `draw` (0..N-1): the same text, each generated from its own sample id's key.
    """
    origin = {"source": row.source, "row": row.row}
    draws = cfg.samples_per_prompt
    if cfg.format == "text":
        for draw in range(draws):
            if first_id + draw in wanted:
                yield Sample(first_id + draw, row.index, _row_text(row, cfg), origin | _draw(draw, draws))
        return
    task = arc.task_from_row(row.data, row.index, cfg.examples_column)
    template = arc.get_template(cfg.template)
    for local in range(arc.samples_per_task(task, cfg) * draws):
        if first_id + local not in wanted:
            continue
        prompt = arc.task_prompt(task, row.index, cfg, local // draws)
        meta = {
            **origin,
            "task_id": task.task_id,
            "test_index": prompt.test_index,
            "prediction": prompt.prediction,
            "augmentation": prompt.augmentation.to_meta(),
            **_draw(local % draws, draws),
        }
        yield Sample(first_id + local, row.index, arc.render_chat(tokenizer, template, prompt.user), meta, task)


def _draw(draw: int, draws: int) -> dict:
    """The `draw` meta field, present only when prompts have several samples."""
    return {"draw": draw} if draws > 1 else {}


def reason_kind(reason: str) -> str:
    """A bad-row reason without its particulars (numbers, JSON decoder detail), for counts."""
    if reason.startswith("bad JSON"):
        return "bad JSON"
    return re.sub(r"\d+", "N", reason)[:120]


@dataclass(frozen=True)
class Plan:
    cfg: DataConfig
    chunk_size: int
    num_samples: int
    fingerprint: str
    skipped_rows: tuple[dict, ...]  # {source, row, index, reason} per row that gave no samples
    # The row index: rows that yield samples, in order; the id of each one's first sample;
    # each one's locator (file number, a, b), see sources.Row. int64 arrays [rows].
    row_indices: np.ndarray = field(repr=False, compare=False)
    row_first_ids: np.ndarray = field(repr=False, compare=False)
    file_nos: np.ndarray = field(repr=False, compare=False)
    locator_a: np.ndarray = field(repr=False, compare=False)
    locator_b: np.ndarray = field(repr=False, compare=False)
    materialised: str | None = None  # local JSONL copy of a source that cannot seek
    tokenizer: Any = field(repr=False, compare=False, default=None)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    @property
    def num_rows(self) -> int:
        """Rows that yield samples."""
        return len(self.row_indices)

    def chunk_range(self, k: int) -> tuple[int, int]:
        """Sample ids [start, stop) of chunk k."""
        if not 0 <= k < self.num_chunks:
            raise IndexError(f"chunk {k} out of range: the plan has {self.num_chunks} chunks")
        start = k * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)

    def samples(self, k: int) -> list[Sample]:
        """Chunk k's samples, reading and rendering only the rows it touches (by locator)."""
        start, stop = self.chunk_range(k)
        wanted = range(start, stop)
        lo = int(np.searchsorted(self.row_first_ids, start, side="right")) - 1
        hi = int(np.searchsorted(self.row_first_ids, stop, side="left"))
        refs = [
            (int(self.row_indices[i]), int(self.file_nos[i]), int(self.locator_a[i]), int(self.locator_b[i]))
            for i in range(lo, hi)
        ]
        out: list[Sample] = []
        for position, row in zip(range(lo, hi), read_rows(self.cfg, refs, self.materialised)):
            if row.error is not None:
                raise RuntimeError(f"{row.where}: {row.error}; the dataset changed since planning")
            out.extend(row_samples(row, self.cfg, self.tokenizer, int(self.row_first_ids[position]), wanted))
        if len(out) != stop - start:
            raise RuntimeError(
                f"chunk {k}: expected {stop - start} samples, rendered {len(out)}; the dataset changed since planning"
            )
        return out

    def skipped_by_reason(self) -> dict[str, int]:
        """How many rows were skipped (--on-bad-row skip), by reason, most frequent first."""
        counts = collections.Counter(reason_kind(r["reason"]) for r in self.skipped_rows)
        return dict(counts.most_common())

    def summary(self) -> dict:
        """JSON-ready description for the run manifest."""
        return {
            "fingerprint": self.fingerprint,
            "num_samples": self.num_samples,
            "chunk_size": self.chunk_size,
            "num_chunks": self.num_chunks,
            "num_rows": self.num_rows,
            "skipped_rows": list(self.skipped_rows),
        }

    def index_bytes(self) -> bytes:
        """The row index as one .npz object (arrays + a JSON header), for `plan_from_index`."""
        meta = {
            "version": INDEX_VERSION,
            "fingerprint": self.fingerprint,
            "num_samples": self.num_samples,
            "chunk_size": self.chunk_size,
            "skipped_rows": list(self.skipped_rows),
            "materialised": self.materialised,
        }
        buffer = io.BytesIO()
        arrays = {name: getattr(self, name) for name in _INDEX_ARRAYS}
        np.savez_compressed(buffer, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        return buffer.getvalue()


def plan_from_index(cfg: DataConfig, tokenizer, data: bytes, fingerprint: str, where: str) -> Plan | None:
    """The plan a stored row index describes, or None when it cannot be used here: another
    fingerprint, another index version, or a materialised copy this machine lacks."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(npz["meta"].tobytes())
            arrays = {name: np.asarray(npz[name], np.int64) for name in _INDEX_ARRAYS}
    except (OSError, ValueError, KeyError) as error:
        log.warning("%s: unreadable plan index (%s); planning again", where, error)
        return None
    if meta.get("version") != INDEX_VERSION or meta.get("fingerprint") != fingerprint:
        return None
    if meta["materialised"] is not None and not os.path.exists(meta["materialised"]):
        return None
    return Plan(
        cfg=cfg,
        chunk_size=int(meta["chunk_size"]),
        num_samples=int(meta["num_samples"]),
        fingerprint=fingerprint,
        skipped_rows=tuple(meta["skipped_rows"]),
        materialised=meta["materialised"],
        tokenizer=tokenizer,
        **arrays,
    )


def plan_fingerprint(cfg: DataConfig, tokenizer, chunk_size: int) -> str:
    """sha256 of dataset identity + canonical DataConfig + chunk size (+ the chat template,
    which shapes every ARC prompt's text)."""
    chat_template = getattr(tokenizer, "chat_template", None) if cfg.format == "arc" else None
    payload = {
        "dataset": dataset_identity(cfg),
        "data": cfg.canonical(),
        "chunk_size": chunk_size,
        "chat_template": hashlib.sha256(chat_template.encode()).hexdigest() if chat_template else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_plan(cfg: DataConfig, tokenizer, chunk_size: int, *, fingerprint: str | None = None,
               materialise_dir: str | os.PathLike | None = None) -> Plan:
    """Count every row's samples and index the rows (one pass, validation included) under the
    bad-row policy. A source that cannot seek is copied row by row, in the same pass, into
    a JSONL file under `materialise_dir` (default: a temp dir), which `samples` then reads."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if cfg.format == "arc":
        arc.get_encoder(cfg.encoder), arc.get_template(cfg.template)  # fail on a bad name first
        arc.render_chat(tokenizer, arc.get_template(cfg.template), "")
    elif cfg.add_bos:
        bos_id(tokenizer)  # a tokenizer without BOS is refused now, not in the first chunk
    fingerprint = fingerprint or plan_fingerprint(cfg, tokenizer, chunk_size)
    columns: dict[str, list[int]] = {name: [] for name in _INDEX_ARRAYS}
    skipped: list[dict] = []
    num_samples = 0
    copy = None if can_seek(cfg) else _materialised_copy(cfg, fingerprint, materialise_dir)
    rows = iter_rows(cfg) if copy is None else copy.rows(iter_rows(cfg))
    for row, parsed in valid_rows(cfg, skipped, rows):
        file_no, a, b = row.locator
        for name, value in zip(_INDEX_ARRAYS, (row.index, num_samples, file_no, a, b)):
            columns[name].append(value)
        num_samples += (arc.samples_per_task(parsed, cfg) if cfg.format == "arc" else 1) * cfg.samples_per_prompt
    if copy is not None:
        copy.close()
    return Plan(
        cfg=cfg,
        chunk_size=chunk_size,
        num_samples=num_samples,
        fingerprint=fingerprint,
        skipped_rows=tuple(skipped),
        materialised=None if copy is None else str(copy.path),
        tokenizer=tokenizer,
        **{name: np.asarray(values, np.int64) for name, values in columns.items()},
    )


class _MaterialisedCopy:
    """Rows of a source that cannot seek, written to a local JSONL file as they stream by;
    each row's locator becomes its byte offset there."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._temp = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=".actex-tmp-", delete=False)
        self._offset = 0

    def rows(self, rows: Iterator[Row]) -> Iterator[Row]:
        for row in rows:
            line = (json.dumps(row.data, sort_keys=True, default=str) + "\n").encode()
            yield Row(row.index, row.source, row.row, row.data, row.error, (-1, self._offset, row.row))
            self._temp.write(line)
            self._offset += len(line)

    def close(self) -> None:
        self._temp.close()
        os.replace(self._temp.name, self.path)  # complete, or absent


def _materialised_copy(cfg: DataConfig, fingerprint: str, directory) -> _MaterialisedCopy:
    base = Path(directory) if directory is not None else Path(tempfile.gettempdir()) / "actex-materialised"
    path = base / f"{fingerprint[:24]}.jsonl"
    log.warning("%s: a streamed dataset cannot seek; materialising its rows once into %s", cfg.dataset, path)
    return _MaterialisedCopy(path)
