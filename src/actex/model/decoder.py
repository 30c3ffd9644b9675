"""The decoder's skeleton: embed, one `lax.scan` over the stacked blocks, final norm, logits.

The scan body is written once and serves every caller: the capture forward
(model/capture.py: hook buffers), prefill and cached decoding (model/generate.py: the KV
cache). A caller passes `attend` (how this call's queries meet keys) and `visit` (what it
keeps of each block's values: hook slots or cache rows); both see the layer index. The
per-layer choices (RoPE table, sliding window) are scanned inputs, so a model mixing
sliding and global layers still compiles one block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from actex.model.blocks import Hooks, LayerInputs, block_fn
from actex.model.config import ModelConfig
from actex.model.ops import rms_norm, rms_normalize, softcap
from actex.model.params import Params
from actex.model.rope import rope_angles

# attend(layer index, q [B,T,H,hd], k, v [B,T,Hkv,hd], window, state) -> [B,T,H,hd]
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, Any], jax.Array]
# visit(layer index, the block's hook values, state) -> state
VisitFn = Callable[[jax.Array, Hooks, Any], Any]


def embed(params: Params, config: ModelConfig, token_ids: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D] in the parameter dtype (Gemma: times sqrt(d_model),
    the scale rounded to that dtype first, as transformers does)."""
    x = params["embed"][token_ids]
    if config.embed_scale is not None:
        x = x * jnp.asarray(config.embed_scale, x.dtype)
    return x


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of every distinct RoPE table: float32 [n_tables, B, T, 1, hd/2]."""
    pairs = [rope_angles(positions, rope) for rope in config.rope_tables()]
    return jnp.stack([c for c, _ in pairs]), jnp.stack([s for _, s in pairs])


def run_layers(layers: Params, config: ModelConfig, x: jax.Array, positions: jax.Array, n_run: int,
               attend: AttendFn, visit: VisitFn, state: Any) -> tuple[jax.Array, Any]:
    """Blocks 0..n_run-1 over x [B, T, D] at `positions` [B, T]; returns (resid_post of
    block n_run-1, state after every visit).

    Layer weights are indexed inside the body, not sliced beforehand: slicing stacked
    weights under jit copies all of them.
    """
    cos, sin = rope_tables(config, positions)
    table = jnp.asarray(config.layer_rope_index()[:n_run])
    windows = jnp.asarray(config.layer_windows()[:n_run])
    block = block_fn(config)
    # A model without sliding layers passes a static 0: kernels then build no window mask.
    global_only = config.windows() == (0,)

    def body(carry, scanned):
        x, state = carry
        i, rope, window = scanned
        p = jax.tree.map(lambda w: w[i], layers)
        layer = LayerInputs(cos[rope], sin[rope], 0 if global_only else window)
        values = block(p, x, config, layer, lambda q, k, v, w: attend(i, q, k, v, w, state))
        return (values["hook_resid_post"], visit(i, values, state)), None

    (x, state), _ = jax.lax.scan(body, (x, state), (jnp.arange(n_run), table, windows))
    return x, state


def final_norm(params: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    """The final RMSNorm with its gain: HF's last_hidden_state (`ln_final.hook_out`)."""
    return rms_norm(x, params["final_norm"], config.rms_norm_eps, gemma=config.gemma)


def final_normalized(config: ModelConfig, x: jax.Array) -> jax.Array:
    """The final norm before its gain, float32 (`ln_final.hook_normalized`)."""
    return rms_normalize(x, config.rms_norm_eps)


def lm_logits(params: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm + LM head of x [B, D] -> float32 logits [B, V] (tied head: the embedding;
    Gemma 2: soft-capped)."""
    h = final_norm(params, config, x)
    if "lm_head" in params:
        logits = jnp.einsum("bd,dv->bv", h, params["lm_head"], preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("bd,vd->bv", h, params["embed"], preferred_element_type=jnp.float32)
    return softcap(logits, config.final_softcap)
