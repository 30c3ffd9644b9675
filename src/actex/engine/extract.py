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

from actex.config import (ConfigError, RunConfig, check_field_names, device_config, resolve_config, respelt,
                          with_dataset_location, with_model_location)
from actex.data import ShapeBudget, build_plan, pack, tokenize_samples
from actex.data.plan import Plan, plan_fingerprint, plan_from_index
from actex.data.sources import check_source
from actex.engine.liveness import HEARTBEAT_EVERY_S, Liveness
from actex.engine.generate import ChunkGenerator
from actex.engine.lockstep import lockstep_batches, split_shares
from actex.engine.assembly import ChunkAssembler, chunk_records
from actex.engine.pipeline import ChunkJob, Pipeline, PipelineConfig
from actex.engine.work import SINGLE_PROCESS, ChunkSource, ProcessRole, StaticChunks
from actex.model import LoadedModel, ModelConfig, hook_width, layers_needed, load_model, load_tokenizer, make_capture_fn
from actex.model.attention import resolve_backend
from actex.model.mesh import DATA, RowShare, choose_mesh, describe, global_batch, model_within_process, process_rows
from actex.model.weights import param_dtype, read_model_config, resolve_model_dir
from actex.store.commits import CommitRecord, Heartbeat, committed_chunks
from actex.store.folder import Store, open_store
from actex.store.layout import MANIFEST, PLAN_INDEX
from actex.store.manifest import (SKIPPED_ROWS_LISTED, HookSpec, PlanSummary, RunManifest, open_or_create_manifest,
                                  read_manifest)

log = logging.getLogger(__name__)


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


class EmptyPlanError(ValueError):
    """The dataset yields no samples (no rows, or every row skipped): nothing to extract."""


def check_model_serves(model: ModelConfig, config: RunConfig) -> None:
    """Refuse, before anything is written, a hook this family does not compute and a length
    past which its RoPE would no longer match transformers ('dynamic' scaling)."""
    for hook in config.hooks:
        hook_width(model, hook)
    limit = model.max_exact_positions()
    longest = config.data.max_seq_len
    if limit is not None and longest > limit:
        raise ValueError(
            f"data.max_seq_len {longest}: the model's 'dynamic' RoPE changes past {limit} positions "
            f"(transformers recomputes it per batch), so actex serves at most {limit}")


def open_run(fields: dict, *, storage_options: dict | None = None,
             agree: Callable[[dict], None] | None = None) -> OpenRun:
    """Validate user fields against the checkpoint, plan the data and create or check run.json.

    Raises ConfigError / ValueError / FileNotFoundError / PermissionError with one-line
    messages (EmptyPlanError when no sample would be extracted); nothing in the store is
    modified except creating run.json, then the plan's row index, on a fresh run.
    The model revision is pinned: a run created from a hub id records the commit it
    resolved in run.json's config, and every later worker loads exactly that commit.
    `agree(resolved)`: in a slice, checks that every process resolved the same config
    (the run's canonical config plus the device fields) before anything is loaded.
    """
    check_field_names(fields)
    device, fields = device_config(fields)
    spelt = (fields.get("data") or {}).get("dataset")
    typed_model = fields.get("model")
    fields = with_model_location(with_dataset_location(fields))
    ckpt = checkpoint_config(fields["model"], fields.get("revision"))
    config = resolve_config(fields, n_layers=ckpt.n_layers, checkpoint_dtype=param_dtype(ckpt, None))
    check_model_serves(ckpt, config)
    check_source(spelt)  # a missing local dataset fails now, named as typed, before devices and model
    config = earlier_spelling(config, spelt, typed_model, storage_options)
    fields = {**fields, "model": config.model, "data": {**fields["data"], "dataset": config.data.dataset}}
    store = open_store(config.run_url, **(storage_options or {}))
    stored = read_manifest(store) if store.exists(MANIFEST) else None
    revision = pinned_revision(config.model, config.revision, stored)
    if revision != config.revision:
        if stored is not None:  # a joining worker: the checkpoint it must match
            ckpt = checkpoint_config(config.model, revision)
            config = resolve_config({**fields, "revision": revision}, n_layers=ckpt.n_layers,
                                    checkpoint_dtype=param_dtype(ckpt, None))
        else:
            config = config.model_copy(update={"revision": revision})
    if agree is not None:
        agree({**config.canonical(), **device.model_dump(mode="json")})
    # Decoding (a generation run) needs every block; capture alone stops at the deepest hook.
    n_layers = ckpt.n_layers if config.generation is not None else layers_needed(config.hooks, ckpt.n_layers)
    mesh = choose_mesh(device.mesh, ckpt, config.compute_dtype, n_layers)
    if config.generation is not None and not model_within_process(mesh):
        raise ValueError(f"--mesh {device.mesh}: generation decodes each process's prompts on its own devices, "
                         "so the model axis must stay within one process")
    attention = resolve_backend(device.attention, mesh.devices.flat[0].platform, config.compute_dtype,
                                softcap=ckpt.attn_softcap, windowed=ckpt.sliding_window is not None)
    log.info("mesh %s over %s devices, attention %s", describe(mesh), mesh.devices.flat[0].platform, attention,
             extra={"data": {"event": "devices", "mesh": describe(mesh), "attention": attention}})
    tokenizer_dir, _ = resolve_model_dir(config.model, config.revision)
    tokenizer = load_tokenizer(tokenizer_dir)
    plan, planned_here = plan_for_run(store, config, tokenizer)
    if plan.num_samples == 0:
        raise EmptyPlanError(empty_plan_message(config.data.dataset, plan))
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
    if planned_here:
        # Losing this race to another worker is fine: both indexes describe one plan.
        store.create_exclusive(PLAN_INDEX, plan.index_bytes())
    return OpenRun(config, store, plan, model, tokenizer, widths, mesh, attention)


def earlier_spelling(config: RunConfig, spelt: str | None, typed_model: str | None,
                     storage_options: dict | None) -> RunConfig:
    """`config`, or the run an older actex created from the local paths as typed.

    Until local dataset and model paths were made canonical (issue 25), a run's hash (and
    so its default name) came from the paths as spelt, and run.json recorded those
    spellings. Rerunning the same command, from the same directory, still resumes such a
    run: when no run of the canonical config exists yet but a run.json with the typed
    spellings does (under the old hash's name, or under --run-name), that run is continued
    as it was created. A new run always records the canonical locations."""
    spelt = config.data.dataset if spelt is None else spelt
    typed_model = config.model if typed_model is None else typed_model
    if (spelt, typed_model) == (config.data.dataset, config.model):
        return config
    options = storage_options or {}
    if _stored_locations(open_store(config.run_url, **options)) == (config.data.dataset, config.model):
        return config
    older = respelt(config, spelt, typed_model)
    if _stored_locations(open_store(older.run_url, **options)) != (spelt, typed_model):
        return config
    log.warning("%s: resuming a run created with --dataset %s --model %s as typed (actex now records %s, %s)",
                older.run_url, spelt, typed_model, config.data.dataset, config.model)
    return older


def _stored_locations(store: Store) -> tuple[str | None, str | None] | None:
    """(data.dataset, model) as the run.json in `store` records them; None without one."""
    if not store.exists(MANIFEST):
        return None
    stored = read_manifest(store).config
    return stored.get("data", {}).get("dataset"), stored.get("model")


def pinned_revision(model: str, requested: str | None, stored: RunManifest | None) -> str | None:
    """The model revision to load: for a new run from a hub id, the commit `requested` (a
    branch, tag or commit; default the main branch) resolves to now; for an existing run,
    the commit its run.json records. `requested` must then be absent or resolve to it."""
    if Path(model).expanduser().is_dir():
        return requested  # a local directory has no revisions
    recorded = stored.config.get("revision") if stored is not None else None
    if recorded is None:  # a new run (or one created before revisions were pinned)
        return resolve_model_dir(model, requested)[1] if stored is None else requested
    if requested is None or requested == recorded:
        return recorded
    resolved = resolve_model_dir(model, requested)[1]
    if resolved != recorded:
        raise ConfigError(
            f"--revision {requested} is commit {resolved}, but this run was created from commit {recorded} "
            f"(run.json); drop --revision to join it, or use another --run-name"
        )
    return recorded


def plan_for_run(store: Store, config: RunConfig, tokenizer) -> tuple[Plan, bool]:
    """The run's plan: from the row index stored with the run when there is one for this
    very plan (no pass over the data), else planned here (True)."""
    fingerprint = plan_fingerprint(config.data, tokenizer, config.chunk_size)
    if store.exists(PLAN_INDEX):
        plan = plan_from_index(config.data, tokenizer, store.read_bytes(PLAN_INDEX), fingerprint, store.url_of(PLAN_INDEX))
        if plan is not None:
            return plan, False
    materialise_dir = cache_dir() / "materialised"
    return build_plan(config.data, tokenizer, config.chunk_size, fingerprint=fingerprint, materialise_dir=materialise_dir), True


def empty_plan_message(dataset: str, plan: Plan) -> str:
    skipped = plan.skipped_by_reason()
    if not skipped:
        return f"{dataset}: no rows, so no samples to extract"
    reasons = "; ".join(f"{count} x {reason}" for reason, count in list(skipped.items())[:4])
    return f"{dataset}: no samples to extract: all {len(plan.skipped_rows)} rows skipped ({reasons})"


def run_manifest(config: RunConfig, model: LoadedModel, tokenizer, plan: Plan, widths: dict[str, int]) -> RunManifest:
    """run.json's contents: everything a reader or a joining worker must agree on."""
    return RunManifest(
        config=config.canonical(),
        config_hash=config.config_hash,
        model_fingerprint=model.fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        hooks=tuple(HookSpec(hook, width, config.dtype) for hook, width in widths.items()),
        plan=PlanSummary(plan.num_samples, plan.chunk_size, plan.num_chunks, plan.fingerprint),
        skipped_rows=plan.skipped_by_reason(),
        skipped_row_list=plan.skipped_rows[:SKIPPED_ROWS_LISTED],
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
    liveness: Liveness | None = None,
) -> Summary:
    """Compute and commit every chunk `source` hands out that has no commit record yet.

    `on_commit(record, progress)` runs after each chunk this worker committed, on the
    commit thread; `progress` is the heartbeat's snapshot (counts and rates).
    `on_write_failure`: "exit" raises the first write that failed for good (after the
    store's retries); "continue" logs it, leaves that chunk uncommitted and goes on.
    `heartbeat`: the worker's heartbeat (see `worker_heartbeat`), created here if not given.
    `liveness`: its heartbeat thread and stall watchdog (engine/liveness.py), created with
    the default stall timeout if not given; started here, closed on return.
    """
    if on_write_failure not in ("exit", "continue"):
        raise ValueError(f"--on-write-failure must be exit or continue, got {on_write_failure!r}")
    stop = stop or threading.Event()
    config = run.config
    # int8 is coded from float32 on the device, after the capture (moments.quantize_batch).
    captured = "float32" if config.dtype == "int8" else config.dtype
    capture = make_capture_fn(run.model.config, config.hooks, captured, mesh=run.mesh, attention=run.attention)
    data_shards = run.mesh.shape[DATA] if run.mesh is not None else 1
    # The rows this process holds: a share per process, or per model group when the model
    # axis spans processes (its processes hold the same rows; the first writes them).
    rows = process_rows(run.mesh) if run.mesh is not None else RowShare()
    # One per share, kept alike by every process; caps the programs compiled for partial batches.
    budgets = [ShapeBudget() for _ in range(rows.count)]
    # A generation run decodes each chunk's prompts first (engine/generate.py).
    generator = ChunkGenerator(run, role) if config.generation is not None else None
    tokens_of = generator.chunk_tokens if generator is not None else (lambda chunk: chunk_tokens(run, chunk))
    # Process 0 reads the committed set; in a slice every process must skip the same chunks.
    done = set(role.share("committed", lambda: sorted(committed_chunks(run.store))))
    heartbeat = heartbeat or worker_heartbeat(run, worker)
    liveness = liveness or Liveness(heartbeat)
    counts = {"committed": 0, "skipped": 0, "lost": 0, "failed": 0}

    def committed(record: CommitRecord, ours: bool) -> None:
        # On the commit lane, after the record was created (or lost to another worker).
        source.finished(record.chunk)
        liveness.done(record.chunk)
        if not ours:
            counts["lost"] += 1
            if counts["lost"] == 1 and isinstance(source, StaticChunks):
                # A static share is this worker's alone: someone else computes it too.
                log.warning("chunk %d was committed by another process first: a second worker runs with "
                            "--worker-index %d; give each worker its own index, or use --claim",
                            record.chunk, source.worker_index)
            return
        counts["committed"] += 1
        liveness.progressed(chunks_done=1, samples=record.samples, tokens=record.tokens, bytes=record.bytes,
                            token_slots=record.token_slots)
        _beat(heartbeat)
        if on_commit is not None:
            on_commit(record, heartbeat.snapshot())

    def write_failed(chunk: int, error: Exception) -> None:
        # The error names the object and the cause (see store/folder.py RetryPolicy).
        log.error("chunk %d not committed: %s; going on (--on-write-failure continue)", chunk, error)
        counts["failed"] += 1
        source.finished(chunk)
        liveness.done(chunk)

    pipe = Pipeline(
        run.store,
        widths=run.widths,
        dtype=config.dtype,
        shard_size=config.shard_size,
        worker=worker,
        on_commit=committed,
        on_write_failure=write_failed if on_write_failure == "continue" else None,
        role=role,
        rows=rows,
        config=pipeline,
        on_progress=liveness.progressed,
    )
    _beat(heartbeat, force=True)
    liveness.start()
    state = "failed"
    try:
        for chunk in source.chunks(stop):
            if chunk in done:
                counts["skipped"] += 1
                source.finished(chunk)
                continue
            liveness.took(chunk)
            tokenized = tokens_of(chunk)
            if generator is not None:
                log_decoding(chunk, generator.figures, tokenized)
            liveness.progressed()
            if role.count == 1:
                batches = pack(tokenized, config.batch_tokens, config.data.max_seq_len,
                               row_multiple=data_shards, budget=budgets[0])
                job = pipe.begin(chunk, tokenized, batches)
            else:
                job, batches = _slice_chunk(run, pipe, rows, chunk, tokenized, data_shards, budgets)
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
        state = "stopped" if stop.is_set() else "finished"
    except BaseException:
        state = "failed"
        raise
    finally:
        try:
            pipe.close()
        except BaseException:
            state = "failed"
            raise
        finally:
            liveness.close()
            _beat(heartbeat, state=state, force=True)
    return Summary(counts["committed"], counts["skipped"], counts["lost"], heartbeat.snapshot(), counts["failed"])


def log_decoding(chunk: int, figures, tokenized: list) -> None:
    """One line per generated chunk: decode tokens/s, slot occupancy, ARC answers parsed."""
    answers = [t.meta["answer"] for t in tokenized if t.meta.get("answer") is not None]
    parsed = sum(answer["grid"] is not None for answer in answers)
    rate = figures.tokens / figures.seconds if figures.seconds else 0.0
    log.info("chunk %d: decoded %d tokens in %.1f s (%.0f tokens/s), slot occupancy %.0f%%%s", chunk,
             figures.tokens, figures.seconds, rate, 100 * figures.occupancy,
             f", {parsed}/{len(answers)} answers parsed" if answers else "",
             extra={"data": {"event": "decoded", "chunk": chunk, "tokens": figures.tokens,
                             "seconds": round(figures.seconds, 3), "tokens_per_s": round(rate, 1),
                             "occupancy": round(figures.occupancy, 4), "answers": len(answers),
                             "parsed": parsed}})


def _slice_chunk(run: OpenRun, pipe: Pipeline, rows: RowShare, chunk: int, tokenized: list,
                 data_shards: int, budgets: list[ShapeBudget]) -> tuple[ChunkJob, list]:
    """This process's job and step-aligned batches for `chunk` in a slice (engine/lockstep.py).

    The chunk is cut into `rows.count` shares (one per process, or per model group when
    the model axis spans processes: every process of a group packs the same share).
    batch_tokens stays the global tokens per step: each share packs its part of them.
    Parts stay in sample-id order here (no fill order): every process must count the parts
    of the shares before its own the same way their writers cut them.
    """
    shares = split_shares(tokenized, rows.count)
    config = run.config
    part_base = sum(len(ChunkAssembler(s, run.widths, config.dtype, config.shard_size).parts)
                    for s in shares[: rows.index])
    job = pipe.begin(chunk, shares[rows.index], part_base=part_base, records=chunk_records(tokenized))
    local_shards = max(1, data_shards // rows.count)
    batches = lockstep_batches(shares, rows.index, max(16, config.batch_tokens // rows.count),
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
