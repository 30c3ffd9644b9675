"""A small random Qwen2 checkpoint in Hugging Face format, written with numpy only.

For `actex demo` and tests that must not need torch: config.json and model.safetensors
that transformers and actex both load. (The tokenizer is built elsewhere.) Tensor names
and shapes come from the same tables the loader checks against.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from actex.model.config import ModelConfig
from actex.model.params import global_param_axes, layer_param_axes
from actex.model.weights import SINGLE_FILE, hf_tensor_names

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def tiny_hf_config(
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    dtype: str = "float32",
) -> dict:
    """A config.json dict for a Qwen2ForCausalLM of the given sizes."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "use_sliding_window": False,
        "torch_dtype": dtype,
    }


def write_random_checkpoint(path, hf_config: dict | None = None, seed: int = 0) -> Path:
    """Write config.json + model.safetensors with N(0, 0.02) weights, unit-ish norms."""
    hf_config = hf_config or tiny_hf_config()
    config = ModelConfig.from_hf_config(hf_config)
    dtype = _NP_DTYPES[hf_config.get("torch_dtype", "float32")]
    rng = np.random.default_rng(seed)

    def sample(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if "norm" in name:  # RMSNorm scales near 1, as in trained models
            values = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            values = 0.02 * rng.standard_normal(shape)
        return values.astype(np.float32).astype(dtype)

    shapes = layer_param_axes(config) | global_param_axes(config)
    tensors = {}
    # Layer by layer, then the globals: the order the random values are drawn in.
    expected = hf_tensor_names(config, "model.")
    for hf_name, (name, layer, expert, transposed) in sorted(
            expected.items(), key=lambda item: (item[1][1] is None, item[1][1] or 0)):
        shape = shapes[name][0][1:] if expert is not None else shapes[name][0]
        tensors[hf_name] = sample(name, shape[::-1] if transposed else shape)
    global_shapes = global_param_axes(config)
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = sample("lm_head", global_shapes["embed"][0])

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})
    return path
