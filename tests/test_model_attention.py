"""Attention features every backend must compute as transformers' eager attention does:
the score scale, Gemma 2's logit soft-capping and sliding windows (static or traced,
within packed segments), plus KV-cache decoding and the backend choice per platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actex.model.attention import (
    attention, decode_attention, key_block_bounds, make_attention, resolve_backend,
)

RNG = np.random.default_rng(0)
# 2 rows of 37 tokens, 4 query heads over 2 kv heads. Row 0: three packed segments, the
# third crossing 8-token block edges; row 1: one segment + padding.
SEGMENTS = np.array([[1] * 5 + [2] * 20 + [3] * 12, [1] * 30 + [0] * 7], np.int32)
# Scores of a few units, so a soft cap of 1.5 changes them a lot.
Q = (3 * RNG.standard_normal((2, 37, 4, 8))).astype(np.float32)
K, V = (RNG.standard_normal((2, 37, 2, 8)).astype(np.float32) for _ in range(2))
SOFTCAP = 1.5


def eager(q, k, v, visible, scale=None, softcap=None):
    """transformers' eager_attention_forward in float64: q [B,T,H,hd] over k, v [B,S,Hkv,hd]
    where visible [B,T,S]: scale, soft cap, mask, softmax, GQA by repeating kv heads."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = np.tanh(scores / softcap) * softcap
    scores = np.where(np.asarray(visible)[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def visible_mask(segment_ids, window=0):
    """Same segment, kv_idx <= q_idx and (windowed) kv_idx > q_idx - window, as in
    transformers' masking_utils."""
    t = np.arange(segment_ids.shape[1])
    q_idx, kv_idx = t[:, None], t[None, :]
    allowed = kv_idx <= q_idx
    if window:
        allowed &= kv_idx > q_idx - window
    return (segment_ids[:, :, None] == segment_ids[:, None, :]) & allowed


def reference(q, k, v, segment_ids, window=0, scale=None, softcap=None):
    return eager(q, k, v, visible_mask(segment_ids, window), scale, softcap)


# 1: the diagonal only; 8 = the block; 13 crosses a block edge; 100 is longer than the row.
WINDOWS = [0, 1, 3, 5, 8, 13, 100]
FEATURES = [dict(), dict(softcap=SOFTCAP), dict(scale=0.2), dict(scale=0.2, softcap=SOFTCAP)]


@pytest.mark.parametrize("features", FEATURES, ids=["plain", "softcap", "scale", "scale+softcap"])
def test_blockwise_with_traced_window_matches_eager(features):
    run = jax.jit(lambda q, k, v, seg, w: attention(q, k, v, seg, block=8, window=w, **features))
    for window in WINDOWS:
        np.testing.assert_allclose(run(Q, K, V, SEGMENTS, np.int32(window)),
                                   reference(Q, K, V, SEGMENTS, window, **features),
                                   atol=2e-6, err_msg=f"window {window}")


@pytest.mark.parametrize("window", [0, 1, 13, 100])
def test_blockwise_with_static_window_matches_eager(window):
    out = attention(Q, K, V, SEGMENTS, block=8, window=window, softcap=SOFTCAP)
    np.testing.assert_allclose(out, reference(Q, K, V, SEGMENTS, window, softcap=SOFTCAP), atol=2e-6)


def test_default_arguments_are_todays_kernel_bit_for_bit():
    plain = attention(Q, K, V, SEGMENTS)
    for same in (attention(Q, K, V, SEGMENTS, window=0, scale=8**-0.5, softcap=None),
                 make_attention("blockwise")(Q, K, V, SEGMENTS),
                 make_attention("blockwise")(Q, K, V, SEGMENTS, 0)):  # window by position too
        np.testing.assert_array_equal(same, plain)


def test_window_chosen_per_layer_inside_one_scan():
    """A scan over layers whose xs are the windows [0, w, 0]: each step uses its own."""
    attend = make_attention("blockwise", softcap=SOFTCAP, windows=(0, 5))

    def layers(q, k, v, seg, windows):
        return jax.lax.scan(lambda c, w: (c, attend(q, k, v, seg, window=w)), 0, windows)[1]

    out = jax.jit(layers)(Q, K, V, SEGMENTS, np.array([0, 5, 0], np.int32))
    for layer, window in enumerate([0, 5, 0]):
        np.testing.assert_allclose(out[layer], reference(Q, K, V, SEGMENTS, window, softcap=SOFTCAP),
                                   atol=2e-6, err_msg=f"layer {layer}")


def test_key_blocks_outside_the_window_are_never_visited():
    # Key block 0 holds NaN values. A visited key block is multiplied in even where every
    # score is masked (0 * NaN = NaN), so finite outputs prove that block was skipped.
    seq, block, window = 512, 64, 100
    q = RNG.standard_normal((1, seq, 2, 8)).astype(np.float32)
    k = RNG.standard_normal((1, seq, 1, 8)).astype(np.float32)
    v = RNG.standard_normal((1, seq, 1, 8)).astype(np.float32)
    v[:, :block] = np.nan
    segments = np.ones((1, seq), np.int32)
    out = np.asarray(attention(q, k, v, segments, block=block, window=window))
    # Query block 3 (tokens 192-255) starts seeing keys at 93, in key block 1: every later
    # query block skips block 0. Block 2 (128-191) still visits it for its first queries.
    assert np.isfinite(out[:, 3 * block:]).all()
    assert np.isnan(out[:, 2 * block:3 * block]).all()
    clean = v.copy()
    clean[:, :block] = 0.0
    np.testing.assert_allclose(out[:, 3 * block:], reference(q, k, clean, segments, window)[:, 3 * block:],
                               atol=2e-6)
    assert np.isnan(np.asarray(attention(q, k, v, segments, block=block))[:, 3 * block:]).all()


def test_a_long_row_with_a_window_visits_o_of_window_key_blocks():
    seq, block = 4096, 128
    segments = jnp.ones((1, seq), jnp.int32)
    first, end = key_block_bounds(segments, block, 256)
    per_query_block = np.asarray(end - first)
    assert per_query_block.max() == 3  # ceil(255 / 128) + 1: O(window / block)
    assert per_query_block.sum() <= 3 * seq // block  # 96, against 528 without a window
    first, end = key_block_bounds(segments, block, jnp.int32(0))  # traced, global
    assert int((end - first).sum()) == 32 * 33 // 2
    # A window crossing into an earlier segment stops at that segment's start.
    packed = jnp.asarray(np.repeat([1, 2], [1000, seq - 1000])[None].astype(np.int32))
    first, _ = key_block_bounds(packed, block, 4096)
    assert int(first[8]) == 1000 // block


@pytest.mark.parametrize("features", [dict(), dict(scale=0.2, softcap=SOFTCAP)], ids=["plain", "scale+softcap"])
def test_xla_backend_with_traced_window_matches_eager(features):
    attend = make_attention("xla", **features, windows=(0, 3, 13))
    run = jax.jit(lambda q, k, v, seg, w: attend(q, k, v, seg, window=w))
    for window in (0, 3, 13):
        np.testing.assert_allclose(run(Q, K, V, SEGMENTS, np.int32(window)),
                                   reference(Q, K, V, SEGMENTS, window, **features), atol=2e-6)


def test_splash_in_interpret_mode_selects_its_kernel_per_traced_window():
    # One Pallas tile of 128 tokens: three segments, the windows within and across them.
    segments = np.repeat([[1, 2, 3]], [20, 70, 38], axis=1).astype(np.int32)
    q = (3 * RNG.standard_normal((1, 128, 4, 16))).astype(np.float32)
    k, v = (RNG.standard_normal((1, 128, 2, 16)).astype(np.float32) for _ in range(2))
    attend = make_attention("splash", scale=0.15, softcap=SOFTCAP, windows=(0, 9))
    run = jax.jit(lambda q, k, v, seg, w: attend(q, k, v, seg, window=w))
    for window in (0, 9):
        np.testing.assert_allclose(run(q, k, v, segments, np.int32(window)),
                                   reference(q, k, v, segments, window, 0.15, SOFTCAP), atol=2e-6)
    # A window the kernels were not built for: refused when static, NaN when traced.
    assert np.isnan(np.asarray(run(q, k, v, segments, np.int32(4)))).all()
    with pytest.raises(ValueError, match="window 4 is not among the windows the kernels were built for"):
        attend(q, k, v, segments, window=4)


def test_pallas_gpu_in_interpret_mode_takes_a_scale_and_refuses_windows_and_softcap():
    out = make_attention("pallas_gpu", scale=0.2)(Q, K, V, SEGMENTS)
    np.testing.assert_allclose(out, reference(Q, K, V, SEGMENTS, scale=0.2), atol=2e-6)
    with pytest.raises(ValueError, match="pallas_gpu has no sliding-window attention"):
        make_attention("pallas_gpu", windows=(0, 4096))
    with pytest.raises(ValueError, match="pallas_gpu cannot soft-cap"):
        make_attention("pallas_gpu", softcap=50.0)
    with pytest.raises(ValueError, match="cudnn cannot soft-cap"):
        make_attention("cudnn", softcap=50.0)


@pytest.mark.parametrize("features", [dict(), dict(scale=0.2, softcap=SOFTCAP)], ids=["plain", "scale+softcap"])
def test_decode_attention_matches_eager_over_valid_cache_keys(features):
    # 3 queries (the last 3 of 12 tokens) over a 16-slot cache: row 0 left-padded by 2,
    # row 1 windowed to 4 keys; the caller folds causality into key_valid per step, so
    # here every query sees the same keys.
    valid = np.zeros((2, 16), bool)
    valid[0, 2:12] = True
    valid[1, 8:12] = True
    q = Q[:, :3]
    k, v = K[:, :16], V[:, :16]
    out = decode_attention(q, k, v, valid, **features)
    expected = eager(q, k, v, np.broadcast_to(valid[:, None], (2, 3, 16)), **features)
    np.testing.assert_allclose(out, expected, atol=2e-6)
    half = decode_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), valid, **features)
    assert half.dtype == jnp.bfloat16 and half.shape == q.shape


def test_auto_picks_a_backend_that_computes_the_models_features():
    gemma2, mistral = dict(softcap=50.0, windowed=True), dict(windowed=True)
    assert resolve_backend("auto", "tpu", "bfloat16", **gemma2) == "splash"
    assert resolve_backend("auto", "gpu", "bfloat16", **mistral) == "cudnn"
    assert resolve_backend("auto", "gpu", "bfloat16", **gemma2) == "blockwise"
    assert resolve_backend("auto", "gpu", "float32", **mistral) == "blockwise"
    assert resolve_backend("auto", "gpu", "float32") == "pallas_gpu"
    assert resolve_backend("auto", "cpu", **gemma2) == "blockwise"
    for backend in ("blockwise", "xla"):
        assert resolve_backend(backend, "gpu", "bfloat16", **gemma2) == backend
    assert resolve_backend("splash", "cpu", **gemma2) == "splash"
    assert resolve_backend("cudnn", "gpu", "bfloat16", **mistral) == "cudnn"


@pytest.mark.parametrize("backend, features, says", [
    ("cudnn", dict(softcap=50.0), "--attention cudnn cannot soft-cap attention logits .* use one of blockwise, splash, xla$"),
    ("pallas_gpu", dict(windowed=True), "--attention pallas_gpu has no sliding-window attention .* use one of blockwise, splash, cudnn, xla$"),
    ("pallas_gpu", dict(softcap=30.0, windowed=True), "pallas_gpu cannot soft-cap"),
])
def test_an_explicit_backend_that_cannot_compute_a_feature_is_refused(backend, features, says):
    with pytest.raises(ValueError, match=says):
        resolve_backend(backend, "gpu", "bfloat16", **features)


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "global"])
def test_equals_transformers_gemma2_eager_attention_on_packed_rows(layer):
    """Gemma2Attention (query_pre_attn_scalar scale, logit soft-capping, a sliding window
    on layer 0) on a row of two packed samples, against ours with its projections."""
    torch = pytest.importorskip("torch")
    from transformers import Gemma2Config
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention

    config = Gemma2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          num_hidden_layers=2, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
                          sliding_window=5, attn_implementation="eager")
    torch.manual_seed(0)
    module = Gemma2Attention(config, layer_idx=layer).eval()
    for linear in (module.q_proj, module.k_proj):
        linear.weight.data *= 4  # scores of several units, so the cap matters
    lengths = (9, 14)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    hidden = torch.randn(1, sum(lengths), 32)
    make_mask = create_sliding_window_causal_mask if layer == 0 else create_causal_mask
    mask = make_mask(config=config, inputs_embeds=hidden, attention_mask=None, cache=None,
                     position_ids=position_ids)
    # No rotation (cos 1, sin 0): RoPE is the model's business, not attention's.
    rotation = (torch.ones(1, sum(lengths), 8), torch.zeros(1, sum(lengths), 8))
    with torch.no_grad():
        expected = module(hidden, position_embeddings=rotation, attention_mask=mask)[0].numpy()

    def project(linear, heads):
        return (hidden.numpy() @ linear.weight.detach().numpy().T).reshape(1, -1, heads, 8)

    q, k, v = project(module.q_proj, 4), project(module.k_proj, 2), project(module.v_proj, 2)
    segments = np.repeat([1, 2], lengths)[None].astype(np.int32)
    window = config.sliding_window if layer == 0 else 0
    features = dict(scale=config.query_pre_attn_scalar**-0.5, softcap=config.attn_logit_softcapping)
    for backend in ("blockwise", "xla"):
        attend = make_attention(backend, **features, windows=(0, config.sliding_window))
        out = jax.jit(lambda q, k, v, s, w: attend(q, k, v, s, window=w))(q, k, v, segments, np.int32(window))
        ours = np.asarray(out).reshape(1, -1, 32) @ module.o_proj.weight.detach().numpy().T
        np.testing.assert_allclose(ours, expected, atol=1e-5, err_msg=backend)
