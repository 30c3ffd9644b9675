"""Decoding with a KV cache in fixed-shape buffers, for `actex generate`.

    generate = make_generate_fn(config, max_new_tokens=64)                # one static batch
    tokens, n_generated, stopped = generate(params, token_ids, mask, stop_ids)
    decode = make_continuous_fn(config, slots=8, max_new_tokens=64)        # decode slots
    tokens, n_generated, stopped, stats = decode(params, token_ids, mask, stop_ids, keys, n_real)

Prompts are left-padded into one [B, P] array; `mask` marks real tokens. Each row's
positions come from its mask (the first real token is position 0), so a padded row
computes exactly what it would alone. Caches are allocated once at their final size
(prompt region [:P], generation at P + t) and loops are `lax.while_loop`s over fixed
shapes, so each shape compiles once. Both paths run the model through decoder.run_layers,
the same layer scan as the capture forward.

Tokens are chosen greedily or sampled (`Sampling`: temperature, top-k, top-p) from a PRNG
key per sample (`sample_keys`: from the seed and the sample id alone), folded with the
token's index, so a sample draws the same tokens in any batch, slot, resume or mesh.

Only the last prompt position's logits and one token per step are computed: the LM head
never runs over the prompt. Activations are not captured here: the engine recomputes them
with one teacher-forced forward over prompt + generation (see engine/generate.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
    """One token per row: token, position [B] int32, written at cache index `index` [B]
    int32 (rows may differ: continuous batching); key_valid [B, S] includes `index`;
    key_positions [B, S] int32 (for sliding windows). -> (logits [B, V], cache)."""
    x = embed(params, config, token[:, None])  # [B, 1, D]
    rows = jnp.arange(token.shape[0])

    def attend(i, q, k, v, window, cache):
        # This token's key/value joins the layer's cache, then attends over all of it.
        ck = cache[0][i].at[rows, index].set(k[:, 0])  # [B, S, Hkv, hd]
        cv = cache[1][i].at[rows, index].set(v[:, 0])
        in_window = (window == 0) | (position[:, None] - key_positions < window)
        return decode_attention(q, ck, cv, key_valid & in_window, scale=config.attn_scale,
                                softcap=config.attn_softcap)

    def write(i, values, cache):
        k, v = _cache_rows(values, config)
        return tuple(c.at[i, rows, index].set(new[:, 0]) for c, new in zip(cache, (k, v)))

    x, cache = run_layers(params["layers"], config, x, position[:, None], config.n_layers, attend, write, cache)
    return lm_logits(params, config, x[:, 0]), cache


# ------------------------------------------------------------------------ choosing tokens


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy (argmax). Otherwise the
    logits are divided by the temperature, cut to the `top_k` largest (0: all) and then to
    the smallest set whose probability reaches `top_p` (1.0: all), in transformers' order
    (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper), and one token is drawn."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def sample_keys(seed: int, sample_ids, sample_index: int = 0) -> np.ndarray:
    """uint32 [n, 2] PRNG keys, one per sample, from (seed, sample id, sample index) alone:
    a rerun, a resumed chunk, another batch or mesh draws the same tokens for a sample."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), sample_index)
    ids = jnp.asarray(np.asarray(sample_ids, np.uint32))
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(ids))


def choose_tokens(logits: jax.Array, keys: jax.Array | None, step: jax.Array, sampling: Sampling) -> jax.Array:
    """The next token of each row: logits float32 [B, V], keys uint32 [B, 2], step [B] (the
    token's index in its row's generation, so each draw has its own stream) -> int32 [B].
    Raises ValueError when sampling without keys."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if keys is None:
        raise ValueError("sampling (temperature > 0) needs one PRNG key per row (sample_keys)")
    scaled = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(scaled, sampling.top_k)[0][:, -1:]  # [B, 1]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-scaled, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
        # Keep a token while the mass before it is below top_p: the first always stays.
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(order.shape[0])[:, None], order].set(keep_sorted)
        scaled = jnp.where(keep, scaled, -jnp.inf)
    draw = jax.vmap(lambda key, t, row: jax.random.categorical(jax.random.fold_in(key, t), row))
    return draw(keys, step, scaled).astype(jnp.int32)


# --------------------------------------------------------------------- the static batch


def generate(params: Params, token_ids: jax.Array, mask: jax.Array, stop_ids: jax.Array,
             keys: jax.Array | None = None, *, config: ModelConfig, max_new_tokens: int,
             sampling: Sampling = Sampling()):
    """Continuation of one static batch of left-padded prompts, every row until the last stops.

    token_ids, mask: [B, P] int32 (mask 1 = real token; every row's last column is real).
    stop_ids: [K] int32, the tokens that end a row (EOS, the chat end-of-turn token).
    keys: uint32 [B, 2] (sample_keys); may be None when greedy.
    Returns tokens [B, N] int32 (N = max_new_tokens; a row's stop token is included and
    followed by zeros), n_generated [B] int32 and stopped [B] bool (ended by a stop token).
    """
    # The same matmul precision as the capture forward: float32 decoding means float32 on
    # TPU/GPU too, so the tokens chosen match the recomputed activations' forward.
    with jax.default_matmul_precision(matmul_precision(params["embed"].dtype)):
        return _static(params, token_ids, mask, stop_ids, keys, config, max_new_tokens, sampling)


def _prompt_positions(mask: jax.Array) -> jax.Array:
    """Positions of left-padded prompts [B, P]: the first real token is 0."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def _static(params: Params, token_ids, mask, stop_ids, keys, config: ModelConfig, max_new_tokens: int,
            sampling: Sampling):
    batch, prompt_len = token_ids.shape
    logits, cache = prefill(params, config, token_ids, mask, prompt_len + max_new_tokens)
    n_prompt = mask.sum(axis=1).astype(jnp.int32)
    prompt_valid = mask.astype(bool)
    steps = jnp.arange(max_new_tokens)
    key_positions = jnp.concatenate([_prompt_positions(mask), n_prompt[:, None] + steps[None, :]], axis=1)  # [B, S]

    def cond(state):
        t, _, _, done, _, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, logits, cache, done, tokens, n_generated = state
        token = jnp.where(done, 0, choose_tokens(logits, keys, jnp.full(batch, t), sampling))
        tokens = tokens.at[:, t].set(token)
        n_generated = jnp.where(done, n_generated, t + 1)
        done = done | jnp.any(token[:, None] == stop_ids[None, :], axis=1)
        # Token t of every row sits at cache index P + t; finished rows keep computing
        # (fixed shapes), and their results are never read.
        key_valid = jnp.concatenate([prompt_valid, jnp.broadcast_to(steps <= t, (batch, max_new_tokens))], 1)
        logits, cache = decode_step(params, config, cache, token, n_prompt + t, jnp.full(batch, prompt_len + t),
                                    key_valid, key_positions)
        return t + 1, logits, cache, done, tokens, n_generated

    state = (jnp.int32(0), logits, cache, jnp.zeros(batch, bool),
             jnp.zeros((batch, max_new_tokens), jnp.int32), jnp.zeros(batch, jnp.int32))
    _, _, _, done, tokens, n_generated = jax.lax.while_loop(cond, body, state)
    return tokens, n_generated, done


def make_generate_fn(config: ModelConfig, max_new_tokens: int, sampling: Sampling = Sampling()) -> Callable:
    """Jitted fn(params, token_ids [B, P], mask [B, P], stop_ids [K], keys [B, 2] (None: greedy)) ->
    (tokens [B, N], n_generated [B], stopped [B]); compiles once per (B, P, K)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return jax.jit(functools.partial(generate, config=config, max_new_tokens=max_new_tokens, sampling=sampling))


# ------------------------------------------------------------------ continuous batching


class SlotStats(NamedTuple):
    """What a continuous run did (int32 scalars): decode steps, slot-steps that produced a
    wanted token (occupancy = busy / (steps * slots)), prompts prefilled, and the idle
    slot-steps split by cause: `waiting` (a free slot while the queue still held prompts:
    refill lag) and `drained` (a free slot after the queue ran out: the queue's tail).
    busy + waiting + drained = steps * slots."""

    steps: jax.Array
    busy: jax.Array
    prefills: jax.Array
    waiting: jax.Array
    drained: jax.Array


def continuous_generate(params: Params, token_ids: jax.Array, mask: jax.Array, stop_ids: jax.Array,
                        keys: jax.Array, n_real: jax.Array, *, config: ModelConfig, slots: int,
                        max_new_tokens: int, sampling: Sampling = Sampling()):
    """Decode a queue of left-padded prompts [Q, P] through `slots` decode slots.

    The first `n_real` (int32 scalar) rows are the prompts; the rest pad the queue to a
    length that compiles once (each needs one real token in its last column) and are
    never decoded.

    Each loop step first refills every free slot (a slot whose row stopped, or never held
    one) with the queue's next prompts: each prompt alone is prefilled (the work a prompt
    needs, no padding rows) into its slot's region of the KV cache; then every slot
    decodes one token. So slots stay busy until the queue runs out, instead of a static
    batch decoding until its longest answer ends. Shapes never change: one compile per
    (Q, P, slots).

    KV cache: one region per slot, [L, slots, P + N, Hkv, hd] for keys and values (see
    kv_cache_bytes(config, slots, P + N)): a slot's region is reused whole by its next
    prompt, so no paging is needed when every prompt of a queue shares its bucket length P.

    Returns (tokens [Q, N], n_generated [Q], stopped [Q], SlotStats): the same tokens, per
    prompt, as `generate` gives (greedy; sampled with the same keys).
    """
    with jax.default_matmul_precision(matmul_precision(params["embed"].dtype)):
        return _continuous(params, token_ids, mask, stop_ids, keys, n_real, config, slots, max_new_tokens,
                           sampling)


def _continuous(params, queue_ids, queue_mask, stop_ids, keys, n_real, config: ModelConfig, slots: int,
                max_new_tokens: int, sampling: Sampling):
    n_queue, prompt_len = queue_ids.shape
    length = prompt_len + max_new_tokens
    steps = jnp.arange(max_new_tokens)
    queue_positions = _prompt_positions(queue_mask)
    n_prompt_of = queue_mask.sum(axis=1).astype(jnp.int32)

    def refill(state):
        """The queue's next prompt into the first free slot: prefill it alone."""
        slot = jnp.argmax(state["free"])
        q = state["head"]
        ids = jax.lax.dynamic_index_in_dim(queue_ids, q, keepdims=True)  # [1, P]
        m = jax.lax.dynamic_index_in_dim(queue_mask, q, keepdims=True)
        logits, small = prefill(params, config, ids, m, length)  # cache [L, 1, P + N, ...]
        cache = tuple(c.at[:, slot].set(new[:, 0]) for c, new in zip(state["cache"], small))
        return state | {
            "cache": cache, "logits": state["logits"].at[slot].set(logits[0]),
            "owner": state["owner"].at[slot].set(q), "t": state["t"].at[slot].set(0),
            "free": state["free"].at[slot].set(False), "head": q + 1, "prefills": state["prefills"] + 1,
        }

    def cond(state):
        return (state["head"] < n_real) | ~jnp.all(state["free"])

    def body(state):
        # Every free slot takes a prompt before the step decodes (slots freed together by one
        # step are refilled together: none waits a step per other refill).
        state = jax.lax.while_loop(lambda s: jnp.any(s["free"]) & (s["head"] < n_real), refill, state)
        owner, t, active = state["owner"], state["t"], ~state["free"]
        idle = slots - jnp.sum(active).astype(jnp.int32)
        queued = state["head"] < n_real
        row = jnp.maximum(owner, 0)
        token = jnp.where(active, choose_tokens(state["logits"], keys[row], t, sampling), 0)
        stops = jnp.any(token[:, None] == stop_ids[None, :], axis=1)
        last = active & (stops | (t + 1 >= max_new_tokens))
        # Results land in the queue's rows; rows of free slots write to a scratch row Q.
        out_row = jnp.where(active, owner, n_queue)
        tokens = state["tokens"].at[out_row, jnp.minimum(t, max_new_tokens - 1)].set(token)
        n_generated = state["n_generated"].at[out_row].set(t + 1)
        stopped = state["stopped"].at[out_row].set(stops)
        prompt_valid = queue_mask[row].astype(bool)  # [slots, P]
        key_valid = jnp.concatenate([prompt_valid, steps[None, :] <= t[:, None]], axis=1)
        n_prompt = n_prompt_of[row]
        key_positions = jnp.concatenate([queue_positions[row], n_prompt[:, None] + steps[None, :]], axis=1)
        logits, cache = decode_step(params, config, state["cache"], token, n_prompt + t,
                                    prompt_len + jnp.minimum(t, max_new_tokens - 1), key_valid, key_positions)
        return state | {
            "cache": cache, "logits": logits, "t": t + 1, "free": state["free"] | last,
            "owner": jnp.where(last, -1, owner), "tokens": tokens, "n_generated": n_generated,
            "stopped": stopped, "steps": state["steps"] + 1, "busy": state["busy"] + jnp.sum(active),
            "waiting": state["waiting"] + jnp.where(queued, idle, 0),
            "drained": state["drained"] + jnp.where(queued, 0, idle),
        }

    # The first prompts fill every slot in one batched prefill (slots past the queue's
    # prompts prefill a padding row and stay free).
    take = np.minimum(np.arange(slots), n_queue - 1)
    logits, cache = prefill(params, config, queue_ids[take], queue_mask[take], length)
    first = jnp.minimum(slots, n_real).astype(jnp.int32)
    filled = jnp.arange(slots) < first
    state = {
        "cache": cache, "logits": logits,
        "owner": jnp.where(filled, jnp.arange(slots), -1).astype(jnp.int32), "t": jnp.zeros(slots, jnp.int32),
        "free": ~filled, "head": first,
        "tokens": jnp.zeros((n_queue + 1, max_new_tokens), jnp.int32),
        "n_generated": jnp.zeros(n_queue + 1, jnp.int32), "stopped": jnp.zeros(n_queue + 1, bool),
        "steps": jnp.int32(0), "busy": jnp.int32(0), "prefills": first,
        "waiting": jnp.int32(0), "drained": jnp.int32(0),
    }
    state = jax.lax.while_loop(cond, body, state)
    stats = SlotStats(*(state[k] for k in SlotStats._fields))
    return state["tokens"][:n_queue], state["n_generated"][:n_queue], state["stopped"][:n_queue], stats


def make_continuous_fn(config: ModelConfig, slots: int, max_new_tokens: int,
                       sampling: Sampling = Sampling()) -> Callable:
    """Jitted fn(params, token_ids [Q, P], mask [Q, P], stop_ids [K], keys [Q, 2], n_real) ->
    (tokens [Q, N], n_generated [Q], stopped [Q], SlotStats); one compile per (Q, P, K)."""
    if max_new_tokens < 1 or slots < 1:
        raise ValueError(f"max_new_tokens and slots must be >= 1, got {max_new_tokens}, {slots}")
    return jax.jit(functools.partial(continuous_generate, config=config, slots=slots,
                                     max_new_tokens=max_new_tokens, sampling=sampling))
