"""actex.model.rope against transformers' own rotary embeddings.

Every rope type is built the way transformers builds it: a real family's configuration
class (LlamaConfig, Qwen2Config, Gemma3TextConfig) fed the rope settings, its
RotaryEmbedding module's inv_freq / attention_scaling, and its forward's cos/sin at
positions up to 40k. actex reads the config.json spellings of the same settings.
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Gemma3TextConfig, Gemma3TextModel, LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from actex.model.rope import FULL, SLIDING, Rope, apply_rope, hf_ropes, rope_angles, rope_from_hf

MAX_POSITIONS = 65536  # max_position_embeddings: 'dynamic' is exact below it
HEAD_DIM = 16  # tiny; realistic sizes in test_realistic_head_dims
RNG = np.random.default_rng(0)
# [2, 1000] positions up to 40k: a strided row and a random one.
POSITIONS = np.stack([np.arange(0, 40000, 40), np.sort(RNG.integers(0, 40000, 1000))]).astype(np.int32)

FAMILIES = {"llama": (LlamaConfig, LlamaRotaryEmbedding), "qwen2": (Qwen2Config, Qwen2RotaryEmbedding)}

# id -> (family, theta, rope fields in config.json's legacy rope_scaling form)
CASES = {
    "default": ("qwen2", 1e6, None),
    "linear": ("llama", 10000.0, {"rope_type": "linear", "factor": 8.0}),
    "linear-legacy-type-key": ("llama", 10000.0, {"type": "linear", "factor": 2.5}),
    "dynamic": ("qwen2", 1e6, {"rope_type": "dynamic", "factor": 4.0}),
    "yarn": ("qwen2", 1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
    "yarn-no-truncate": ("qwen2", 1e6, {"rope_type": "yarn", "factor": 4.0, "truncate": False,
                                        "original_max_position_embeddings": 4096}),
    "yarn-attention-factor": ("llama", 500000.0, {"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.25,
                                                  "original_max_position_embeddings": 8192}),
    "yarn-mscale-betas": ("llama", 10000.0, {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0,
                                             "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2,
                                             "original_max_position_embeddings": 4096}),
    # no original_max_position_embeddings: transformers falls back to max_position_embeddings
    "yarn-original-from-max": ("qwen2", 1e6, {"rope_type": "yarn", "factor": 2.0}),
    "llama3": ("llama", 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3-int-fields": ("llama", 500000, {"rope_type": "llama3", "factor": 32, "low_freq_factor": 1,
                                            "high_freq_factor": 4, "original_max_position_embeddings": 4096}),
}


def legacy_json(family, theta, scaling, head_dim=HEAD_DIM, **extra):
    """A pre-transformers-5 config.json's rope fields: top-level rope_theta + rope_scaling."""
    hf = {"model_type": family, "rope_theta": theta, "max_position_embeddings": MAX_POSITIONS,
          "head_dim": head_dim, "hidden_size": 2 * head_dim, "num_attention_heads": 2, **extra}
    return hf | ({"rope_scaling": dict(scaling)} if scaling else {})


def hf_module(family, theta, scaling, head_dim=HEAD_DIM, **extra):
    """transformers' config (from the legacy spelling) and its family's RotaryEmbedding."""
    config_class, rotary_class = FAMILIES[family]
    hf = legacy_json(family, theta, scaling, head_dim, **extra)
    hf.pop("model_type")
    config = config_class(**hf)
    return config, rotary_class(config)


def hf_cos_sin(module, positions, *layer_type):
    """transformers' forward: cos, sin float32 [B, T, head_dim] (halves repeated)."""
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = module(x, torch.from_numpy(positions.astype(np.int64)), *layer_type)
    return cos.numpy(), sin.numpy()


def assert_matches_hf(rope, inv_freq, attention_scaling, module, positions=POSITIONS, *layer_type):
    """Same table bit for bit, same scaling, cos/sin equal to transformers' to rtol 1e-6."""
    np.testing.assert_array_equal(np.asarray(rope.inv_freq, np.float32), inv_freq.numpy())
    assert rope.attention_scaling == attention_scaling
    cos, sin = rope_angles(jnp.asarray(positions), rope)
    hf_cos, hf_sin = hf_cos_sin(module, positions, *layer_type)
    half = len(rope.inv_freq)
    assert cos.shape == sin.shape == (*positions.shape, 1, half) and cos.dtype == jnp.float32
    for ours, theirs in ((cos, hf_cos), (sin, hf_sin)):
        np.testing.assert_array_equal(theirs[..., :half], theirs[..., half:])
        np.testing.assert_allclose(np.asarray(ours)[:, :, 0], theirs[..., :half], rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_each_rope_type_matches_transformers(case):
    family, theta, scaling = CASES[case]
    config, module = hf_module(family, theta, scaling)
    rope = hf_ropes(legacy_json(family, theta, scaling), HEAD_DIM)[FULL]
    assert_matches_hf(rope, module.inv_freq, module.attention_scaling, module)
    dynamic = (scaling or {}).get("rope_type") == "dynamic"
    assert rope.max_exact_positions == (MAX_POSITIONS if dynamic else None)


@pytest.mark.parametrize("case", CASES)
def test_both_config_spellings_parse_to_the_same_rope(case):
    """transformers 5's own serialisation (to_dict: rope_parameters, rope_theta inside it)
    reads as the legacy rope_theta + rope_scaling file does, as does rope_from_hf's dict."""
    family, theta, scaling = CASES[case]
    config, _ = hf_module(family, theta, scaling)
    written = config.to_dict()
    assert "rope_scaling" not in written and "rope_theta" not in written
    legacy = hf_ropes(legacy_json(family, theta, scaling), HEAD_DIM)
    assert hf_ropes({"model_type": family, **written}, HEAD_DIM) == legacy
    assert legacy[FULL] is legacy[SLIDING]  # one table for the non-Gemma-3 families
    direct = rope_from_hf(written["rope_parameters"], theta=12345.0, head_dim=HEAD_DIM,
                          max_position_embeddings=MAX_POSITIONS)
    assert direct == legacy[FULL]


def test_dynamic_is_exact_only_below_max_position_embeddings():
    """At a position >= max_position_embeddings transformers recomputes its table (NTK):
    max_exact_positions says where actex's fixed table stops matching."""
    scaling = {"rope_type": "dynamic", "factor": 4.0}
    _, module = hf_module("llama", 10000.0, scaling, max_position_embeddings=4096)
    rope = hf_ropes(legacy_json("llama", 10000.0, scaling) | {"max_position_embeddings": 4096}, HEAD_DIM)[FULL]
    assert rope.max_exact_positions == 4096
    inside = np.arange(4096, dtype=np.int32)[None]
    assert_matches_hf(rope, module.inv_freq, 1.0, module, inside)
    beyond = np.arange(8192, dtype=np.int32)[None]
    cos, _ = rope_angles(jnp.asarray(beyond), rope)
    hf_cos, _ = hf_cos_sin(module, beyond)
    assert not np.allclose(np.asarray(cos)[0, :, 0], hf_cos[0, :, :HEAD_DIM // 2], rtol=1e-3)


def test_top_level_original_max_position_embeddings_wins_for_yarn():
    """transformers 5 prefers a top-level original_max_position_embeddings to the rope dict's."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    _, module = hf_module("llama", 10000.0, scaling, original_max_position_embeddings=2048)
    hf = legacy_json("llama", 10000.0, scaling, original_max_position_embeddings=2048)
    rope = hf_ropes(hf, HEAD_DIM)[FULL]
    assert_matches_hf(rope, module.inv_freq, module.attention_scaling, module)
    assert rope != hf_ropes(legacy_json("llama", 10000.0, scaling), HEAD_DIM)[FULL]


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("case", ["default", "linear", "yarn", "yarn-mscale-betas", "llama3"])
def test_realistic_head_dims(case, head_dim):
    """At real head sizes torch's float32 pow (not correctly rounded) can put an entry 1 ulp
    from actex's correctly rounded power (2 ulps after YaRN's 1 / (factor * p)): the table
    agrees to rtol 1e-6, and given the same table cos/sin agree to rtol 1e-6 at 40k."""
    family, theta, scaling = CASES[case]
    _, module = hf_module(family, theta, scaling, head_dim=head_dim)
    rope = hf_ropes(legacy_json(family, theta, scaling, head_dim=head_dim), head_dim)[FULL]
    ours, theirs = np.asarray(rope.inv_freq, np.float32), module.inv_freq.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
    np.testing.assert_array_max_ulp(ours, theirs, maxulp=2)
    assert rope.attention_scaling == module.attention_scaling
    same_table = Rope(tuple(float(v) for v in theirs), rope.attention_scaling)
    assert_matches_hf(same_table, module.inv_freq, module.attention_scaling, module)


# ---- Gemma 3: one table per layer type ---------------------------------------------------

GEMMA3_SIZES = dict(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=HEAD_DIM,
                    max_position_embeddings=MAX_POSITIONS, layer_types=[SLIDING, FULL])


def gemma3_rotary(**rope_fields):
    """transformers' Gemma3TextConfig from these fields, and Gemma3TextModel's rotary_emb."""
    config = Gemma3TextConfig(**GEMMA3_SIZES, **rope_fields)
    return config, Gemma3TextModel(config).rotary_emb


def assert_gemma3_matches(ropes, module):
    for layer_type in (FULL, SLIDING):
        assert_matches_hf(ropes[layer_type], getattr(module, f"{layer_type}_inv_freq"),
                          getattr(module, f"{layer_type}_attention_scaling"), module, POSITIONS, layer_type)


GEMMA3_LEGACY = {
    "defaults": {},
    "real-4b-style": dict(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                          rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "yarn": dict(rope_theta=500_000.0, rope_local_base_freq=20_000.0,
                 rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}),
}


@pytest.mark.parametrize("case", GEMMA3_LEGACY)
def test_gemma3_layer_types_get_their_own_tables(case):
    fields = GEMMA3_LEGACY[case]
    config, module = gemma3_rotary(**fields)
    legacy = {"model_type": "gemma3_text", **GEMMA3_SIZES, **fields}
    ropes = hf_ropes(legacy, HEAD_DIM)
    assert ropes[FULL] != ropes[SLIDING]
    assert_gemma3_matches(ropes, module)
    # transformers 5's nested rope_parameters, and the multimodal wrapper's text_config
    written = {"model_type": "gemma3_text", **config.to_dict()}
    assert set(written["rope_parameters"]) == {FULL, SLIDING}
    assert hf_ropes(written, HEAD_DIM) == ropes
    assert hf_ropes({"model_type": "gemma3", "text_config": legacy}, HEAD_DIM) == ropes


def test_gemma3_nested_parameters_per_layer_type():
    """Both layer types scaled (transformers-5 form); a layer's yarn `truncate` is ignored,
    as transformers ignores it (it reads truncate from the top of rope_parameters)."""
    rope_parameters = {
        FULL: {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "truncate": False},
        SLIDING: {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
    }
    _, module = gemma3_rotary(rope_parameters={k: dict(v) for k, v in rope_parameters.items()})
    ropes = hf_ropes({"model_type": "gemma3_text", **GEMMA3_SIZES, "rope_parameters": rope_parameters}, HEAD_DIM)
    assert_gemma3_matches(ropes, module)


# ---- the default table is the one the Qwen2 path always used -----------------------------


def previous_default_rope_angles(positions, head_dim, theta):
    """The default-only RoPE of actex.model.qwen2 before this module (commit aaa831a)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


@pytest.mark.parametrize("theta", [10000.0, 1e6, 1000000])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_default_is_bit_identical_to_the_previous_qwen2_rope(head_dim, theta):
    # (For head sizes that are not powers of two XLA divides by multiplying with 1/head_dim,
    # which moved the old table up to ~14 ulps off transformers'; this one is not.)
    positions = jnp.asarray(POSITIONS)
    rope = hf_ropes({"model_type": "qwen2", "rope_theta": theta}, head_dim)[FULL]
    for ours, before in zip(rope_angles(positions, rope), previous_default_rope_angles(positions, head_dim, theta)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(before))


def test_apply_rope_is_transformers_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = RNG.standard_normal((2, 50, 3, HEAD_DIM)).astype(np.float32)
    positions = POSITIONS[:, :50]
    _, module = hf_module("llama", 10000.0, None)
    cos, sin = rope_angles(jnp.asarray(positions), hf_ropes(legacy_json("llama", 10000.0, None), HEAD_DIM)[FULL])
    hf_cos, hf_sin = hf_cos_sin(module, positions)
    q = torch.from_numpy(x)
    expected, _ = apply_rotary_pos_emb(q, q, torch.from_numpy(hf_cos), torch.from_numpy(hf_sin), unsqueeze_dim=2)
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), cos, sin)), expected.numpy(), rtol=1e-6, atol=1e-6)
    rotated_bf16 = apply_rope(jnp.asarray(x, jnp.bfloat16), cos, sin)
    assert rotated_bf16.dtype == jnp.bfloat16 and rotated_bf16.shape == x.shape


# ---- refusals ------------------------------------------------------------------------------

REFUSALS = {
    "longrope": ({"model_type": "llama", "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                           "long_factor": [2.0] * 8}},
                 "rope_scaling.rope_type: 'longrope' not supported"),
    "proportional": ({"model_type": "llama", "rope_parameters": {"rope_type": "proportional"}},
                     "rope_parameters.rope_type: 'proportional' not supported"),
    "partial-rotary": ({"model_type": "llama", "rope_parameters": {"rope_type": "default",
                                                                    "partial_rotary_factor": 0.5}},
                       "rope_parameters.partial_rotary_factor: 0.5 not supported"),
    "partial-rotary-top-level": ({"model_type": "qwen2", "partial_rotary_factor": 0.5},
                                 "field partial_rotary_factor: 0.5 not supported"),
    "yarn-without-factor": ({"model_type": "qwen2", "rope_scaling": {"rope_type": "yarn"}},
                            "rope_scaling.factor: missing"),
    "non-numeric-factor": ({"model_type": "llama", "rope_parameters": {"rope_type": "linear", "factor": "four"}},
                           "rope_parameters.factor: expected a positive number, got 'four'"),
    "boolean-factor": ({"model_type": "llama", "rope_parameters": {"rope_type": "dynamic", "factor": True}},
                       "rope_parameters.factor: expected a positive number, got True"),
    "llama3-without-low-freq-factor": ({"model_type": "llama", "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}}, "rope_parameters.low_freq_factor: missing"),
    "yarn-truncate-not-bool": ({"model_type": "qwen2", "rope_parameters": {"rope_type": "yarn", "factor": 2.0,
                                                                           "truncate": "no"}},
                               "rope_parameters.truncate: expected true, false or null, got 'no'"),
    "gemma3-nested-factor": ({"model_type": "gemma3_text", "rope_parameters": {
        FULL: {"rope_type": "linear", "factor": "8"}, SLIDING: {"rope_type": "default"}}},
        "rope_parameters.full_attention.factor: expected a positive number, got '8'"),
    "gemma3-wrapper-longrope": ({"model_type": "gemma3", "text_config": {"rope_scaling": {"rope_type": "longrope"}}},
                                "text_config.rope_scaling.rope_type: 'longrope' not supported"),
    "gemma3-legacy-type-key": ({"model_type": "gemma3_text", "rope_scaling": {"type": "linear", "factor": 8.0}},
                               "rope_scaling.type: 'linear' is ignored by transformers"),
    "nested-for-llama": ({"model_type": "llama", "rope_parameters": {FULL: {"rope_type": "default"}}},
                         "rope_parameters.full_attention: per-layer-type RoPE parameters are not read"),
    "bad-theta": ({"model_type": "qwen2", "rope_parameters": {"rope_theta": -1.0}},
                  "rope_parameters.rope_theta: expected a positive number, got -1.0"),
    "dynamic-without-max-positions": ({"model_type": "some_llama_clone", "rope_scaling": {"type": "dynamic",
                                                                                           "factor": 2.0}},
                                      "field max_position_embeddings: missing"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_and_name_the_field(case):
    hf, message = REFUSALS[case]
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        hf_ropes(hf, HEAD_DIM)
    assert "\n" not in str(raised.value) and str(raised.value).startswith("field ")


def test_rope_from_hf_refuses_an_odd_head_dim():
    with pytest.raises(ValueError, match="head_dim: expected a positive even integer, got 15"):
        rope_from_hf(None, theta=10000.0, head_dim=15, max_position_embeddings=None)
