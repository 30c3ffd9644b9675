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

from actex.model.attention import attention
from actex.model.qwen2 import ModelConfig, Params, block, matmul_precision, rms_norm, rope_angles

_NEG = -1e30  # finite "minus infinity", as in attention.py


def kv_cache_bytes(config: ModelConfig, rows: int, length: int, dtype="bfloat16") -> int:
    """Bytes of the keys + values cache for `rows` sequences of `length` tokens."""
    return 2 * config.n_layers * rows * length * config.n_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize


def lm_logits(params: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm + LM head of x [B, D] -> float32 logits [B, V] (tied head: the embedding)."""
    h = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    if "lm_head" in params:
        return jnp.einsum("bd,dv->bv", h, params["lm_head"], preferred_element_type=jnp.float32)
    return jnp.einsum("bd,vd->bv", h, params["embed"], preferred_element_type=jnp.float32)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array) -> jax.Array:
    """q [B, T, H, hd] over cached keys/values [B, S, Hkv, hd] where key_valid [B, S] holds.

    Causality is the caller's: the cache holds nothing later than the queries. Scores and
    softmax in float32; the normalised probabilities meet v in v's dtype, as in
    transformers' eager attention. Memory is O(S) per query, fine for decoding (T = 1).
    """
    batch, seq, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    qh = q.reshape(batch, seq, n_kv, n_heads // n_kv, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", qh, k, preferred_element_type=jnp.float32) * head_dim**-0.5
    scores = jnp.where(key_valid[:, None, None, None, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq, n_heads, head_dim).astype(q.dtype)


def prefill(params: Params, config: ModelConfig, token_ids: jax.Array, mask: jax.Array, cache_len: int):
    """Run the left-padded prompts [B, P]; return (float32 logits of the last position [B, V],
    keys, values [L, B, cache_len, Hkv, hd] with the prompt's in [:, :, :P]).

    The cache is carried through the layer scan and updated in place, so its peak is one
    copy at its final size.
    """
    batch, prompt_len = token_ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    segment_ids = mask.astype(jnp.int32)  # padding (0) never meets real tokens (1)
    rope = rope_angles(positions, config.head_dim, config.rope_theta)
    x = params["embed"][token_ids]
    shape = (config.n_layers, batch, cache_len, config.n_kv_heads, config.head_dim)
    cache = (jnp.zeros(shape, x.dtype), jnp.zeros(shape, x.dtype))

    def body(carry, i):
        x, (cache_k, cache_v) = carry
        p = jax.tree.map(lambda w: w[i], params["layers"])
        kept = {}

        def attend(q, k, v):
            kept["kv"] = (k, v)
            return attention(q, k, v, segment_ids)

        x = block(p, x, config, rope, segment_ids, attend)["hook_resid_post"]
        k, v = kept["kv"]
        cache_k = jax.lax.dynamic_update_slice(cache_k, k[None], (i, 0, 0, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v[None], (i, 0, 0, 0, 0))
        return (x, (cache_k, cache_v)), None

    (x, cache), _ = jax.lax.scan(body, (x, cache), jnp.arange(config.n_layers))
    return lm_logits(params, config, x[:, -1]), cache


def decode_step(params: Params, config: ModelConfig, cache, token: jax.Array, position: jax.Array,
                index: jax.Array, key_valid: jax.Array):
    """One token per row: token, position [B] int32, written at cache index `index` (a scalar,
    the same for every row); key_valid [B, S] includes `index`. -> (logits [B, V], cache)."""
    rope = rope_angles(position[:, None], config.head_dim, config.rope_theta)
    x = params["embed"][token[:, None]]  # [B, 1, D]

    def body(carry, i):
        x, (cache_k, cache_v) = carry
        p = jax.tree.map(lambda w: w[i], params["layers"])
        kept = {}

        def attend(q, k, v):
            # Write this token's key/value, then attend over the layer's whole cache.
            ck = jax.lax.dynamic_update_slice(cache_k, k[None], (i, 0, index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cache_v, v[None], (i, 0, index, 0, 0))
            kept["cache"] = (ck, cv)
            return cached_attention(q, ck[i], cv[i], key_valid)

        x = block(p, x, config, rope, None, attend)["hook_resid_post"]
        return (x, kept["cache"]), None

    (x, cache), _ = jax.lax.scan(body, (x, cache), jnp.arange(config.n_layers))
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
        logits, cache = decode_step(params, config, cache, token, n_prompt + t, prompt_len + t, key_valid)
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
