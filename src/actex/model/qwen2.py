"""The Qwen2 / Qwen2.5 decoder in JAX, returning hook activations instead of logits.

Numerical reference: transformers' `Qwen2ForCausalLM` (modeling_qwen2.py) with eager
attention. Like it, activations between operations are kept in the parameter dtype; unlike
it, every matmul accumulates in float32 (`preferred_element_type`) and norms, RoPE and
softmax run in float32. tests/test_model_parity.py holds the measured agreement.

Also covered by two flags, without touching the Qwen2 path:
  * Llama / Mistral (`qkv_bias=False`): same block, no q/k/v biases.
  * Qwen3 (`qk_norm=True`): RMSNorm over each head's q and k before RoPE, head_dim from
    the config.

Parameters are a dict of arrays; the decoder blocks' are stacked on a leading layer axis
so the blocks run as one `lax.scan` (one compiled block, whatever the depth).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, ValidationError

from actex.model.attention import attention
from actex.model.hooks import HOOK_EMBED, HOOK_LN_FINAL, HOOK_LN_FINAL_OUT, layers_needed, parse_hook

Params = dict[str, Any]

_SUPPORTED_TYPES = {"qwen2", "qwen3", "llama", "mistral"}


class _HfFields(BaseModel):
    """Types of the config.json fields the model reads (strict: "four" is not 4)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model_type: str = "qwen2"
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    intermediate_size: PositiveInt
    hidden_act: str = "silu"
    rms_norm_eps: PositiveFloat = 1e-6
    rope_theta: PositiveFloat = 10000.0
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None
    tie_word_embeddings: bool | None = None
    attention_bias: bool | None = None
    mlp_bias: bool | None = None
    use_sliding_window: bool | None = None
    torch_dtype: str | None = None
    dtype: str | None = None


def _check_field_types(hf: dict) -> None:
    """One-line ValueError naming the first wrong-typed or missing field."""
    try:
        _HfFields.model_validate(hf)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if "rope_theta" in rope:
            _HfFields.model_validate({**hf, "rope_theta": rope["rope_theta"]})
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        got = "" if first["type"] == "missing" else f", got {first['input']!r}"
        raise ValueError(f"field {field}: {first['msg']}{got}") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool = True
    qk_norm: bool = False
    model_type: str = "qwen2"
    dtype: str = "float32"  # the checkpoint's dtype (config.json torch_dtype / dtype)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf_config(cls, hf: dict) -> ModelConfig:
        """Build from a config.json dict; refuse what this model would compute wrongly.

        Errors are one-line ValueErrors naming the field ("field num_hidden_layers: ...");
        callers that know the file prefix its path (weights.read_model_config).
        """
        model_type = hf.get("model_type", "qwen2")
        if model_type not in _SUPPORTED_TYPES:
            raise ValueError(
                f"model_type {model_type!r} not supported; "
                f"expected one of {sorted(_SUPPORTED_TYPES)}"
            )
        _check_field_types(hf)
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} not supported (silu)")
        if hf.get("use_sliding_window") or (
            model_type == "mistral" and hf.get("sliding_window") is not None
        ):
            raise ValueError("sliding-window attention is not supported")
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        # transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} not supported (default)")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        n_heads = hf["num_attention_heads"]
        n_kv_heads = hf.get("num_key_value_heads") or n_heads
        if n_heads % n_kv_heads:
            raise ValueError(
                f"num_attention_heads {n_heads} not a multiple of "
                f"num_key_value_heads {n_kv_heads}"
            )
        qkv_bias = True if model_type == "qwen2" else bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            d_mlp=hf["intermediate_size"],
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=model_type == "qwen3",
            model_type=model_type,
            dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
        )


# Logical axis names of every parameter: shapes for weights.py, sharding for mesh.py.
def layer_param_axes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """One decoder block's parameters: name -> (shape, logical axes). Weights are [in, out]."""
    d, f = config.d_model, config.d_mlp
    q_width, kv_width = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    axes = {
        "attn_norm": ((d,), ("embed",)),
        "wq": ((d, q_width), ("embed", "heads")),
        "wk": ((d, kv_width), ("embed", "kv_heads")),
        "wv": ((d, kv_width), ("embed", "kv_heads")),
        "wo": ((q_width, d), ("heads", "embed")),
        "mlp_norm": ((d,), ("embed",)),
        "w_gate": ((d, f), ("embed", "mlp")),
        "w_up": ((d, f), ("embed", "mlp")),
        "w_down": ((f, d), ("mlp", "embed")),
    }
    if config.qkv_bias:
        axes |= {
            "bq": ((q_width,), ("heads",)),
            "bk": ((kv_width,), ("kv_heads",)),
            "bv": ((kv_width,), ("kv_heads",)),
        }
    if config.qk_norm:
        axes |= {"q_norm": ((config.head_dim,), ("head_dim",)),
                 "k_norm": ((config.head_dim,), ("head_dim",))}
    return axes


def global_param_axes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Parameters outside the blocks. The LM head is never computed, so never loaded."""
    return {
        "embed": ((config.vocab_size, config.d_model), ("vocab", "embed")),
        "final_norm": ((config.d_model,), ("embed",)),
    }


# ---------------------------------------------------------------------------- the math


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x @ w (+ b): inputs in the parameter dtype, float32 accumulation, result in x's dtype."""
    y = jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32 (RMSNorm before its gain)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32; the scale multiplies in x's dtype, as in transformers."""
    return weight * rms_normalize(x, eps).astype(x.dtype)


def matmul_precision(dtype) -> str | None:
    """The matmul precision that makes `dtype` compute mean that dtype on every backend.

    JAX's default lets TPUs multiply float32 operands in one bfloat16 pass and GPUs use
    TF32 (10-bit mantissa), so a float32 forward would agree with float32 references only
    to ~1e-3. "highest" asks for true float32 (several bf16 passes on TPU, no TF32 on GPU;
    see docs/benchmarks.md for the cost). CPUs always compute float32 matmuls in float32,
    so their results are the same either way. bfloat16 inputs keep the default.
    """
    return "highest" if jnp.dtype(dtype) == jnp.float32 else None


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of the rotary angles, float32 [B, T, 1, head_dim/2] (broadcast over heads)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (first half, second half) pairs of each head, as transformers' rotate_half."""
    x32 = x.astype(jnp.float32)  # [B, T, heads, hd]
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def project_qkv(p: Params, h: jax.Array, config: ModelConfig, rope) -> tuple[jax.Array, ...]:
    """Queries [B, T, H, hd] and keys, values [B, T, Hkv, hd] of normed input h [B, T, D],
    with q/k norms (Qwen3) and RoPE applied."""
    batch, seq, _ = h.shape
    heads = lambda t: t.reshape(batch, seq, -1, config.head_dim)  # noqa: E731
    q = heads(dense(h, p["wq"], p.get("bq")))  # [B, T, H, hd]
    k = heads(dense(h, p["wk"], p.get("bk")))  # [B, T, Hkv, hd]
    v = heads(dense(h, p["wv"], p.get("bv")))  # [B, T, Hkv, hd]
    if config.qk_norm:
        q = rms_norm(q, p["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], config.rms_norm_eps)
    return apply_rope(q, *rope), apply_rope(k, *rope), v


def block(p: Params, x: jax.Array, config: ModelConfig, rope, segment_ids,
          attend=None) -> dict[str, jax.Array]:
    """One decoder block; returns its hook values (keyed by hook suffix), resid_post last.

    Grouped-query attention with q/k/v biases and no output bias. `attend(q, k, v)` ->
    [B, T, H, hd] replaces the default causal segment attention over this call's own
    tokens: KV-cached decoding (model/generate.py) attends over its cache instead.
    """
    batch, seq, _ = x.shape
    q, k, v = project_qkv(p, rms_norm(x, p["attn_norm"], config.rms_norm_eps), config, rope)
    out = attention(q, k, v, segment_ids) if attend is None else attend(q, k, v)  # [B, T, H, hd]
    attn_out = dense(out.reshape(batch, seq, -1), p["wo"])  # [B, T, D]
    resid_mid = x + attn_out
    h = rms_norm(resid_mid, p["mlp_norm"], config.rms_norm_eps)
    mlp_post = jax.nn.silu(dense(h, p["w_gate"])) * dense(h, p["w_up"])  # [B, T, F]
    mlp_out = dense(mlp_post, p["w_down"])
    return {
        "hook_attn_out": attn_out,
        "hook_resid_mid": resid_mid,
        "mlp.hook_post": mlp_post,
        "hook_mlp_out": mlp_out,
        "hook_resid_post": resid_mid + mlp_out,
    }


# ------------------------------------------------------------------- forward with hooks


def _capture_slots(hooks: tuple[str, ...], config: ModelConfig) -> dict[str, dict[int, str]]:
    """Per block hook suffix: {layer: hook name}. resid_pre of block l > 0 is resid_post
    of block l - 1 (the same tensor), so it is taken there and never stored twice."""
    slots: dict[str, dict[int, str]] = {}
    for name in hooks:
        point = parse_hook(name, config.n_layers)
        if point.layer is None or (point.kind == "hook_resid_pre" and point.layer == 0):
            continue
        kind, layer = point.kind, point.layer
        if kind == "hook_resid_pre":
            kind, layer = "hook_resid_post", layer - 1
        slots.setdefault(kind, {}).setdefault(layer, name)
    return slots


def forward(
    params: Params,
    config: ModelConfig,
    token_ids: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32, restarting at 0 for every segment
    segment_ids: jax.Array,  # [B, T] int32, 0 = padding
    hooks: tuple[str, ...],
    out_dtype=None,
) -> dict[str, jax.Array]:
    """Run the decoder just deep enough for `hooks`; return {hook: [B, T, width]}.

    Values are cast to `out_dtype` (default: the parameter dtype) as they are captured.
    Matmuls run at `matmul_precision(parameter dtype)` (float32 means float32 on TPU/GPU).
    """
    with jax.default_matmul_precision(matmul_precision(params["embed"].dtype)):
        return _forward(params, config, token_ids, positions, segment_ids, hooks, out_dtype)


def stacked_layers(params: Params) -> int:
    """How many decoder blocks `params` holds (0 when only embeddings were loaded)."""
    layers = params["layers"]
    return next(iter(layers.values())).shape[0] if layers else 0


def _forward(params, config, token_ids, positions, segment_ids, hooks, out_dtype):
    x = params["embed"][token_ids]  # [B, T, D]
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
    slots = _capture_slots(hooks, config)
    if n_run:
        rope = rope_angles(positions, config.head_dim, config.rope_theta)
        x, stacks = _run_blocks(params["layers"], config, x, rope, segment_ids, n_run, slots,
                                out_dtype)
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
            captured[name] = rms_normalize(x, config.rms_norm_eps).astype(out_dtype)
        elif point.kind == HOOK_LN_FINAL_OUT:
            captured[name] = rms_norm(x, params["final_norm"], config.rms_norm_eps).astype(
                out_dtype)
    return {name: captured[name] for name in hooks}


def _run_blocks(layers, config, x, rope, segment_ids, n_run, slots, out_dtype):
    """Scan blocks 0..n_run-1, writing each wanted hook value into a stacked buffer.

    Each hook kind gets a buffer [n_wanted + 1, B, T, W]; block i writes slot
    slot_of[i], and blocks nobody asked for write the spare last slot, so one compiled
    block body serves any layer selection. Layer weights are indexed inside the body,
    not sliced beforehand: slicing stacked weights under jit copies all of them.
    """
    batch, seq, _ = x.shape
    slot_of, buffers = {}, {}
    for kind, by_layer in slots.items():
        wanted = sorted(by_layer)
        table = [wanted.index(i) if i in wanted else len(wanted) for i in range(n_run)]
        slot_of[kind] = jnp.asarray(table, jnp.int32)
        width = config.d_mlp if kind == "mlp.hook_post" else config.d_model
        buffers[kind] = jnp.zeros((len(wanted) + 1, batch, seq, width), out_dtype)

    def body(carry, i):
        x, buffers = carry
        p = jax.tree.map(lambda w: w[i], layers)
        values = block(p, x, config, rope, segment_ids)
        buffers = {
            kind: jax.lax.dynamic_update_index_in_dim(
                buf, values[kind].astype(out_dtype), slot_of[kind][i], axis=0)
            for kind, buf in buffers.items()
        }
        return (values["hook_resid_post"], buffers), None

    (x, buffers), _ = jax.lax.scan(body, (x, buffers), jnp.arange(n_run))
    return x, {kind: buf[:-1] for kind, buf in buffers.items()}
