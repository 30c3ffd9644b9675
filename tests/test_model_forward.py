"""Forward semantics: packing, early stop, blockwise attention, capture dtype, sharding."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actex.model import (
    load_model, make_capture_fn, make_mesh, parse_hooks, shard_batch, shard_params,
    write_random_checkpoint,
)
from actex.model.attention import attention
from actex.model.random_checkpoint import tiny_hf_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(path, tiny_hf_config(num_hidden_layers=3, vocab_size=128), seed=0)
    return load_model(path)


def naive_attention(q, k, v, segment_ids):
    """Full [T, T] softmax reference (no blocking)."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    t = jnp.arange(q.shape[1])
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (t[:, None] >= t[None, :])
    scores = jnp.where(mask[:, None], scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("block", [8, 16, 64])
def test_blockwise_attention_equals_full_softmax(block):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 37, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 37, 2, 8)).astype(np.float32) for _ in range(2))
    # Row 0: three segments, the third crossing block edges; row 1: one segment + padding.
    segments = np.array([[1] * 5 + [2] * 20 + [3] * 12, [1] * 30 + [0] * 7], np.int32)
    out = attention(q, k, v, segments, block=block)
    np.testing.assert_allclose(out, naive_attention(q, k, v, segments), atol=2e-6)


def test_packed_row_equals_samples_alone(tiny):
    hooks = parse_hooks(["blocks.0.hook_attn_out", "blocks.2.hook_resid_post",
                         "ln_final.hook_normalized"], 3)
    capture = make_capture_fn(tiny.config, hooks, "float32")
    rng = np.random.default_rng(1)
    lengths = [7, 19, 5]
    samples = [rng.integers(0, 128, n).astype(np.int32) for n in lengths]
    seq = 40
    token_ids = np.zeros((1, seq), np.int32)
    positions = np.zeros((1, seq), np.int32)
    segment_ids = np.zeros((1, seq), np.int32)  # 9 tokens of padding at the end
    start = 0
    for i, sample in enumerate(samples):
        token_ids[0, start:start + len(sample)] = sample
        positions[0, start:start + len(sample)] = np.arange(len(sample))
        segment_ids[0, start:start + len(sample)] = i + 1
        start += len(sample)
    packed = capture(tiny.params, token_ids, positions, segment_ids)
    start = 0
    for sample in samples:
        n = len(sample)
        alone = capture(tiny.params, sample[None], np.arange(n, dtype=np.int32)[None],
                        np.ones((1, n), np.int32))
        for name in hooks:
            np.testing.assert_allclose(packed[name][0, start:start + n], alone[name][0],
                                       rtol=1e-5, atol=1e-5, err_msg=name)
        start += n


def test_early_stop_equals_full_pass_and_skips_layers(tiny):
    inputs = (np.arange(24, dtype=np.int32).reshape(2, 12),
              np.tile(np.arange(12, dtype=np.int32), (2, 1)), np.ones((2, 12), np.int32))
    shallow = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.mlp.hook_post")
    full = shallow + ("ln_final.hook_normalized",)
    early = make_capture_fn(tiny.config, shallow, "float32")(tiny.params, *inputs)
    late = make_capture_fn(tiny.config, full, "float32")(tiny.params, *inputs)
    for name in shallow:
        np.testing.assert_array_equal(early[name], late[name])
    np.testing.assert_array_equal(early["blocks.0.hook_resid_post"],
                                  early["blocks.1.hook_resid_pre"])
    # Only 2 of 3 blocks are needed: a model truncated to 2 layers must serve these hooks...
    loaded2 = load_model(tiny.path, max_layers=2)
    again = make_capture_fn(loaded2.config, shallow, "float32")(loaded2.params, *inputs)
    np.testing.assert_array_equal(early["blocks.1.mlp.hook_post"], again["blocks.1.mlp.hook_post"])
    # ...and refuse deeper ones with a clear message.
    with pytest.raises(ValueError, match="need 3 layers but the parameters hold only 2"):
        make_capture_fn(loaded2.config, full, "float32")(loaded2.params, *inputs)


def test_capture_returns_only_requested_hooks_in_out_dtype(tiny):
    hooks = ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"]
    out = make_capture_fn(tiny.config, hooks, "bfloat16")(
        tiny.params, np.zeros((3, 8), np.int32), np.zeros((3, 8), np.int32),
        np.ones((3, 8), np.int32))
    assert list(out) == ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"]
    assert out["blocks.0.mlp.hook_post"].shape == (3, 8, tiny.config.d_mlp)
    assert out["blocks.1.hook_resid_post"].shape == (3, 8, tiny.config.d_model)
    assert all(v.dtype == jnp.bfloat16 for v in out.values())


def test_one_device_mesh_gives_same_values(tiny):
    mesh = make_mesh()
    inputs = (np.arange(16, dtype=np.int32).reshape(2, 8),
              np.tile(np.arange(8, dtype=np.int32), (2, 1)), np.ones((2, 8), np.int32))
    capture = make_capture_fn(tiny.config, ["blocks.2.hook_resid_post"], "float32")
    sharded = capture(shard_params(tiny.params, tiny.config, mesh), *shard_batch(inputs, mesh))
    plain = capture(tiny.params, *inputs)
    np.testing.assert_array_equal(sharded["blocks.2.hook_resid_post"],
                                  plain["blocks.2.hook_resid_post"])


_SHARDED_SCRIPT = """
import numpy as np, jax
from actex.model import load_model, make_capture_fn, make_mesh, shard_batch, shard_params
assert len(jax.devices()) == 4
loaded = load_model({path!r})
inputs = (np.arange(64, dtype=np.int32).reshape(4, 16) % 128,
          np.tile(np.arange(16, dtype=np.int32), (4, 1)), np.ones((4, 16), np.int32))
capture = make_capture_fn(loaded.config, ["blocks.2.hook_resid_post"], "float32")
plain = np.asarray(capture(loaded.params, *inputs)["blocks.2.hook_resid_post"])
mesh = make_mesh(model_parallel=2)
params = shard_params(loaded.params, loaded.config, mesh)
assert params["layers"]["w_up"].sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
out = capture(params, *shard_batch(inputs, mesh))["blocks.2.hook_resid_post"]
np.testing.assert_allclose(np.asarray(out), plain, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_data_and_model_sharding_on_four_host_devices(tiny):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT.format(path=str(tiny.path))],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_attention_memory_grows_linearly_not_quadratically():
    # Compile only: XLA's buffer plan for a 16k-token row must hold no [T, T] score tensor.
    seq, heads = 16384, 4
    q = jax.ShapeDtypeStruct((1, seq, heads, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32)
    segments = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    compiled = jax.jit(attention).lower(q, kv, kv, segments).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    one_head_scores = seq * seq * 4  # 1 GiB
    assert temp < one_head_scores / 16, f"{temp / 2**20:.0f} MiB of temporaries"


def test_forward_takes_hooks_in_any_order(tiny):
    # resid_pre of block l is resid_post of block l - 1: both names must come back,
    # whichever is listed first, with the same values.
    from actex.model.capture import forward

    token_ids = np.arange(9, dtype=np.int32)[None]
    positions, segment_ids = token_ids.copy(), np.ones_like(token_ids)
    hooks = ("blocks.2.hook_resid_pre", "blocks.1.hook_resid_post")
    out = forward(tiny.params, tiny.config, token_ids, positions, segment_ids, hooks)
    assert set(out) == set(hooks)
    np.testing.assert_array_equal(out[hooks[0]], out[hooks[1]])


def test_ln_final_hook_normalized_is_transformer_lens_pre_gain(tiny):
    # TransformerLens's ln_final.hook_normalized is x / sqrt(mean(x^2) + eps), before the
    # gain; the gained value (HF's last_hidden_state) is ln_final.hook_out.
    last = f"blocks.{tiny.config.n_layers - 1}.hook_resid_post"
    hooks = (last, "ln_final.hook_normalized", "ln_final.hook_out")
    token_ids = np.arange(1, 13, dtype=np.int32)[None]
    out = make_capture_fn(tiny.config, hooks, "float32")(
        tiny.params, token_ids, np.arange(12, dtype=np.int32)[None], np.ones_like(token_ids))
    x = np.asarray(out[last], np.float64)
    normalized = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + tiny.config.rms_norm_eps)
    gain = np.asarray(tiny.params["final_norm"], np.float64)
    assert np.abs(gain - 1).max() > 0.05  # the gain is not the identity, so the two differ
    np.testing.assert_allclose(out["ln_final.hook_normalized"], normalized, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["ln_final.hook_out"], normalized * gain, rtol=1e-5, atol=1e-6)


def _dot_precisions(params, config, hooks):
    import jax.extend

    from actex.model.capture import forward

    ids = jnp.zeros((1, 8), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: forward(p, config, ids, ids, ids + 1, hooks))(params)
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params["precision"])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


def test_float32_matmuls_ask_for_full_precision_and_cpu_results_are_unchanged(tiny, monkeypatch):
    # TPUs (one bf16 pass) and GPUs (TF32) would otherwise round float32 matmul inputs.
    from actex.model import capture

    hooks = ("blocks.2.hook_resid_post",)
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    float32 = _dot_precisions(tiny.params, tiny.config, hooks)
    assert len(float32) >= 9 and set(float32) == {highest}  # 7 dense + 2 attention (one scanned block)
    bf16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), tiny.params)
    assert set(_dot_precisions(bf16, tiny.config, hooks)) == {None}

    inputs = (np.arange(24, dtype=np.int32).reshape(2, 12),
              np.tile(np.arange(12, dtype=np.int32), (2, 1)), np.ones((2, 12), np.int32))
    explicit = make_capture_fn(tiny.config, hooks, "float32")(tiny.params, *inputs)
    monkeypatch.setattr(capture, "matmul_precision", lambda dtype: None)
    default = make_capture_fn(tiny.config, hooks, "float32")(tiny.params, *inputs)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(explicit[hooks[0]], default[hooks[0]])


def test_embedding_only_params_shard_and_capture(tiny):
    # hook_embed alone loads no block weight: params["layers"] is empty, and both the mesh
    # placement and the forward must take that (they once looked up a block weight).
    embed_only = load_model(tiny.path, max_layers=0)
    assert embed_only.params["layers"] == {}
    params = shard_params(embed_only.params, embed_only.config, make_mesh())
    token_ids = np.array([[3, 1, 4, 1, 5]], np.int32)
    out = make_capture_fn(embed_only.config, ["hook_embed", "blocks.0.hook_resid_pre"], "float32")(
        params, token_ids, np.arange(5, dtype=np.int32)[None], np.ones_like(token_ids))
    for value in out.values():
        np.testing.assert_array_equal(value[0], np.asarray(tiny.params["embed"])[token_ids[0]])
