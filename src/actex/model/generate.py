"""Greedy decoding with a KV cache in fixed-shape buffers, for `actex generate`.

    generate = make_generate_fn(config, max_new_tokens=64)
    tokens, n_generated, stopped = generate(params, token_ids, mask, stop_ids)

Prompts are left-padded into one [B, P] array; `mask` marks real tokens. Each row's
positions come from its mask (the first real token is position 0), so a padded row
computes exactly what it would alone. The cache [L, B, P + N, Hkv, hd] is allocated once
at its final size: prefill writes the prompt's keys and values into [:, :, :P], step t
writes index P + t, and a `lax.while_loop` runs until every row has produced a stop token
or N tokens. Shapes never change inside the loop, so one (B, P, N) compiles once.

Only the last prompt position's logits and one token per step are computed: the LM head
never runs over the prompt. Activations are not captured here: the engine recomputes them
with one teacher-forced forward over prompt + generation (see engine/generate.py).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from actex.model.attention import decode_attention
from actex.model.capture import attention_for
from actex.model.config import ModelConfig
from actex.model.decoder import embed, lm_logits, run_layers
from actex.model.ops import matmul_precision
from actex.model.params import Params


def kv_cache_bytes(config: ModelConfig, rows: int, length: int, dtype="bfloat16") -> int:
    """Bytes of the keys + values cache for `rows` sequences of `length` tokens."""
    return 2 * config.n_layers * rows * length * config.n_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize


def _cache_rows(values, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """A block's rotated keys and values, [B, T, Hkv, hd] each: what the cache holds."""
    def heads(flat):
        return flat.reshape(*flat.shape[:2], config.n_kv_heads, config.head_dim)
    return heads(values["attn.hook_rot_k"]), heads(values["attn.hook_v"])


def prefill(params: Params, config: ModelConfig, token_ids: jax.Array, mask: jax.Array, cache_len: int):
    """Run the left-padded prompts [B, P]; return (float32 logits of the last position [B, V],
    keys, values [L, B, cache_len, Hkv, hd] with the prompt's in [:, :, :P]).

    The cache is carried through the layer scan and updated in place, so its peak is one
    copy at its final size.
    """
    batch, prompt_len = token_ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    segment_ids = mask.astype(jnp.int32)  # padding (0) never meets real tokens (1)
    x = embed(params, config, token_ids)
    shape = (config.n_layers, batch, cache_len, config.n_kv_heads, config.head_dim)
    cache = (jnp.zeros(shape, x.dtype), jnp.zeros(shape, x.dtype))
    kernel = attention_for(config)

    def attend(i, q, k, v, window, cache):
        return kernel(q, k, v, segment_ids, window=window)

    def write(i, values, cache):
        k, v = _cache_rows(values, config)
        return tuple(jax.lax.dynamic_update_slice(c, new[None], (i, 0, 0, 0, 0)) for c, new in zip(cache, (k, v)))

    x, cache = run_layers(params["layers"], config, x, positions, config.n_layers, attend, write, cache)
    return lm_logits(params, config, x[:, -1]), cache


def decode_step(params: Params, config: ModelConfig, cache, token: jax.Array, position: jax.Array,
                index: jax.Array, key_valid: jax.Array, key_positions: jax.Array):
    """One token per row: token, position [B] int32, written at cache index `index` (a scalar,
    the same for every row); key_valid [B, S] includes `index`; key_positions [B, S] int32
    (for sliding windows). -> (logits [B, V], cache)."""
    x = embed(params, config, token[:, None])  # [B, 1, D]

    def attend(i, q, k, v, window, cache):
        # This token's key/value joins the layer's cache, then attends over all of it.
        ck = jax.lax.dynamic_update_slice(cache[0][i], k, (0, index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cache[1][i], v, (0, index, 0, 0))
        in_window = (window == 0) | (position[:, None] - key_positions < window)
        return decode_attention(q, ck, cv, key_valid & in_window, scale=config.attn_scale,
                                softcap=config.attn_softcap)

    def write(i, values, cache):
        k, v = _cache_rows(values, config)
        return tuple(jax.lax.dynamic_update_slice(c, new[None], (i, 0, index, 0, 0)) for c, new in zip(cache, (k, v)))

    x, cache = run_layers(params["layers"], config, x, position[:, None], config.n_layers, attend, write, cache)
    return lm_logits(params, config, x[:, 0]), cache


def greedy_generate(params: Params, token_ids: jax.Array, mask: jax.Array, stop_ids: jax.Array, *,
                    config: ModelConfig, max_new_tokens: int):
    """Greedy continuation of left-padded prompts.

    token_ids, mask: [B, P] int32 (mask 1 = real token; every row's last column is real).
    stop_ids: [K] int32, the tokens that end a row (EOS, the chat end-of-turn token).
    Returns tokens [B, N] int32 (N = max_new_tokens; a row's stop token is included and
    followed by zeros), n_generated [B] int32 and stopped [B] bool (ended by a stop token).
    """
    # The same matmul precision as the capture forward: float32 decoding means float32 on
    # TPU/GPU too, so the tokens chosen match the recomputed activations' forward.
    with jax.default_matmul_precision(matmul_precision(params["embed"].dtype)):
        return _greedy_generate(params, token_ids, mask, stop_ids, config, max_new_tokens)


def _greedy_generate(params: Params, token_ids, mask, stop_ids, config: ModelConfig, max_new_tokens: int):
    batch, prompt_len = token_ids.shape
    logits, cache = prefill(params, config, token_ids, mask, prompt_len + max_new_tokens)
    n_prompt = mask.sum(axis=1).astype(jnp.int32)
    prompt_valid = mask.astype(bool)
    steps = jnp.arange(max_new_tokens)
    prompt_positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    key_positions = jnp.concatenate([prompt_positions, n_prompt[:, None] + steps[None, :]], axis=1)  # [B, S]

    def cond(state):
        t, _, _, done, _, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, logits, cache, done, tokens, n_generated = state
        token = jnp.where(done, 0, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = tokens.at[:, t].set(token)
        n_generated = jnp.where(done, n_generated, t + 1)
        done = done | jnp.any(token[:, None] == stop_ids[None, :], axis=1)
        # Token t of every row sits at cache index P + t; finished rows keep computing
        # (fixed shapes), and their results are never read.
        key_valid = jnp.concatenate([prompt_valid, jnp.broadcast_to(steps <= t, (batch, max_new_tokens))], 1)
        logits, cache = decode_step(params, config, cache, token, n_prompt + t, prompt_len + t, key_valid,
                                    key_positions)
        return t + 1, logits, cache, done, tokens, n_generated

    state = (jnp.int32(0), logits, cache, jnp.zeros(batch, bool),
             jnp.zeros((batch, max_new_tokens), jnp.int32), jnp.zeros(batch, jnp.int32))
    _, _, _, done, tokens, n_generated = jax.lax.while_loop(cond, body, state)
    return tokens, n_generated, done


def make_generate_fn(config: ModelConfig, max_new_tokens: int) -> Callable:
    """Jitted fn(params, token_ids [B, P], mask [B, P], stop_ids [K]) ->
    (tokens [B, N], n_generated [B], stopped [B]); compiles once per (B, P, K)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return jax.jit(functools.partial(greedy_generate, config=config, max_new_tokens=max_new_tokens))
