"""Random transformers Qwen2 models saved in HF format, and their reference hook values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def tiny_qwen2_config(**overrides) -> Qwen2Config:
    sizes = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return Qwen2Config(**(sizes | overrides))


def random_qwen2(config: Qwen2Config, seed: int = 0, dtype=torch.float32, scale: float = 0.08) -> Qwen2ForCausalLM:
    """A Qwen2ForCausalLM whose every parameter, biases and norm scales included, is random
    and non-trivial (default init leaves biases at 0 and norms at 1, hiding bugs).

    `scale`: std of the weight matrices. At the default, greedy decoding mostly repeats one
    token; 0.25 gives varied continuations, which decoding tests need."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="eager", dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_(scale * torch.randn_like(param))
    return model.eval()


def save_random_qwen2(path: Path, seed: int = 0, dtype=torch.float32, scale: float = 0.08, **overrides):
    model = random_qwen2(tiny_qwen2_config(**overrides), seed, dtype, scale)
    model.save_pretrained(path, safe_serialization=True)
    return model


def reference_hooks(model: Qwen2ForCausalLM, token_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every actex hook computed by transformers on [B, T] token ids (float32 numpy)."""
    layers = model.model.layers
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name, pick):
        return lambda module, args, output: captured.__setitem__(name, pick(args, output))

    for l, layer in enumerate(layers):
        handles += [
            layer.self_attn.register_forward_hook(
                keep(f"blocks.{l}.hook_attn_out", lambda a, o: o[0])),
            layer.mlp.register_forward_hook(keep(f"blocks.{l}.hook_mlp_out", lambda a, o: o)),
            layer.mlp.down_proj.register_forward_hook(
                keep(f"blocks.{l}.mlp.hook_post", lambda a, o: a[0])),
            layer.register_forward_hook(
                keep(f"blocks.{l}.hook_resid_post",
                     lambda a, o: o[0] if isinstance(o, tuple) else o)),
        ]
    with torch.inference_mode():
        out = model(torch.as_tensor(token_ids, dtype=torch.long), output_hidden_states=True)
    for handle in handles:
        handle.remove()
    hidden = out.hidden_states
    captured["hook_embed"] = hidden[0]
    for l in range(len(layers)):
        captured[f"blocks.{l}.hook_resid_pre"] = hidden[l]
        captured[f"blocks.{l}.hook_resid_mid"] = (
            hidden[l] + captured[f"blocks.{l}.hook_attn_out"])
    # TransformerLens's ln_final.hook_normalized is the final norm before its gain:
    # x / sqrt(mean(x^2) + eps) of the last block's output; HF's last hidden state (after
    # the gain) is actex's ln_final.hook_out.
    last = captured[f"blocks.{len(layers) - 1}.hook_resid_post"].float()
    eps = model.model.norm.variance_epsilon
    captured["ln_final.hook_normalized"] = last * torch.rsqrt(last.pow(2).mean(-1, keepdim=True) + eps)
    captured["ln_final.hook_out"] = hidden[-1]
    return {name: value.float().numpy() for name, value in captured.items()}
