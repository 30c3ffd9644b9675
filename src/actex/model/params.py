"""The parameter tree of every family: names, shapes and logical axes.

Parameters are a dict of arrays: the globals (`embed`, `final_norm`, for generation
`lm_head`) and `layers`, whose arrays are stacked on a leading layer axis so the blocks
run as one `lax.scan`. Weights are stored [in, out]. weights.py loads this tree, mesh.py
shards it (axes.AXIS_RULES), the blocks read it.
"""

from __future__ import annotations

from typing import Any

from actex.model.config import ModelConfig

Params = dict[str, Any]
Shapes = dict[str, tuple[tuple[int, ...], tuple[str, ...]]]


def layer_param_axes(config: ModelConfig) -> Shapes:
    """One decoder block's parameters: name -> (shape, logical axes)."""
    d, f, hd = config.d_model, config.d_mlp, config.head_dim
    q_width, kv_width = config.n_heads * hd, config.n_kv_heads * hd
    axes: Shapes = {
        "attn_norm": ((d,), ("embed",)),
        "wq": ((d, q_width), ("embed", "heads")),
        "wk": ((d, kv_width), ("embed", "kv_heads")),
        "wv": ((d, kv_width), ("embed", "kv_heads")),
        "wo": ((q_width, d), ("heads", "embed")),
        "mlp_norm": ((d,), ("embed",)),
    }
    if config.qkv_bias:
        axes |= {"bq": ((q_width,), ("heads",)), "bk": ((kv_width,), ("kv_heads",)),
                 "bv": ((kv_width,), ("kv_heads",))}
    if config.o_bias:
        axes["bo"] = ((d,), ("embed",))
    if config.qk_norm:
        axes |= {"q_norm": ((hd,), ("head_dim",)), "k_norm": ((hd,), ("head_dim",))}
    if config.gemma:
        axes |= {"post_attn_norm": ((d,), ("embed",)), "post_mlp_norm": ((d,), ("embed",))}
    if config.moe is None:
        axes |= {"w_gate": ((d, f), ("embed", "mlp")), "w_up": ((d, f), ("embed", "mlp")),
                 "w_down": ((f, d), ("mlp", "embed"))}
    else:
        e, fe = config.moe.n_experts, config.moe.d_expert
        axes |= {
            "router": ((d, e), ("embed", "experts")),
            "we_gate": ((e, d, fe), ("experts", "embed", "expert_mlp")),
            "we_up": ((e, d, fe), ("experts", "embed", "expert_mlp")),
            "we_down": ((e, fe, d), ("experts", "expert_mlp", "embed")),
        }
    return axes


def global_param_axes(config: ModelConfig) -> Shapes:
    """Parameters outside the blocks. The LM head is loaded only for generation."""
    return {
        "embed": ((config.vocab_size, config.d_model), ("vocab", "embed")),
        "final_norm": ((config.d_model,), ("embed",)),
    }


def stacked_layers(params: Params) -> int:
    """How many decoder blocks `params` holds (0 when only embeddings were loaded)."""
    layers = params["layers"]
    return next(iter(layers.values())).shape[0] if layers else 0
