"""Extracting one chunk: its samples tokenized, packed, run through the jitted capture and
handed to the pipeline, which writes the parts and the commit record.

`ExtractStep` is the per-chunk work; the worker (engine/worker.py) decides which chunks,
skips committed ones, keeps the heartbeat and watchdog and owns the pipeline it writes to.
A generation run's step (engine/generate.py GenerateStep) decodes the prompts first.
"""

from __future__ import annotations

import dataclasses
import logging

from actex.data import ShapeBudget, pack, tokenize_samples
from actex.data.positions import PositionSelection
from actex.engine.assembly import ChunkAssembler, chunk_records
from actex.engine.lockstep import lockstep_batches, split_shares
from actex.engine.pipeline import ChunkJob, Pipeline
from actex.engine.prepare import PreparedRun
from actex.engine.work import SINGLE_PROCESS, ProcessRole
from actex.model import make_capture_fn
from actex.model.mesh import DATA, RowShare, global_batch, process_rows

log = logging.getLogger(__name__)


def chunk_tokens(run: PreparedRun, chunk: int) -> list:
    """Chunk k's samples, tokenized, each carrying its source row in its metadata."""
    samples = run.plan.samples(chunk)
    tokenized = tokenize_samples(samples, run.tokenizer, run.config.data)
    return [
        dataclasses.replace(t, meta={"source_row": s.source_row, **t.meta}) for s, t in zip(samples, tokenized)
    ]


def row_share(run: PreparedRun) -> RowShare:
    """The rows of each batch this process holds: a share per process, or per model group
    when the model axis spans processes (its processes hold the same rows; the first writes them)."""
    return process_rows(run.mesh) if run.mesh is not None else RowShare()


class ExtractStep:
    """One chunk in, its parts and commit record out (through the worker's pipeline).

    `tokens(chunk)` gives the chunk's tokenized samples; `compute(chunk, tokenized, pipe)`
    packs them into batches, dispatches the capture for each and hands the outputs to
    `pipe`. A generation run's step (engine/generate.py) differs in `tokens` alone.
    """

    def __init__(self, run: PreparedRun, role: ProcessRole = SINGLE_PROCESS):
        self.run = run
        self.role = role
        config = run.config
        # int8 is coded from float32 on the device, after the capture (moments.quantize_batch).
        captured = "float32" if config.dtype == "int8" else config.dtype
        self.capture = make_capture_fn(run.model.config, config.hooks, captured, mesh=run.mesh, attention=run.attention)
        self.data_shards = run.mesh.shape[DATA] if run.mesh is not None else 1
        self.rows = row_share(run)
        # One per share, kept alike by every process; caps the programs compiled for partial batches.
        self.budgets = [ShapeBudget() for _ in range(self.rows.count)]
        self.select = PositionSelection(config.positions, config.data.seed)

    def tokens(self, chunk: int) -> list:
        return chunk_tokens(self.run, chunk)

    def compute(self, chunk: int, tokenized: list, pipe: Pipeline) -> None:
        """Capture every batch of `chunk` and end its job in `pipe` (the commit follows there)."""
        job, batches = self._begin(chunk, tokenized, pipe)
        for batch in batches:
            # The stored-token mask travels with the batch: statistics cover those tokens.
            inputs = (batch.token_ids, batch.positions, batch.segment_ids, self.select.mask(batch))
            if self.run.mesh is not None:
                inputs = global_batch(inputs, self.run.mesh)
            # Async dispatch: returns at once with device arrays; the host lane fetches
            # them while this thread already dispatches the next batch.
            outputs = self.capture(self.run.model.params, *inputs[:3])
            pipe.add(job, batch, outputs, inputs[3])
        pipe.end(job)

    def _begin(self, chunk: int, tokenized: list, pipe: Pipeline) -> tuple[ChunkJob, list]:
        if self.role.count > 1:
            return self._begin_slice(chunk, tokenized, pipe)
        config = self.run.config
        batches = pack(tokenized, config.batch_tokens, config.data.max_seq_len,
                       row_multiple=self.data_shards, budget=self.budgets[0])
        return pipe.begin(chunk, tokenized, batches, select=self.select), batches

    def _begin_slice(self, chunk: int, tokenized: list, pipe: Pipeline) -> tuple[ChunkJob, list]:
        """This process's job and step-aligned batches for `chunk` in a slice (engine/lockstep.py).

        The chunk is cut into `rows.count` shares (one per process, or per model group when
        the model axis spans processes: every process of a group packs the same share).
        batch_tokens stays the global tokens per step: each share packs its part of them.
        Parts stay in sample-id order here (no fill order): every process must count the parts
        of the shares before its own the same way their writers cut them.
        """
        rows, config = self.rows, self.run.config
        shares = split_shares(tokenized, rows.count)
        part_base = sum(len(ChunkAssembler(s, self.run.widths, config.dtype, config.shard_size,
                                           select=self.select).parts) for s in shares[: rows.index])
        job = pipe.begin(chunk, shares[rows.index], part_base=part_base, records=chunk_records(tokenized, self.select),
                         select=self.select)
        local_shards = max(1, self.data_shards // rows.count)
        batches = lockstep_batches(shares, rows.index, max(16, config.batch_tokens // rows.count),
                                   config.data.max_seq_len, row_multiple=local_shards, budgets=self.budgets)
        return job, batches

