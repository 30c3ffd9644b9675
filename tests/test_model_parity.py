"""actex hook values vs transformers on the same random checkpoints and token ids."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from actex.model import load_model, make_capture_fn, parse_hooks
from model_fixtures import random_qwen2, reference_hooks, save_random_qwen2

F32_TOL = 1e-4  # max abs error / max abs value, every hook, float32 parameters
# bfloat16 parameters: both sides round every activation to 8 mantissa bits, in different
# places. Against transformers run in float32 on the same (bf16-valued) weights, actex's
# error must be no worse than 1.5x transformers-bf16's own: actex accumulates matmuls,
# norms, RoPE and softmax in float32, and all-bf16 math would be measurably worse.
BF16_VS_TORCH_BF16 = 1.5


def unpacked_inputs(token_ids):
    rows, seq = token_ids.shape
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq))
    return token_ids, positions, np.ones((rows, seq), np.int32)


def capture_all(path, token_ids, dtype="float32", **load_kwargs):
    loaded = load_model(path, dtype=dtype, **load_kwargs)
    n = loaded.config.n_layers
    hooks = parse_hooks(
        ["hook_embed", "ln_final.hook_normalized", "ln_final.hook_out"]
        + [f"blocks.{l}.{k}" for l in range(n) for k in (
            "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_post",
            "hook_mlp_out", "hook_resid_post")], n)
    out = make_capture_fn(loaded.config, hooks, "float32")(loaded.params, *unpacked_inputs(token_ids))
    return {name: np.asarray(value) for name, value in out.items()}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    assert actual.shape == expected.shape
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


def assert_close(actual: dict, expected: dict, tol: float):
    # Equality, not a subset: a hook that went missing on either side is a failure.
    assert sorted(actual) == sorted(expected)
    for name, value in actual.items():
        err = relative_error(value, expected[name])
        assert err <= tol, f"{name}: relative max error {err:.2e} > {tol:.0e}"


def tokens(rows, seq, vocab=256, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (rows, seq)).astype(np.int32)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2),
        dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4),
        dict(tie_word_embeddings=False, num_attention_heads=8, num_key_value_heads=1,
             hidden_size=64, rope_theta=1e6),
    ],
    ids=["untied-gqa2", "tied-mha", "untied-mqa8"],
)
def test_every_hook_matches_transformers_float32(tmp_path, overrides):
    model = save_random_qwen2(tmp_path, seed=1, **overrides)
    token_ids = tokens(2, 48)
    assert_close(capture_all(tmp_path, token_ids), reference_hooks(model, token_ids), F32_TOL)


def test_bfloat16_no_worse_than_transformers_bfloat16(tmp_path):
    model = save_random_qwen2(tmp_path, seed=2, dtype=torch.bfloat16)
    token_ids = tokens(2, 48, seed=2)
    actual = capture_all(tmp_path, token_ids, dtype=None)  # the checkpoint's bfloat16
    assert load_model(tmp_path).dtype == "bfloat16"
    torch_bf16 = reference_hooks(model, token_ids)
    exact = reference_hooks(model.float(), token_ids)  # the same bf16 weights, f32 math
    assert sorted(actual) == sorted(exact)
    for name in sorted(exact):
        ours, theirs = relative_error(actual[name], exact[name]), relative_error(torch_bf16[name], exact[name])
        # hook_embed is a lookup: exact on both sides (0 <= 0).
        assert ours <= BF16_VS_TORCH_BF16 * theirs, f"{name}: actex bf16 error {ours:.2e} vs transformers bf16 {theirs:.2e}"


def test_long_sequence_matches_transformers(tmp_path):
    # 8k tokens: many attention blocks, RoPE at large positions.
    model = save_random_qwen2(tmp_path, seed=3, num_hidden_layers=1, hidden_size=32,
                              num_attention_heads=2, num_key_value_heads=1,
                              intermediate_size=32)
    token_ids = tokens(1, 8192, seed=3)
    assert_close(capture_all(tmp_path, token_ids), reference_hooks(model, token_ids), F32_TOL)


def _random_params(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.2 if "norm" in name else 0.08
            param.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_llama_and_qwen3_flags_match_transformers(tmp_path, family):
    sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "llama":
        model = LlamaForCausalLM._from_config(LlamaConfig(**sizes), attn_implementation="eager")
    else:  # head_dim deliberately not hidden_size / heads, as in real Qwen3 configs
        model = Qwen3ForCausalLM._from_config(Qwen3Config(**sizes, head_dim=24),
                                              attn_implementation="eager")
    _random_params(model, seed=4).save_pretrained(tmp_path)
    token_ids = tokens(2, 32, seed=4)
    assert_close(capture_all(tmp_path, token_ids), reference_hooks(model, token_ids), F32_TOL)
