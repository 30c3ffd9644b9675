"""Preparing a run: everything that can fail on bad input, before any chunk is touched.

    run = prepare_run(fields)           # load checkpoint, resolve config, plan, run.json

`prepare_run` refuses unknown hooks, a missing dataset, an unwritable output, a config that
disagrees with the run already there, with one-line errors; nothing in the store is
written but run.json and the plan's row index of a fresh run. Resuming is rerunning:
the worker (engine/worker.py) then skips committed chunks and redoes the rest.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from actex.config import (ConfigError, RunConfig, check_field_names, device_config, resolve_config, respelt,
                          with_dataset_location, with_model_location)
from actex.data import arc, build_plan
from actex.data.plan import Plan, plan_fingerprint, plan_from_index, valid_rows
from actex.data.sources import check_source
from actex.model import LoadedModel, ModelConfig, hook_width, layers_needed, load_model, load_tokenizer
from actex.model.attention import resolve_backend
from actex.model.checksums import weight_checksums
from actex.model.hooks import model_block_hooks
from actex.model.mesh import choose_mesh, describe, model_within_process
from actex.model.weights import param_dtype, read_model_config, resolve_model_dir
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
class PreparedRun:
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


def prepare_run(fields: dict, *, storage_options: dict | None = None,
             agree: Callable[[dict], None] | None = None) -> PreparedRun:
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
    config = resolve_config(fields, n_layers=ckpt.n_layers, checkpoint_dtype=param_dtype(ckpt, None),
                            hook_kinds=model_block_hooks(ckpt.moe is not None))
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
    if generating and config.data.format == "arc" and planned_here:
        arc.refuse_duplicate_ids(valid_rows(config.data, []))  # answers are voted per task id
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
    return PreparedRun(config, store, plan, model, tokenizer, widths, mesh, attention)


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
        weights=weight_checksums(model.files),
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation (vocab, merges, normalisers, template)."""
    payload = tokenizer.backend_tokenizer.to_str() + (tokenizer.chat_template or "")
    return hashlib.sha256(payload.encode()).hexdigest()
