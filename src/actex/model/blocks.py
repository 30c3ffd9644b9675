"""Decoder blocks, in the order of their architecture diagrams. Each returns its hook values.

References (transformers' eager implementations): LlamaDecoderLayer, Qwen2DecoderLayer,
Qwen3DecoderLayer (q/k norms), MistralDecoderLayer (sliding windows), Qwen3MoeDecoderLayer
and MixtralDecoderLayer (routed experts), Gemma2DecoderLayer and Gemma3DecoderLayer.

A block takes one layer's parameters `p` (weights [in, out]), the residual stream x
[B, T, D], the layer's scanned inputs and an `attend(q, k, v, window)` kernel, and returns
{hook kind: value} (model/hooks.py names the kinds), `hook_resid_post` included. It
computes every kind; under jit, kinds nobody captures are dead code and never run.

Hook meanings (TransformerLens's): `ln1.hook_normalized` / `ln2.hook_normalized` are the
norms' inputs divided by their RMS, before the gain; `attn.hook_q/k/v` the projections
(after Qwen3/Gemma 3 q/k norms, before RoPE), `attn.hook_rot_q/k` after RoPE; `attn.hook_z`
each head's attention output, flat [B, T, H * hd], the output projection's input;
`mlp.hook_in` the MLP's input (norm output with its gain: what a transcoder reads);
`mlp.hook_pre` the gate's pre-activation; `mlp.hook_post` act(gate) * up, the down
projection's input; `hook_attn_out` / `hook_mlp_out` what the block adds to the residual
stream (Gemma: after its post-norms).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from actex.model.config import ModelConfig
from actex.model.moe import moe_mlp
from actex.model.ops import activation, dense, rms_norm, rms_normalize
from actex.model.params import Params
from actex.model.rope import apply_rope

Hooks = dict[str, jax.Array]
Attend = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class LayerInputs(NamedTuple):
    """What differs between layers besides weights, chosen inside the layer scan."""

    cos: jax.Array  # float32 [B, T, 1, hd/2]: this layer type's RoPE table
    sin: jax.Array
    window: jax.Array | int  # int32 scalar (traced) or a static 0 = full attention


def _norm(x: jax.Array, weight: jax.Array, config: ModelConfig) -> jax.Array:
    return rms_norm(x, weight, config.rms_norm_eps, gemma=config.gemma)


def attention(p: Params, h: jax.Array, config: ModelConfig, layer: LayerInputs,
              attend: Attend) -> tuple[jax.Array, Hooks]:
    """Grouped-query self-attention of normed h [B, T, D] -> (o_proj output [B, T, D], hooks)."""
    batch, seq, _ = h.shape
    heads = lambda t: t.reshape(batch, seq, -1, config.head_dim)  # noqa: E731  [B, T, heads, hd]
    flat = lambda t: t.reshape(batch, seq, -1)  # noqa: E731  [B, T, heads * hd]
    q = heads(dense(h, p["wq"], p.get("bq")))  # [B, T, H, hd]
    k = heads(dense(h, p["wk"], p.get("bk")))  # [B, T, Hkv, hd]
    v = heads(dense(h, p["wv"], p.get("bv")))  # [B, T, Hkv, hd]
    if config.qk_norm:
        q, k = _norm(q, p["q_norm"], config), _norm(k, p["k_norm"], config)
    rot_q, rot_k = apply_rope(q, layer.cos, layer.sin), apply_rope(k, layer.cos, layer.sin)
    z = attend(rot_q, rot_k, v, layer.window)  # [B, T, H, hd]
    out = dense(flat(z), p["wo"], p.get("bo"))
    return out, {"attn.hook_q": flat(q), "attn.hook_k": flat(k), "attn.hook_v": flat(v),
                 "attn.hook_rot_q": flat(rot_q), "attn.hook_rot_k": flat(rot_k), "attn.hook_z": flat(z)}


def mlp(p: Params, h: jax.Array, config: ModelConfig) -> tuple[jax.Array, Hooks]:
    """Gated MLP (or routed experts) of normed h [B, T, D] -> (output [B, T, D], hooks)."""
    if config.moe is not None:
        return moe_mlp(p, h, config)
    pre = dense(h, p["w_gate"])  # [B, T, F]
    post = activation(config.activation, pre) * dense(h, p["w_up"])  # [B, T, F]
    return dense(post, p["w_down"]), {"mlp.hook_pre": pre, "mlp.hook_post": post}


def llama_block(p: Params, x: jax.Array, config: ModelConfig, layer: LayerInputs, attend: Attend) -> Hooks:
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""
    attn_out, attn_hooks = attention(p, _norm(x, p["attn_norm"], config), config, layer, attend)
    resid_mid = x + attn_out
    mlp_in = _norm(resid_mid, p["mlp_norm"], config)
    mlp_out, mlp_hooks = mlp(p, mlp_in, config)
    return _block_hooks(config, x, attn_out, resid_mid, mlp_in, mlp_out) | attn_hooks | mlp_hooks


def gemma_block(p: Params, x: jax.Array, config: ModelConfig, layer: LayerInputs, attend: Attend) -> Hooks:
    """Gemma 2/3: the same, with a norm after attention and after the MLP, before each residual add."""
    attn, attn_hooks = attention(p, _norm(x, p["attn_norm"], config), config, layer, attend)
    attn_out = _norm(attn, p["post_attn_norm"], config)
    resid_mid = x + attn_out
    mlp_in = _norm(resid_mid, p["mlp_norm"], config)  # pre_feedforward_layernorm
    out, mlp_hooks = mlp(p, mlp_in, config)
    mlp_out = _norm(out, p["post_mlp_norm"], config)
    return _block_hooks(config, x, attn_out, resid_mid, mlp_in, mlp_out) | attn_hooks | mlp_hooks


def _block_hooks(config: ModelConfig, x, attn_out, resid_mid, mlp_in, mlp_out) -> Hooks:
    eps = config.rms_norm_eps
    return {
        "ln1.hook_normalized": rms_normalize(x, eps),  # float32: cast once, when captured
        "hook_attn_out": attn_out,
        "hook_resid_mid": resid_mid,
        "ln2.hook_normalized": rms_normalize(resid_mid, eps),
        "mlp.hook_in": mlp_in,
        "hook_mlp_out": mlp_out,
        "hook_resid_post": resid_mid + mlp_out,
    }


def block_fn(config: ModelConfig) -> Callable[..., Hooks]:
    """The block of `config`'s family."""
    return gemma_block if config.gemma else llama_block
