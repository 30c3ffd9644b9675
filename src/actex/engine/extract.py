"""The extraction loop: for each chunk of this worker without a commit record, tokenize,
pack, run the jitted capture and hand the outputs to the pipeline, which writes and commits.

    run = open_run(fields)              # load checkpoint, resolve config, plan, run.json
    summary = extract(run, StaticChunks(run.plan.num_chunks, i, n), worker="w0")

`open_run` does everything that can fail on bad input before any chunk is touched: unknown
hooks, a missing dataset, an unwritable output, a config that disagrees with the run
already there. Resuming is rerunning: committed chunks are skipped, the rest redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from actex.config import RunConfig, check_field_names, device_config, resolve_config
from actex.data import ShapeBudget, build_plan, pack, tokenize_samples
from actex.data.plan import Plan
from actex.engine.generate import ChunkGenerator
from actex.engine.lockstep import lockstep_batches, split_shares
from actex.engine.pipeline import ChunkAssembler, ChunkJob, Pipeline, PipelineConfig, chunk_records
from actex.engine.work import SINGLE_PROCESS, ChunkSource, ProcessRole
from actex.model import LoadedModel, ModelConfig, hook_width, layers_needed, load_model, load_tokenizer, make_capture_fn
from actex.model.attention import resolve_backend
from actex.model.mesh import DATA, choose_mesh, describe, global_batch
from actex.model.weights import param_dtype, read_model_config, resolve_model_dir
from actex.store.commits import CommitRecord, Heartbeat, committed_chunks
from actex.store.folder import Store, open_store
from actex.store.manifest import HookSpec, PlanSummary, RunManifest, open_or_create_manifest

log = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 10.0


def cache_dir() -> Path:
    """actex's per-user cache: $XDG_CACHE_HOME/actex or ~/.cache/actex."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "actex"


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk, so a restarted (pre-empted, resumed) worker
    skips recompiling its few bucket shapes. $JAX_COMPILATION_CACHE_DIR wins if set."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))


@dataclass(frozen=True)
class OpenRun:
    """A run ready to extract into: its resolved config, store, plan, model and tokenizer."""

    config: RunConfig
    store: Store
    plan: Plan
    model: LoadedModel
    tokenizer: Any
    widths: dict[str, int]  # hook -> width, in canonical hook order
    mesh: Any = None  # jax.sharding.Mesh (data, model) the parameters live on
    attention: str = "blockwise"  # resolved attention backend


def checkpoint_config(model: str, revision: str | None) -> ModelConfig:
    """The checkpoint's ModelConfig from its config.json alone (no weights read yet)."""
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise FileNotFoundError(f"--model {model}: no such directory (nor a Hugging Face repo id)")
    model_dir, _ = resolve_model_dir(model, revision)
    return read_model_config(model_dir)


def open_run(fields: dict, *, storage_options: dict | None = None,
             agree: Callable[[dict], None] | None = None) -> OpenRun:
    """Validate user fields against the checkpoint, plan the data and create or check run.json.

    Raises ConfigError / ValueError / FileNotFoundError / PermissionError with one-line
    messages; nothing in the store is modified except creating run.json on a fresh run.
    `agree(resolved)`: in a slice, checks that every process resolved the same config
    (the run's canonical config plus the device fields) before anything is loaded.
    """
    check_field_names(fields)
    device, fields = device_config(fields)
    ckpt = checkpoint_config(fields["model"], fields.get("revision"))
    config = resolve_config(fields, n_layers=ckpt.n_layers, checkpoint_dtype=param_dtype(ckpt, None))
    if agree is not None:
        agree({**config.canonical(), **device.model_dump(mode="json")})
    # Decoding (a generation run) needs every block; capture alone stops at the deepest hook.
    n_layers = ckpt.n_layers if config.generation is not None else layers_needed(config.hooks, ckpt.n_layers)
    mesh = choose_mesh(device.mesh, ckpt, config.compute_dtype, n_layers)
    attention = resolve_backend(device.attention, mesh.devices.flat[0].platform, config.compute_dtype)
    log.info("mesh %s over %s devices, attention %s", describe(mesh), mesh.devices.flat[0].platform, attention,
             extra={"data": {"event": "devices", "mesh": describe(mesh), "attention": attention}})
    tokenizer_dir, _ = resolve_model_dir(config.model, config.revision)
    tokenizer = load_tokenizer(tokenizer_dir)
    plan = build_plan(config.data, tokenizer, config.chunk_size)
    store = open_store(config.run_url, **(storage_options or {}))
    generating = config.generation is not None
    model = load_model(
        config.model,
        revision=config.revision,
        dtype=config.compute_dtype,
        # Decoding needs every block and the LM head; capture alone stops at the deepest hook.
        max_layers=None if generating else n_layers,
        lm_head=generating,
        mesh=mesh,
    )
    widths = {hook: hook_width(model.config, hook) for hook in config.hooks}
    open_or_create_manifest(store, run_manifest(config, model, tokenizer, plan, widths))
    return OpenRun(config, store, plan, model, tokenizer, widths, mesh, attention)


def run_manifest(config: RunConfig, model: LoadedModel, tokenizer, plan: Plan, widths: dict[str, int]) -> RunManifest:
    """run.json's contents: everything a reader or a joining worker must agree on."""
    return RunManifest(
        config=config.canonical(),
        config_hash=config.config_hash,
        model_fingerprint=model.fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        hooks=tuple(HookSpec(hook, width, config.dtype) for hook, width in widths.items()),
        plan=PlanSummary(plan.num_samples, plan.chunk_size, plan.num_chunks, plan.fingerprint),
        kind=config.kind,
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation (vocab, merges, normalisers, template)."""
    payload = tokenizer.backend_tokenizer.to_str() + (tokenizer.chat_template or "")
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class Summary:
    """What one worker did in one `extract` call."""

    committed: int  # chunks this worker committed
    skipped: int  # chunks found already committed
    lost: int  # chunks another worker committed first (our attempt is garbage)
    progress: dict  # the final heartbeat: samples, tokens, bytes, rates
    failed: int = 0  # chunks left uncommitted after their writes failed for good (policy "continue")


def extract(
    run: OpenRun,
    source: ChunkSource,
    *,
    worker: str,
    stop: threading.Event | None = None,
    role: ProcessRole = SINGLE_PROCESS,
    on_commit: Callable[[CommitRecord, dict], None] | None = None,
    on_write_failure: str = "exit",
    pipeline: PipelineConfig = PipelineConfig(),
    heartbeat: Heartbeat | None = None,
) -> Summary:
    """Compute and commit every chunk `source` hands out that has no commit record yet.

    `on_commit(record, progress)` runs after each chunk this worker committed, on the
    commit thread; `progress` is the heartbeat's snapshot (counts and rates).
    `on_write_failure`: "exit" raises the first write that failed for good (after the
    store's retries); "continue" logs it, leaves that chunk uncommitted and goes on.
    `heartbeat`: the worker's heartbeat (see `worker_heartbeat`), created here if not given.
    """
    if on_write_failure not in ("exit", "continue"):
        raise ValueError(f"--on-write-failure must be exit or continue, got {on_write_failure!r}")
    stop = stop or threading.Event()
    config = run.config
    capture = make_capture_fn(run.model.config, config.hooks, config.dtype, mesh=run.mesh, attention=run.attention)
    data_shards = run.mesh.shape[DATA] if run.mesh is not None else 1
    # One per share (one per process of a slice), kept alike by every process; caps the
    # programs compiled for partial batches.
    budgets = [ShapeBudget() for _ in range(role.count)]
    # A generation run decodes each chunk's prompts first (engine/generate.py).
    tokens_of = (lambda chunk: chunk_tokens(run, chunk)) if config.generation is None else \
        ChunkGenerator(run).chunk_tokens
    # Process 0 reads the committed set; in a slice every process must skip the same chunks.
    done = set(role.share("committed", lambda: sorted(committed_chunks(run.store))))
    heartbeat = heartbeat or worker_heartbeat(run, worker)
    counts = {"committed": 0, "skipped": 0, "lost": 0, "failed": 0}

    def committed(record: CommitRecord, ours: bool) -> None:
        # On the commit lane, after the record was created (or lost to another worker).
        source.finished(record.chunk)
        if not ours:
            counts["lost"] += 1
            return
        counts["committed"] += 1
        heartbeat.add(chunks_done=1, samples=record.samples, tokens=record.tokens, bytes=record.bytes,
                      token_slots=record.token_slots)
        _beat(heartbeat)
        if on_commit is not None:
            on_commit(record, heartbeat.snapshot())

    def write_failed(chunk: int, error: Exception) -> None:
        # The error names the object and the cause (see store/folder.py RetryPolicy).
        log.error("chunk %d not committed: %s; going on (--on-write-failure continue)", chunk, error)
        counts["failed"] += 1
        source.finished(chunk)

    pipe = Pipeline(
        run.store,
        widths=run.widths,
        dtype=config.dtype,
        shard_size=config.shard_size,
        worker=worker,
        on_commit=committed,
        on_write_failure=write_failed if on_write_failure == "continue" else None,
        role=role,
        config=pipeline,
    )
    _beat(heartbeat, force=True)
    try:
        for chunk in source.chunks(stop):
            if chunk in done:
                counts["skipped"] += 1
                source.finished(chunk)
                continue
            tokenized = tokens_of(chunk)
            if role.count == 1:
                job = pipe.begin(chunk, tokenized)
                batches = pack(tokenized, config.batch_tokens, config.data.max_seq_len,
                               row_multiple=data_shards, budget=budgets[0])
            else:
                job, batches = _slice_chunk(run, pipe, role, chunk, tokenized, data_shards, budgets)
            for batch in batches:
                inputs = (batch.token_ids, batch.positions, batch.segment_ids)
                if run.mesh is not None:
                    inputs = global_batch(inputs, run.mesh)
                # Async dispatch: returns at once with device arrays; the host lane fetches
                # them while this thread already dispatches the next batch.
                outputs = capture(run.model.params, *inputs)
                pipe.add(job, batch, outputs, inputs[2])
            pipe.end(job)
            pipe.check()
    finally:
        pipe.close()
        _beat(heartbeat, state="stopped" if stop.is_set() else "finished", force=True)
    return Summary(counts["committed"], counts["skipped"], counts["lost"], heartbeat.snapshot(), counts["failed"])


def _slice_chunk(run: OpenRun, pipe: Pipeline, role: ProcessRole, chunk: int, tokenized: list,
                 data_shards: int, budgets: list[ShapeBudget]) -> tuple[ChunkJob, list]:
    """This process's job and step-aligned batches for `chunk` in a slice (engine/lockstep.py).

    batch_tokens stays the global tokens per step: each process packs its share of them.
    """
    shares = split_shares(tokenized, role.count)
    config = run.config
    part_base = sum(len(ChunkAssembler(s, run.widths, config.dtype, config.shard_size).parts)
                    for s in shares[: role.index])
    job = pipe.begin(chunk, shares[role.index], part_base=part_base, records=chunk_records(tokenized))
    local_shards = max(1, data_shards // role.count)
    batches = lockstep_batches(shares, role.index, max(16, config.batch_tokens // role.count),
                               config.data.max_seq_len, row_multiple=local_shards, budgets=budgets)
    return job, batches


def worker_heartbeat(run: OpenRun, worker: str) -> Heartbeat:
    """The worker's `workers/<id>.json`; a caller that must write it too (on pre-emption)
    creates it here and hands it to `extract`."""
    return Heartbeat(run.store, worker, interval_s=HEARTBEAT_EVERY_S, info={"run": run.config.name})


def chunk_tokens(run: OpenRun, chunk: int) -> list:
    """Chunk k's samples, tokenized, each carrying its source row in its metadata."""
    samples = run.plan.samples(chunk)
    tokenized = tokenize_samples(samples, run.tokenizer, run.config.data)
    return [
        dataclasses.replace(t, meta={"source_row": s.source_row, **t.meta}) for s, t in zip(samples, tokenized)
    ]


def _beat(heartbeat: Heartbeat, **kwargs) -> None:
    try:
        heartbeat.beat(**kwargs)
    except OSError as error:  # monitoring only: a run never fails over its heartbeat
        log.warning("heartbeat %s not written: %s", heartbeat.worker, error)
