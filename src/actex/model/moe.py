"""A top-k routed mixture of gated-MLP experts (Qwen3-MoE, Mixtral).

Reference: transformers' Qwen3MoeSparseMoeBlock / MixtralSparseMoeBlock: router logits in
the activation dtype, softmax in float32, top-k, optionally renormalised (Mixtral always),
weights cast back, each chosen expert's output weighted and summed.

Only the chosen experts run: the tokens' (token, expert) pairs are sorted by expert and
each expert multiplies its contiguous run in one grouped matmul (`jax.lax.ragged_dot` on
TPU/GPU, MaxText's "megablox" idea; tiles of one expert each on CPU, where XLA computes a
ragged dot densely), so a 128-expert top-8 layer costs 8 experts per token, not 128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from actex.model.config import ModelConfig
from actex.model.ops import activation, dense


# Rows per tile of the CPU grouped matmul (below): big enough for matmul speed, small
# enough that padding each expert's rows to a whole tile costs little.
CPU_TILE = 64


def _grouped(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [N, in] (rows sorted by group) @ w[group] [G, in, out]: float32 accumulation.

    TPU and GPU run `jax.lax.ragged_dot` natively; XLA:CPU computes it densely over every
    group (128 experts cost 128x), so on CPU the rows go through `_tiled_grouped` instead.
    """
    if jax.default_backend() == "cpu":
        return _tiled_grouped(x, w, group_sizes).astype(x.dtype)
    y = jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _tiled_grouped(x: jax.Array, w: jax.Array, group_sizes: jax.Array, tile: int = CPU_TILE) -> jax.Array:
    """The grouped matmul as tiles of `tile` rows, each of one group: every group's rows are
    padded to whole tiles, and each tile multiplies by its group's weight alone, so the
    work is the rows' own plus at most one partial tile per group. Shapes are static:
    N + G * (tile - 1) padded rows, rounded up to tiles. Returns float32 [N, out]."""
    n, groups = x.shape[0], w.shape[0]
    n_tiles = -(-(n + groups * (tile - 1)) // tile)
    padded = -(-group_sizes // tile) * tile  # [G] rows each group occupies
    starts = jnp.cumsum(padded) - padded  # [G] first padded row of each group
    group_of = jnp.repeat(jnp.arange(groups), group_sizes, total_repeat_length=n)  # [N]
    first_row = jnp.cumsum(group_sizes) - group_sizes  # [G] first sorted row of each group
    slot = starts[group_of] + jnp.arange(n) - first_row[group_of]  # [N] padded row of each row
    rows = jnp.zeros((n_tiles * tile, x.shape[1]), x.dtype).at[slot].set(x)
    # Each tile's group: the last group starting at or before the tile (empty tiles: any).
    tile_group = jnp.clip(jnp.searchsorted(starts, jnp.arange(n_tiles) * tile, side="right") - 1, 0, groups - 1)

    def one_tile(args):
        block, group = args  # [tile, in], scalar
        return jnp.einsum("ti,io->to", block, w[group], preferred_element_type=jnp.float32)

    out = jax.lax.map(one_tile, (rows.reshape(n_tiles, tile, -1), tile_group))  # [tiles, tile, out]
    return out.reshape(n_tiles * tile, -1)[slot]


def route(p, x: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router of tokens x [N, D] -> (logits [N, E] in x's dtype, weights [N, k] in x's
    dtype, experts [N, k] int32)."""
    logits = dense(x, p["router"])  # [N, E]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, config.moe.top_k)  # [N, k]
    if config.moe.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return logits, weights.astype(x.dtype), experts.astype(jnp.int32)


def moe_mlp(p, h: jax.Array, config: ModelConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sparse MLP of normed input h [B, T, D] -> (output [B, T, D], {hook: value}).

    Hooks: `mlp.hook_router_logits` [B, T, E]. Per-expert activations have no single
    [tokens, width] tensor, so mlp.hook_pre / hook_post do not exist on these layers.
    """
    batch, seq, d = h.shape
    top_k, n_experts = config.moe.top_k, config.moe.n_experts
    x = h.reshape(-1, d)  # [N, D]
    logits, weights, experts = route(p, x, config)
    flat = experts.reshape(-1)  # [N * k]
    order = jnp.argsort(flat, stable=True)  # pairs grouped by expert
    group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)  # [E]
    xs = x[order // top_k]  # [N * k, D]: each pair's token
    hidden = activation(config.activation, _grouped(xs, p["we_gate"], group_sizes)) * _grouped(
        xs, p["we_up"], group_sizes)  # [N * k, Fe]
    ys = _grouped(hidden, p["we_down"], group_sizes)  # [N * k, D], in pair-sorted order
    per_choice = jnp.zeros_like(ys).at[order].set(ys).reshape(-1, top_k, d)  # [N, k, D]
    # transformers sums the weighted experts into a zero tensor of the activation dtype.
    out = jnp.sum((per_choice * weights[..., None]).astype(jnp.float32), axis=1).astype(h.dtype)
    return out.reshape(batch, seq, d), {"mlp.hook_router_logits": logits.reshape(batch, seq, n_experts)}
