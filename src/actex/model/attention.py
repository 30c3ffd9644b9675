"""Memory-bounded causal + segment attention: blockwise online softmax.

A packed row holds several samples; `segment_ids` numbers them (0 = padding) and a query
sees a key only if both are in the same segment and the key is not later in the row.
Scores are computed one [q_block, kv_block] tile at a time with a running max and sum
(the FlashAttention recurrence), so memory is O(seq * block), never O(seq^2): a 32k-token
prompt needs a few tens of MB of scores, not the 60 GB a full score tensor would take.

Key blocks that no query of a query block can see are skipped: those after it (causal),
those before the start of its first segment (segments are contiguous runs of equal ids,
as packing produces them) and those wholly outside its sliding window. A row holding one
long sample thus costs half the full square, a row packed with short samples little
more than the samples alone, and a window of w tokens O(seq * w).

Three per-model features follow transformers' eager attention exactly:

    scale    the factor on q.k (transformers' `scaling`): head_dim**-0.5 unless given
             (Gemma: query_pre_attn_scalar**-0.5). A static float.
    softcap  Gemma 2's logit soft-capping, scores = softcap * tanh(scores / softcap) on
             the scaled scores, before masking and softmax. A static float or None.
    window   sliding window: a query at row index t sees key s only if s <= t and
             t - s < window (transformers: kv_idx > q_idx - sliding_window), within its
             segment. 0 means global. It may be a traced int32 scalar, so one lax.scan
             over stacked layers can give each layer its own window.

That blockwise kernel is the reference and the CPU path. `make_attention(backend, mesh)`
returns the same function computed by a platform's fused kernel (`--attention`):

    blockwise   the kernel below; any platform (GSPMD partitions it over the mesh).
                Every feature.
    splash      TPU: Pallas splash attention with segment ids (causal or local mask,
                O(seq) memory). Every feature: soft-capping is the kernel's own, and one
                kernel is built per window the model uses, picked by lax.switch.
    pallas_gpu  GPU: the Pallas (Triton) flash-attention kernel with segment ids. Scale
                only: it has no sliding window and no soft-capping.
    cudnn       GPU: jax.nn.dot_product_attention(implementation="cudnn") with a dense
                segment+causal+window mask ([rows, 1, seq, seq] booleans); bfloat16/float16
                only. No soft-capping (that function has none).
    xla         jax.nn.dot_product_attention(implementation="xla"), same dense mask: the
                plain XLA softmax, O(seq^2) memory; a second reference. With soft-capping
                the same dense softmax is spelled out here (that function has no cap).
    auto        the fastest that computes the model's features: splash on TPU; on GPU
                cudnn for 16-bit compute, pallas_gpu for float32, blockwise for what
                those cannot do; blockwise on CPU.

Pallas kernels cannot be partitioned by XLA, so under a mesh they run inside shard_map:
rows over "data", query heads over "model" when they divide it; when kv heads do not
divide the model axis, each device picks the kv head of each of its query heads.
On CPU the Pallas kernels run in interpret mode (how the tests compare them).

`decode_attention` is the KV-cache form (few queries over a cache with a validity mask),
with the same scale and soft-capping.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from actex.model.axes import DATA, MODEL

# Large enough that a q tile and its score tiles stay in a CPU core's L2/L3 while the
# matmuls stay big enough to run near peak; measured in bench/forward.py.
DEFAULT_BLOCK = 512

# Finite "minus infinity": a fully masked tile then gives exp(0) * 0 instead of NaN.
_NEG = -1e30


def _segment_starts(segment_ids: jax.Array) -> jax.Array:
    """Index of the first token of each token's segment run. [B, T] -> [B, T]."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    boundary = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
        axis=1,
    )
    return jax.lax.cummax(jnp.where(boundary, index, 0), axis=1)


def _is_static(window) -> bool:
    """A Python / numpy integer (known at trace time), not a traced array."""
    return isinstance(window, (int, np.integer))


def _cap(scores: jax.Array, softcap: float | None) -> jax.Array:
    """Gemma 2's soft-capping of already scaled float32 scores (transformers' order:
    divide, tanh, multiply)."""
    if softcap is None:
        return scores
    return jnp.tanh(scores / softcap) * softcap


def _in_window(q_pos: jax.Array, k_pos: jax.Array, window) -> jax.Array | None:
    """[..., q, k] booleans t - s < window (or all True for window <= 0); None when the
    window is a static 0, so the global case adds no work."""
    if _is_static(window) and window <= 0:
        return None
    near = q_pos[:, None] - k_pos[None, :] < window
    return near if _is_static(window) else near | (window <= 0)


def key_block_bounds(segment_ids: jax.Array, block: int, window=0) -> tuple[jax.Array, jax.Array]:
    """[first, last) key blocks the blockwise kernel visits for each query block.

    segment_ids [B, T] with T a multiple of `block`. Causality ends the range at the query
    block itself; the earliest segment start of any row in the block, and the window
    (the block's first query sees keys from its index - window + 1 on), begin it.
    """
    n_blocks = segment_ids.shape[1] // block
    first_tokens = _segment_starts(segment_ids)[:, ::block]  # [B, n_blocks]
    first = (jnp.min(first_tokens, axis=0) // block).astype(jnp.int32)
    if not (_is_static(window) and window <= 0):
        starts = jnp.arange(n_blocks, dtype=jnp.int32) * block
        reach = jnp.maximum(starts - window + 1, 0) // block
        first = jnp.maximum(first, jnp.where(window > 0, reach, 0).astype(jnp.int32))
    return first, jnp.arange(1, n_blocks + 1, dtype=jnp.int32)


def attention(
    q: jax.Array,  # [B, T, H, hd]
    k: jax.Array,  # [B, T, Hkv, hd]
    v: jax.Array,  # [B, T, Hkv, hd]
    segment_ids: jax.Array,  # [B, T] int32
    block: int = DEFAULT_BLOCK,
    *,
    window=0,  # int or traced int32 scalar; 0 = global
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:  # [B, T, H, hd], in q's dtype
    """Causal, segment-masked (optionally windowed, soft-capped) grouped-query attention,
    one tile of scores at a time."""
    batch, seq, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    scale = head_dim**-0.5 if scale is None else scale

    block = min(block, seq)
    n_blocks = -(-seq // block)
    pad = n_blocks * block - seq
    if pad:
        # Padded keys get segment -1, which no real query has; padded queries are dropped.
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)

    # Head-major layouts make every tile product one batched matmul over (B, Hkv).
    qh = q.reshape(batch, -1, n_kv, group, head_dim).transpose(0, 2, 3, 1, 4)  # [B,Hkv,G,Tp,hd]
    kh = k.transpose(0, 2, 1, 3)  # [B, Hkv, Tp, hd]
    vh = v.transpose(0, 2, 1, 3)  # [B, Hkv, Tp, hd]

    kv_first, kv_end = key_block_bounds(segment_ids, block, window)  # [n_blocks] each
    positions = jnp.arange(n_blocks * block, dtype=jnp.int32)

    def query_block(qi):
        q_tile = jax.lax.dynamic_slice_in_dim(qh, qi * block, block, axis=3)  # [B,Hkv,G,bq,hd]
        q_seg = jax.lax.dynamic_slice_in_dim(segment_ids, qi * block, block, axis=1)  # [B,bq]
        q_pos = jax.lax.dynamic_slice_in_dim(positions, qi * block, block)  # [bq]

        def key_block(kj, state):
            m, l, acc = state  # [B,Hkv,G,bq], [B,Hkv,G,bq], [B,Hkv,G,bq,hd] (float32)
            k_tile = jax.lax.dynamic_slice_in_dim(kh, kj * block, block, axis=2)  # [B,Hkv,bk,hd]
            v_tile = jax.lax.dynamic_slice_in_dim(vh, kj * block, block, axis=2)
            k_seg = jax.lax.dynamic_slice_in_dim(segment_ids, kj * block, block, axis=1)
            k_pos = jax.lax.dynamic_slice_in_dim(positions, kj * block, block)
            visible = (q_seg[:, :, None] == k_seg[:, None, :]) & (
                q_pos[:, None] >= k_pos[None, :]
            )  # [B, bq, bk]
            near = _in_window(q_pos, k_pos, window)
            if near is not None:
                visible = visible & near[None]
            visible = visible[:, None, None]  # [B, 1, 1, bq, bk]
            scores = _cap(jnp.einsum(
                "bhgqd,bhkd->bhgqk", q_tile, k_tile, preferred_element_type=jnp.float32
            ) * scale, softcap)
            m_new = jnp.maximum(m, jnp.max(jnp.where(visible, scores, _NEG), axis=-1))
            p = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            l = l * correction + jnp.sum(p, axis=-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bhgqk,bhkd->bhgqd", p.astype(v_tile.dtype), v_tile,
                preferred_element_type=jnp.float32,
            )
            return m_new, l, acc

        stats_shape = (batch, n_kv, group, block)
        init = (
            jnp.full(stats_shape, _NEG, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32),
        )
        # Only key blocks some query of this block can see: none after it (causal), none
        # before its earliest segment start or wholly outside its window.
        _, l, acc = jax.lax.fori_loop(kv_first[qi], kv_end[qi], key_block, init)
        return (acc / l[..., None]).astype(q.dtype)  # [B,Hkv,G,bq,hd]

    out = jax.lax.map(query_block, jnp.arange(n_blocks))  # [nb, B, Hkv, G, bq, hd]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, n_blocks * block, n_heads, head_dim)
    return out[:, :seq]


def _dense_softmax(q, k, v, visible, scale: float | None, softcap: float | None) -> jax.Array:
    """transformers' eager attention, spelled out: q [B, T, H, hd] over k, v [B, S, Hkv, hd]
    where visible [B, T, S] holds. Scores and softmax in float32; the probabilities meet v
    in v's dtype. O(T * S) memory."""
    batch, seq, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    qh = q.reshape(batch, seq, n_kv, n_heads // n_kv, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", qh, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible[:, None, None], _cap(scores, softcap), _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq, n_heads, head_dim).astype(q.dtype)


def decode_attention(
    q: jax.Array,  # [B, T, H, hd]
    k: jax.Array,  # [B, S, Hkv, hd], the cache
    v: jax.Array,  # [B, S, Hkv, hd]
    key_valid: jax.Array,  # [B, S] bool
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:  # [B, T, H, hd], in q's dtype
    """q over cached keys/values where key_valid holds (KV-cache decoding).

    Causality and sliding windows are the caller's, folded into key_valid: every query
    of a step sees the same keys. Scores and softmax in float32; the normalised
    probabilities meet v in v's dtype, as in transformers' eager attention. Memory is
    O(T * S), fine for decoding (T = 1).
    """
    return _dense_softmax(q, k, v, key_valid[:, None, :], scale, softcap)


# ----------------------------------------------------------------------- backends

BACKENDS = ("auto", "blockwise", "splash", "pallas_gpu", "cudnn", "xla")

# Which backends compute each optional feature (blockwise, the reference, computes all).
SOFTCAP_BACKENDS = ("blockwise", "splash", "xla")
WINDOW_BACKENDS = ("blockwise", "splash", "cudnn", "xla")

AttentionFn = Callable[..., jax.Array]  # fn(q, k, v, segment_ids, window=0)

# Pallas kernels tile the sequence; rows are padded up to a multiple of this (the packer's
# shapes already are multiples of 128, so this only matters for odd --max-seq-len values).
_PALLAS_TILE = 128


def _refuse_features(backend: str, softcap: float | None, windowed: bool) -> None:
    if softcap is not None and backend not in SOFTCAP_BACKENDS:
        raise ValueError(f"--attention {backend} cannot soft-cap attention logits (this model's "
                         f"attn_logit_softcapping); use one of {', '.join(SOFTCAP_BACKENDS)}")
    if windowed and backend not in WINDOW_BACKENDS:
        raise ValueError(f"--attention {backend} has no sliding-window attention (this model's "
                         f"sliding_window); use one of {', '.join(WINDOW_BACKENDS)}")


def resolve_backend(
    backend: str, platform: str, compute_dtype: str = "float32", *,
    softcap: float | None = None, windowed: bool = False,
) -> str:
    """The concrete backend `--attention backend` means on `platform` (cpu/gpu/tpu) for a
    model with attention-logit soft-capping `softcap` and sliding-window layers `windowed`.

    Raises ValueError for an unknown name, a kernel that cannot run on that platform, or
    one that cannot compute the model's features.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--attention {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if platform == "tpu":
            return "splash"
        if platform in ("gpu", "cuda", "rocm"):
            # cudnn and pallas_gpu are fused; where neither computes the model's features,
            # blockwise (O(seq) memory) rather than xla's O(seq^2) scores.
            if compute_dtype in ("bfloat16", "float16") and softcap is None:
                return "cudnn"
            if softcap is None and not windowed:
                return "pallas_gpu"
        return "blockwise"
    if backend == "cudnn" and platform not in ("gpu", "cuda"):
        raise ValueError(f"--attention cudnn needs an NVIDIA GPU; this host's platform is {platform}")
    if backend == "cudnn" and compute_dtype not in ("bfloat16", "float16"):
        raise ValueError(f"--attention cudnn needs bfloat16 or float16 compute, not {compute_dtype}")
    # splash and pallas_gpu also run on CPU, in Pallas interpret mode (slow: tests only).
    if backend == "splash" and platform not in ("tpu", "cpu"):
        raise ValueError(f"--attention splash is a TPU kernel; this host's platform is {platform}")
    if backend == "pallas_gpu" and platform not in ("gpu", "cuda", "rocm", "cpu"):
        raise ValueError(f"--attention pallas_gpu is a GPU kernel; this host's platform is {platform}")
    _refuse_features(backend, softcap, windowed)
    return backend


def _visible_mask(segment_ids: jax.Array, window=0) -> jax.Array:
    """[B, 1, T, T] booleans: same segment, key not after query and within the window."""
    t = jnp.arange(segment_ids.shape[1])
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    visible = same & (t[:, None] >= t[None, :])
    near = _in_window(t, t, window)
    if near is not None:
        visible = visible & near[None]
    return visible[:, None]


def dense_attention(q, k, v, segment_ids, implementation: str, window=0, *,
                    scale: float | None = None, softcap: float | None = None) -> jax.Array:
    """jax.nn.dot_product_attention with the segment+causal+window mask spelled out
    (O(T^2)); with soft-capping (which that function lacks), the same softmax written here."""
    mask = _visible_mask(segment_ids, window)
    if softcap is not None:
        _refuse_features(implementation, softcap, False)
        return _dense_softmax(q, k, v, mask[:, 0], scale, softcap)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, implementation=implementation
    ).astype(q.dtype)


def _pad_to_tile(q, k, v, segment_ids):
    """Pad the sequence to a multiple of _PALLAS_TILE; padded tokens get segment -1, seen
    by no real token (they see each other, so no row of scores is empty)."""
    pad = -q.shape[1] % _PALLAS_TILE
    if not pad:
        return q, k, v, segment_ids
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    return q, k, v, jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)


def splash_attention(q, k, v, segment_ids, interpret: bool = False, *, window: int = 0,
                     scale: float | None = None, softcap: float | None = None) -> jax.Array:
    """TPU Pallas splash attention, one kv head (and its query group) at a time (MQA kernel).
    `window` is static here: the mask (causal, or local of `window` tokens) is built into
    the kernel."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    seq = q.shape[1]
    q, k, v, seg = _pad_to_tile(q, k, v, segment_ids)
    batch, padded, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    block = min(512, padded) if padded % min(512, padded) == 0 else _PALLAS_TILE
    if window > 0:
        # LocalMask keeps kv in [q - left, q + right]: left = window - 1 is t - s < window,
        # right = 0 is causality.
        mask = sm.LocalMask((padded, padded), window_size=(window - 1, 0), offset=0)
    else:
        mask = sm.CausalMask((padded, padded))
    kernel = sk.make_splash_mqa(
        sm.MultiHeadMask([mask] * group), attn_logits_soft_cap=softcap,
        head_shards=1, q_seq_shards=1, interpret=interpret,
        block_sizes=sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block),
    )
    # The kernel does not scale the scores; q is scaled here, in its own dtype.
    scale = head_dim**-0.5 if scale is None else scale
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(batch, padded, n_kv, group, head_dim)
    qh = qh.transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, hd]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, hd]

    def one_row(q_row, k_row, v_row, seg_row):
        ids = sk.SegmentIds(q=seg_row, kv=seg_row)
        return jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=ids))(q_row, k_row, v_row)

    out = jax.vmap(one_row)(qh, kh, vh, seg)  # [B, Hkv, G, T, hd]
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, padded, n_heads, head_dim)
    return out[:, :seq].astype(q.dtype)


def pallas_gpu_attention(q, k, v, segment_ids, interpret: bool = False, *,
                         scale: float | None = None) -> jax.Array:
    """The Pallas GPU (Triton) flash-attention kernel with segment ids and a causal mask
    (it has no window and no soft-capping)."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    seq = q.shape[1]
    q, k, v, seg = _pad_to_tile(q, k, v, segment_ids)
    group = q.shape[2] // k.shape[2]
    # The kernel wants as many kv heads as query heads.
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = gpu_attention.mha(q, k, v, seg, sm_scale=scale, causal=True, interpret=interpret)
    return out[:, :seq].astype(q.dtype)


def _kv_heads_for_local_queries(k: jax.Array, group: int, n_local: int, axis: str) -> jax.Array:
    """Inside shard_map: the kv head of each of this device's `n_local` query heads.
    k: [B, T, Hkv, hd], whole -> [B, T, n_local, hd]."""
    first = jax.lax.axis_index(axis) * n_local
    return jnp.take(k, (first + jnp.arange(n_local)) // group, axis=2)


def _under_mesh(kernel: Callable, mesh: Mesh, n_heads: int, n_kv: int) -> Callable:
    """Run a per-device kernel under shard_map: rows over data, heads over model if they split."""
    m = mesh.shape[MODEL]
    q_split, kv_split = n_heads % m == 0, n_kv % m == 0
    heads = MODEL if q_split else None
    q_spec = PartitionSpec(DATA, None, heads, None)
    kv_spec = PartitionSpec(DATA, None, MODEL if (q_split and kv_split) else None, None)

    def body(q, k, v, seg):
        if q_split and not kv_split and m > 1:
            k = _kv_heads_for_local_queries(k, n_heads // n_kv, q.shape[2], MODEL)
            v = _kv_heads_for_local_queries(v, n_heads // n_kv, q.shape[2], MODEL)
        return kernel(q, k, v, seg)

    return jax.shard_map(
        body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(DATA, None)),
        out_specs=q_spec, check_vma=False,
    )


def _nan_like(q, k, v, segment_ids):
    return jnp.full(q.shape, jnp.nan, q.dtype)


def _select_window(kernels: dict[int, Callable]) -> AttentionFn:
    """fn(q, k, v, segment_ids, window=0) calling the kernel built for `window`.

    A static window not among the kernels is refused; a traced one picks its kernel with
    lax.switch, and one not among them gives NaN (a traced value cannot raise)."""
    windows = sorted(kernels)

    def attend(q, k, v, segment_ids, window=0):
        if _is_static(window):
            if int(window) not in kernels:
                raise ValueError(f"attention window {int(window)} is not among the windows the "
                                 f"kernels were built for ({', '.join(map(str, windows))})")
            return kernels[int(window)](q, k, v, segment_ids)
        if len(windows) == 1:
            branches = [kernels[windows[0]], _nan_like]
            index = jnp.where(window == windows[0], 0, 1)
        else:
            branches = [kernels[w] for w in windows] + [_nan_like]
            hits = jnp.asarray(windows, jnp.int32) == window
            index = jnp.where(hits.any(), jnp.argmax(hits), len(windows))
        return jax.lax.switch(index, branches, q, k, v, segment_ids)

    return attend


def make_attention(
    backend: str, mesh: Mesh | None = None, *, n_heads: int = 0, n_kv_heads: int = 0,
    scale: float | None = None, softcap: float | None = None, windows=(0,),
) -> AttentionFn:
    """fn(q [B,T,H,hd], k, v [B,T,Hkv,hd], segment_ids [B,T], window=0) -> [B,T,H,hd] for a
    resolved backend (see resolve_backend).

    `scale` (default head_dim**-0.5) and `softcap` are the model's; `windows` is the set of
    window values its layers use (0 = global). Dense backends and blockwise take any
    window, traced or not; Pallas kernels are built once per window in `windows` and
    chosen by lax.switch on a traced one. Pallas kernels under a mesh of > 1 device run in
    shard_map (n_heads / n_kv_heads are needed then); on CPU they run interpreted.
    """
    windows = tuple(sorted({int(w) for w in windows})) or (0,)
    if any(w < 0 for w in windows):
        raise ValueError(f"attention windows must be >= 0 (0 = global), not {windows}")
    _refuse_features(backend, softcap, windows != (0,))
    if backend == "blockwise":
        def blockwise(q, k, v, segment_ids, window=0):
            return attention(q, k, v, segment_ids, window=window, scale=scale, softcap=softcap)
        return blockwise
    if backend in ("xla", "cudnn"):
        def dense(q, k, v, segment_ids, window=0):
            return dense_attention(q, k, v, segment_ids, backend, window, scale=scale, softcap=softcap)
        return dense
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    interpret = platform == "cpu"
    if backend == "splash":
        kernels = {w: functools.partial(splash_attention, interpret=interpret, window=w,
                                        scale=scale, softcap=softcap) for w in windows}
    elif backend == "pallas_gpu":
        kernels = {0: functools.partial(pallas_gpu_attention, interpret=interpret, scale=scale)}
    else:
        raise ValueError(f"unresolved attention backend {backend!r} (call resolve_backend first)")
    if mesh is not None and np.prod(list(mesh.shape.values())) > 1:
        kernels = {w: _under_mesh(kernel, mesh, n_heads, n_kv_heads) for w, kernel in kernels.items()}
    return _select_window(kernels)
