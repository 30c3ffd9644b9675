"""Tiny random checkpoints of every supported family, written by transformers itself.

Each family's config exercises what makes it that family: Llama 3's rope scaling, Mistral's
sliding window, Qwen2 with YaRN and with sliding layers, Gemma 2's soft-caps and
query_pre_attn_scalar, Gemma 3's q/k norms, per-layer-type RoPE and 5:1 (here 1:1)
pattern, Qwen3-MoE's and Mixtral's routed experts. Windows (16) and original context
lengths (32) are shorter than the test documents, so both are really exercised.
Every parameter is random and non-trivial (default init leaves biases at 0 and norms at
1, which hides bugs).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

WINDOW = 16
ORIGINAL_CONTEXT = 32

_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536,
              tie_word_embeddings=False)

# name -> (transformers class prefix, config overrides)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama3": ("Llama", dict(attention_bias=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=ORIGINAL_CONTEXT))),
    "mistral": ("Mistral", dict(sliding_window=WINDOW, head_dim=24)),
    "qwen2_yarn": ("Qwen2", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=ORIGINAL_CONTEXT))),
    "qwen2_sliding": ("Qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "gemma2": ("Gemma2", dict(head_dim=24, query_pre_attn_scalar=32, sliding_window=WINDOW,
                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                              tie_word_embeddings=True)),
    "gemma3": ("Gemma3Text", dict(head_dim=16, query_pre_attn_scalar=20, sliding_window=WINDOW,
                                  layer_types=["sliding_attention", "full_attention"],
                                  rope_parameters={
                                      "sliding_attention": dict(rope_type="default", rope_theta=1e4),
                                      "full_attention": dict(rope_type="linear", rope_theta=1e6, factor=8.0)},
                                  tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3Moe", dict(head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                   norm_topk_prob=True)),
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
}


def family_config(name: str, **overrides):
    prefix, extra = FAMILIES[name]
    config_class = getattr(transformers, f"{prefix}Config")
    return config_class(**(_SIZES | extra | overrides))


def random_family_model(name: str, seed: int = 0, scale: float = 0.08, **overrides):
    """A transformers CausalLM of family `name` with random, non-trivial parameters, eager attention."""
    prefix, _ = FAMILIES[name]
    model_class = getattr(transformers, f"{prefix.removesuffix('Text')}ForCausalLM")
    torch.manual_seed(seed)
    model = model_class._from_config(family_config(name, **overrides), attn_implementation="eager",
                                     dtype=torch.float32)
    gemma = name.startswith("gemma")
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:  # Gemma's gain is (1 + w): centre it at 0 there
                param.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(param))
            elif param_name.endswith("bias"):
                param.copy_(0.5 * torch.randn_like(param))
            elif param_name.endswith("gate.weight") and "experts" not in param_name:
                param.copy_(0.5 * torch.randn_like(param))  # a router with clear top-k choices
            else:
                param.copy_(scale * torch.randn_like(param))
    return model.eval()


def save_family(path: Path, name: str, seed: int = 0, scale: float = 0.08, **overrides):
    model = random_family_model(name, seed, scale, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    return model
