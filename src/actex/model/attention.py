"""Memory-bounded causal + segment attention: blockwise online softmax.

A packed row holds several samples; `segment_ids` numbers them (0 = padding) and a query
sees a key only if both are in the same segment and the key is not later in the row.
Scores are computed one [q_block, kv_block] tile at a time with a running max and sum
(the FlashAttention recurrence), so memory is O(seq * block), never O(seq^2): a 32k-token
prompt needs a few tens of MB of scores, not the 60 GB a full score tensor would take.

Key blocks that no query of a query block can see are skipped: those after it (causal)
and those before the start of its first segment (segments are contiguous runs of equal
ids, as packing produces them). A row holding one long sample thus costs half the full
square, and a row packed with short samples costs little more than the samples alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Large enough that a q tile and its score tiles stay in a CPU core's L2/L3 while the
# matmuls stay big enough to run near peak; measured in bench/forward.py.
DEFAULT_BLOCK = 512

# Finite "minus infinity": a fully masked tile then gives exp(0) * 0 instead of NaN.
_NEG = -1e30


def _segment_starts(segment_ids: jax.Array) -> jax.Array:
    """Index of the first token of each token's segment run. [B, T] -> [B, T]."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    boundary = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
        axis=1,
    )
    return jax.lax.cummax(jnp.where(boundary, index, 0), axis=1)


def attention(
    q: jax.Array,  # [B, T, H, hd]
    k: jax.Array,  # [B, T, Hkv, hd]
    v: jax.Array,  # [B, T, Hkv, hd]
    segment_ids: jax.Array,  # [B, T] int32
    block: int = DEFAULT_BLOCK,
) -> jax.Array:  # [B, T, H, hd], in q's dtype
    """Causal, segment-masked grouped-query attention, one tile of scores at a time."""
    batch, seq, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    scale = head_dim**-0.5

    block = min(block, seq)
    n_blocks = -(-seq // block)
    pad = n_blocks * block - seq
    if pad:
        # Padded keys get segment -1, which no real query has; padded queries are dropped.
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)

    # Head-major layouts make every tile product one batched matmul over (B, Hkv).
    qh = q.reshape(batch, -1, n_kv, group, head_dim).transpose(0, 2, 3, 1, 4)  # [B,Hkv,G,Tp,hd]
    kh = k.transpose(0, 2, 1, 3)  # [B, Hkv, Tp, hd]
    vh = v.transpose(0, 2, 1, 3)  # [B, Hkv, Tp, hd]

    # First key block any query of each query block can see (earliest segment start).
    first_tokens = _segment_starts(segment_ids)[:, ::block]  # [B, n_blocks]
    kv_first = (jnp.min(first_tokens, axis=0) // block).astype(jnp.int32)  # [n_blocks]
    positions = jnp.arange(n_blocks * block, dtype=jnp.int32)

    def query_block(qi):
        q_tile = jax.lax.dynamic_slice_in_dim(qh, qi * block, block, axis=3)  # [B,Hkv,G,bq,hd]
        q_seg = jax.lax.dynamic_slice_in_dim(segment_ids, qi * block, block, axis=1)  # [B,bq]
        q_pos = jax.lax.dynamic_slice_in_dim(positions, qi * block, block)  # [bq]

        def key_block(kj, state):
            m, l, acc = state  # [B,Hkv,G,bq], [B,Hkv,G,bq], [B,Hkv,G,bq,hd] (float32)
            k_tile = jax.lax.dynamic_slice_in_dim(kh, kj * block, block, axis=2)  # [B,Hkv,bk,hd]
            v_tile = jax.lax.dynamic_slice_in_dim(vh, kj * block, block, axis=2)
            k_seg = jax.lax.dynamic_slice_in_dim(segment_ids, kj * block, block, axis=1)
            k_pos = jax.lax.dynamic_slice_in_dim(positions, kj * block, block)
            visible = (q_seg[:, :, None] == k_seg[:, None, :]) & (
                q_pos[:, None] >= k_pos[None, :]
            )  # [B, bq, bk]
            visible = visible[:, None, None]  # [B, 1, 1, bq, bk]
            scores = jnp.einsum(
                "bhgqd,bhkd->bhgqk", q_tile, k_tile, preferred_element_type=jnp.float32
            ) * scale
            m_new = jnp.maximum(m, jnp.max(jnp.where(visible, scores, _NEG), axis=-1))
            p = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            l = l * correction + jnp.sum(p, axis=-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bhgqk,bhkd->bhgqd", p.astype(v_tile.dtype), v_tile,
                preferred_element_type=jnp.float32,
            )
            return m_new, l, acc

        stats_shape = (batch, n_kv, group, block)
        init = (
            jnp.full(stats_shape, _NEG, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32),
        )
        # Causal: key blocks after this query block are never visited.
        _, l, acc = jax.lax.fori_loop(kv_first[qi], qi + 1, key_block, init)
        return (acc / l[..., None]).astype(q.dtype)  # [B,Hkv,G,bq,hd]

    out = jax.lax.map(query_block, jnp.arange(n_blocks))  # [nb, B, Hkv, G, bq, hd]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, n_blocks * block, n_heads, head_dim)
    return out[:, :seq]
