"""The jitted capture forward the engine calls once per packed batch."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from actex.model.attention import make_attention
from actex.model.hooks import parse_hooks
from actex.model.mesh import batch_spec
from actex.model.qwen2 import ModelConfig, forward


def make_capture_fn(
    config: ModelConfig, hooks, out_dtype="bfloat16", *, mesh: Mesh | None = None, attention: str = "blockwise"
) -> Callable:
    """fn(params, token_ids, positions, segment_ids) -> {hook: [rows, seq, width]}.

    Hooks are validated and fixed at build time, so each (rows, seq) bucket compiles
    once. Only the requested hooks leave the device, already in `out_dtype`; blocks past
    the deepest hook are not run and the LM head never is.

    With a `mesh`, parameters and batches are expected already placed on it (weights.py,
    mesh.global_batch); every output comes back with rows over "data" and its FULL width
    on each device: what "model" split (mlp.hook_post's columns) is gathered on the
    device, over the fast interconnect, before any device-to-host copy. `attention` is a
    resolved backend name (attention.resolve_backend).
    """
    hooks = parse_hooks(hooks, config.n_layers)
    attend = make_attention(attention, mesh, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads)
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
