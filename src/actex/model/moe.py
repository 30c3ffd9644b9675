"""A top-k routed mixture of gated-MLP experts (Qwen3-MoE, Mixtral).

Reference: transformers' Qwen3MoeSparseMoeBlock / MixtralSparseMoeBlock: router logits in
the activation dtype, softmax in float32, top-k, optionally renormalised (Mixtral always),
weights cast back, each chosen expert's output weighted and summed.

Only the chosen experts run: the tokens' (token, expert) pairs are sorted by expert and
each expert multiplies its contiguous run in one grouped matmul (`jax.lax.ragged_dot`,
MaxText's "megablox" idea), so a 128-expert top-8 layer costs 8 experts per token, not 128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from actex.model.config import ModelConfig
from actex.model.ops import activation, dense


def _grouped(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [N, in] (rows sorted by group) @ w[group] [G, in, out]: float32 accumulation."""
    y = jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


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
