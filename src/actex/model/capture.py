"""The capture forward: run the decoder just deep enough and keep only the requested hooks.

The model's math lives in blocks.py and decoder.py; this file is the plumbing that turns
"these hook names" into stacked buffers filled inside the one layer scan, and the jitted
function the engine calls once per packed batch.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from actex.model.attention import make_attention
from actex.model.config import ModelConfig
from actex.model.decoder import embed, final_norm, final_normalized, run_layers
from actex.model.hooks import HOOK_EMBED, HOOK_LN_FINAL, HOOK_LN_FINAL_OUT, hook_width, layers_needed, parse_hook, parse_hooks
from actex.model.mesh import batch_spec
from actex.model.ops import matmul_precision
from actex.model.params import Params, stacked_layers


def attention_for(config: ModelConfig, backend: str = "blockwise", mesh: Mesh | None = None):
    """The attention kernel `backend` computes for this model (its scale, soft-cap, windows)."""
    return make_attention(backend, mesh, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
                          scale=config.attn_scale, softcap=config.attn_softcap, windows=config.windows())


def capture_slots(hooks: tuple[str, ...], config: ModelConfig) -> dict[str, dict[int, str]]:
    """Per block hook kind: {layer: hook name}. resid_pre of block l > 0 is resid_post
    of block l - 1 (the same tensor), so it is taken there and never stored twice."""
    slots: dict[str, dict[int, str]] = {}
    for name in hooks:
        point = parse_hook(name, config.n_layers)
        if point.layer is None or (point.kind == "hook_resid_pre" and point.layer == 0):
            continue
        kind, layer = point.kind, point.layer
        if kind == "hook_resid_pre":
            kind, layer = "hook_resid_post", layer - 1
        slots.setdefault(kind, {}).setdefault(layer, point.name)
    return slots


def forward(
    params: Params,
    config: ModelConfig,
    token_ids: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32, restarting at 0 for every segment
    segment_ids: jax.Array,  # [B, T] int32, 0 = padding
    hooks: tuple[str, ...],
    out_dtype=None,
    attend=None,
) -> dict[str, jax.Array]:
    """Run the decoder just deep enough for `hooks`; return {hook: [B, T, width]}.

    Values are cast to `out_dtype` (default: the parameter dtype) as they are captured.
    `attend(q, k, v, segment_ids, window)` is the attention kernel (attention.make_attention;
    default: the blockwise kernel with the model's scale and soft-cap). Matmuls run at `matmul_precision(parameter dtype)`
    (float32 means float32 on TPU/GPU). Raises ValueError for a hook the parameters
    cannot produce (too few layers loaded) or the family does not compute.
    """
    attend = attend or attention_for(config)
    with jax.default_matmul_precision(matmul_precision(params["embed"].dtype)):
        return _forward(params, config, token_ids, positions, segment_ids, hooks, out_dtype, attend)


def _forward(params, config, token_ids, positions, segment_ids, hooks, out_dtype, attend):
    x = embed(params, config, token_ids)  # [B, T, D]
    out_dtype = out_dtype or x.dtype
    captured: dict[str, jax.Array] = {}
    for name in hooks:
        if name in (HOOK_EMBED, "blocks.0.hook_resid_pre"):
            captured[name] = x.astype(out_dtype)

    n_run = layers_needed(hooks, config.n_layers)
    n_stacked = stacked_layers(params)
    if n_run > n_stacked:
        raise ValueError(
            f"hooks need {n_run} layers but the parameters hold only {n_stacked} "
            f"(load_model(..., max_layers={n_stacked}))"
        )
    slots = capture_slots(hooks, config)
    if n_run:
        x, stacks = _run_capturing(params["layers"], config, x, positions, segment_ids, n_run, slots,
                                   out_dtype, attend)
        for kind, by_layer in slots.items():
            for slot, (layer, name) in enumerate(sorted(by_layer.items())):
                captured[name] = stacks[kind][slot]
    for name in hooks:
        point = parse_hook(name, config.n_layers)
        if name not in captured and point.kind in ("hook_resid_pre", "hook_resid_post"):
            # Its tensor was captured under the other name of the same slot.
            layer = point.layer - (point.kind == "hook_resid_pre")
            captured[name] = captured[slots["hook_resid_post"][layer]]
        if point.kind == HOOK_LN_FINAL:  # TransformerLens's meaning: before the gain
            captured[name] = final_normalized(config, x).astype(out_dtype)
        elif point.kind == HOOK_LN_FINAL_OUT:
            captured[name] = final_norm(params, config, x).astype(out_dtype)
    return {name: captured[name] for name in hooks}


def _run_capturing(layers, config, x, positions, segment_ids, n_run, slots, out_dtype, attend):
    """Scan blocks 0..n_run-1, writing each wanted hook value into a stacked buffer.

    Each hook kind gets a buffer [n_wanted + 1, B, T, W]; block i writes slot
    slot_of[i], and blocks nobody asked for write the spare last slot, so one compiled
    block body serves any layer selection.
    """
    batch, seq, _ = x.shape
    slot_of, buffers = {}, {}
    for kind, by_layer in slots.items():
        wanted = sorted(by_layer)
        table = [wanted.index(i) if i in wanted else len(wanted) for i in range(n_run)]
        slot_of[kind] = jnp.asarray(table, jnp.int32)
        width = hook_width(config, by_layer[wanted[0]])
        buffers[kind] = jnp.zeros((len(wanted) + 1, batch, seq, width), out_dtype)

    def keep(i, values, buffers):
        return {kind: jax.lax.dynamic_update_index_in_dim(
                    buf, values[kind].astype(out_dtype), slot_of[kind][i], axis=0)
                for kind, buf in buffers.items()}

    def attend_segments(i, q, k, v, window, state):
        return attend(q, k, v, segment_ids, window=window)

    x, buffers = run_layers(layers, config, x, positions, n_run, attend_segments, keep, buffers)
    return x, {kind: buf[:-1] for kind, buf in buffers.items()}


def make_capture_fn(
    config: ModelConfig, hooks, out_dtype="bfloat16", *, mesh: Mesh | None = None, attention: str = "blockwise"
) -> Callable:
    """fn(params, token_ids, positions, segment_ids) -> {hook: [rows, seq, width]}.

    Hooks are validated and fixed at build time, so each (rows, seq) bucket compiles
    once. Only the requested hooks leave the device, already in `out_dtype`; blocks past
    the deepest hook are not run and the LM head never is.

    With a `mesh`, parameters and batches are expected already placed on it (weights.py,
    mesh.global_batch); every output comes back with rows over "data" and its FULL width
    on each device: what "model" split (e.g. mlp.hook_post's columns) is gathered on the
    device, over the fast interconnect, before any device-to-host copy. `attention` is a
    resolved backend name (attention.resolve_backend).
    """
    hooks = parse_hooks(hooks, config.n_layers)
    for hook in hooks:
        hook_width(config, hook)  # refuses a hook this family does not compute
    attend = attention_for(config, attention, mesh)
    capture = functools.partial(
        forward, config=config, hooks=hooks, out_dtype=jnp.dtype(out_dtype), attend=attend
    )
    out_shardings = None
    if mesh is not None:
        out_shardings = {hook: NamedSharding(mesh, batch_spec()) for hook in hooks}

    @functools.partial(jax.jit, out_shardings=out_shardings)
    def capture_fn(params, token_ids, positions, segment_ids):
        return capture(params, token_ids=token_ids, positions=positions,
                       segment_ids=segment_ids)

    return capture_fn
