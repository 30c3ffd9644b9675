"""The plan: a deterministic enumeration of samples, cut into chunks of fixed id ranges.

Building it takes one pass over the rows (parse + validate + count, no rendering or
tokenizing): an ARC row yields n_test x predictions_per_task samples, a text row one.
Sample ids are positions in that enumeration, so any worker computing the plan alone gets
the same chunk k, and `samples(k)` re-reads and renders only the rows chunk k touches.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator

from actex.data import arc
from actex.data.config import DataConfig
from actex.data.sources import Row, dataset_identity, iter_rows


@dataclass(frozen=True)
class Sample:
    sample_id: int
    source_row: int  # global row index in the source
    text: str
    meta: dict[str, Any]  # JSON-ready: source, row, task_id, test_index, augmentation ...
    task: arc.ArcTask | None = field(default=None, repr=False, compare=False)  # ARC rows: to score answers


def parse_row(row: Row, cfg: DataConfig) -> arc.ArcTask | str:
    """The row's ARC task or text; raises arc.BadRow with the reason if it has none."""
    if row.error is not None:
        raise arc.BadRow(row.error)
    if cfg.format == "arc":
        return arc.task_from_row(row.data, row.index, cfg.examples_column)
    return _row_text(row, cfg)


def valid_rows(cfg: DataConfig, skipped: list[dict]) -> Iterator[tuple[Row, arc.ArcTask | str]]:
    """Rows that parse, under the bad-row policy: a bad row raises a one-line ValueError
    ("path:row N: reason") or is appended to `skipped` as {source, row, index, reason}."""
    for row in iter_rows(cfg):
        try:
            yield row, parse_row(row, cfg)
        except arc.BadRow as e:
            if cfg.on_bad_row == "error":
                raise ValueError(f"{row.source}:row {row.row}: {e}") from None
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
    """The row's samples whose ids lie in `wanted`; only those are rendered."""
    origin = {"source": row.source, "row": row.row}
    if cfg.format == "text":
        if first_id in wanted:
            yield Sample(first_id, row.index, _row_text(row, cfg), origin)
        return
    task = arc.task_from_row(row.data, row.index, cfg.examples_column)
    template = arc.get_template(cfg.template)
    for local in range(arc.samples_per_task(task, cfg)):
        if first_id + local not in wanted:
            continue
        prompt = arc.task_prompt(task, row.index, cfg, local)
        meta = {
            **origin,
            "task_id": task.task_id,
            "test_index": prompt.test_index,
            "prediction": prompt.prediction,
            "augmentation": prompt.augmentation.to_meta(),
        }
        yield Sample(first_id + local, row.index, arc.render_chat(tokenizer, template, prompt.user), meta, task)


@dataclass(frozen=True)
class Plan:
    cfg: DataConfig
    chunk_size: int
    num_samples: int
    fingerprint: str
    skipped_rows: tuple[dict, ...]  # {source, row, index, reason} per row that gave no samples
    # Rows that yield samples, in order, and the id of each one's first sample.
    row_indices: tuple[int, ...] = field(repr=False)
    row_first_ids: tuple[int, ...] = field(repr=False)
    tokenizer: Any = field(repr=False, compare=False, default=None)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_range(self, k: int) -> tuple[int, int]:
        """Sample ids [start, stop) of chunk k."""
        if not 0 <= k < self.num_chunks:
            raise IndexError(f"chunk {k} out of range: the plan has {self.num_chunks} chunks")
        start = k * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)

    def chunks_for_worker(self, worker: int, num_workers: int) -> list[int]:
        """Static assignment: chunk k belongs to worker k mod N."""
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker index {worker} not in [0, {num_workers})")
        return list(range(worker, self.num_chunks, num_workers))

    def samples(self, k: int) -> list[Sample]:
        """Chunk k's samples, rendering only the rows it touches."""
        start, stop = self.chunk_range(k)
        wanted = range(start, stop)
        position = bisect.bisect_right(self.row_first_ids, start) - 1
        out: list[Sample] = []
        for row in iter_rows(self.cfg, start=self.row_indices[position]):
            if position == len(self.row_indices) or self.row_first_ids[position] >= stop:
                break
            if row.index != self.row_indices[position]:
                continue  # a bad row skipped when planning
            out.extend(row_samples(row, self.cfg, self.tokenizer, self.row_first_ids[position], wanted))
            position += 1
        if len(out) != stop - start:
            raise RuntimeError(
                f"chunk {k}: expected {stop - start} samples, rendered {len(out)}; the dataset changed since planning"
            )
        return out

    def summary(self) -> dict:
        """JSON-ready description for the run manifest."""
        return {
            "fingerprint": self.fingerprint,
            "num_samples": self.num_samples,
            "chunk_size": self.chunk_size,
            "num_chunks": self.num_chunks,
            "num_rows": len(self.row_indices),
            "skipped_rows": list(self.skipped_rows),
        }


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


def build_plan(cfg: DataConfig, tokenizer, chunk_size: int) -> Plan:
    """Count every row's samples (one pass, validation included) under the bad-row policy."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if cfg.format == "arc":
        arc.get_encoder(cfg.encoder), arc.get_template(cfg.template)  # fail on a bad name first
        arc.render_chat(tokenizer, arc.get_template(cfg.template), "")
    row_indices: list[int] = []
    row_first_ids: list[int] = []
    skipped: list[dict] = []
    num_samples = 0
    for row, parsed in valid_rows(cfg, skipped):
        row_indices.append(row.index)
        row_first_ids.append(num_samples)
        num_samples += arc.samples_per_task(parsed, cfg) if cfg.format == "arc" else 1
    return Plan(
        cfg=cfg,
        chunk_size=chunk_size,
        num_samples=num_samples,
        fingerprint=plan_fingerprint(cfg, tokenizer, chunk_size),
        skipped_rows=tuple(skipped),
        row_indices=tuple(row_indices),
        row_first_ids=tuple(row_first_ids),
        tokenizer=tokenizer,
    )
