"""Memory-bounded causal + segment attention: blockwise online softmax.

A packed row holds several samples; `segment_ids` numbers them (0 = padding) and a query
sees a key only if both are in the same segment and the key is not later in the row.
Scores are computed one [q_block, kv_block] tile at a time with a running max and sum
(the FlashAttention recurrence), so memory is O(seq * block), never O(seq^2): a 32k-token
prompt needs a few tens of MB of scores, not the 60 GB a full score tensor would take.

Key blocks that no query of a query block can see are skipped: those after it (causal)
and those before the start of its first segment (segments are contiguous runs of equal
ids, as packing produces them). A row holding one long sample thus costs half the full
square, and a row packed with short samples costs little more than the samples alone.

That blockwise kernel is the reference and the CPU path. `make_attention(backend, mesh)`
returns the same function computed by a platform's fused kernel (`--attention`):

    blockwise   the kernel below; any platform (GSPMD partitions it over the mesh).
    splash      TPU: Pallas splash attention with segment ids (causal mask, O(seq) memory).
    pallas_gpu  GPU: the Pallas (Triton) flash-attention kernel with segment ids.
    cudnn       GPU: jax.nn.dot_product_attention(implementation="cudnn") with a dense
                segment+causal mask ([rows, 1, seq, seq] booleans); bfloat16/float16 only.
    xla         jax.nn.dot_product_attention(implementation="xla"), same dense mask: the
                plain XLA softmax, O(seq^2) memory; a second reference.
    auto        splash on TPU; cudnn on GPU for 16-bit compute, pallas_gpu for float32;
                blockwise on CPU.

Pallas kernels cannot be partitioned by XLA, so under a mesh they run inside shard_map:
rows over "data", query heads over "model" when they divide it; when kv heads do not
divide the model axis, each device picks the kv head of each of its query heads.
On CPU the Pallas kernels run in interpret mode (how the tests compare them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

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


def attention(
    q: jax.Array,  # [B, T, H, hd]
    k: jax.Array,  # [B, T, Hkv, hd]
    v: jax.Array,  # [B, T, Hkv, hd]
    segment_ids: jax.Array,  # [B, T] int32
    block: int = DEFAULT_BLOCK,
) -> jax.Array:  # [B, T, H, hd], in q's dtype
    """Causal, segment-masked grouped-query attention, one tile of scores at a time."""
    batch, seq, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    scale = head_dim**-0.5

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

    # First key block any query of each query block can see (earliest segment start).
    first_tokens = _segment_starts(segment_ids)[:, ::block]  # [B, n_blocks]
    kv_first = (jnp.min(first_tokens, axis=0) // block).astype(jnp.int32)  # [n_blocks]
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
            visible = visible[:, None, None]  # [B, 1, 1, bq, bk]
            scores = jnp.einsum(
                "bhgqd,bhkd->bhgqk", q_tile, k_tile, preferred_element_type=jnp.float32
            ) * scale
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
        # Causal: key blocks after this query block are never visited.
        _, l, acc = jax.lax.fori_loop(kv_first[qi], qi + 1, key_block, init)
        return (acc / l[..., None]).astype(q.dtype)  # [B,Hkv,G,bq,hd]

    out = jax.lax.map(query_block, jnp.arange(n_blocks))  # [nb, B, Hkv, G, bq, hd]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, n_blocks * block, n_heads, head_dim)
    return out[:, :seq]


# ----------------------------------------------------------------------- backends

BACKENDS = ("auto", "blockwise", "splash", "pallas_gpu", "cudnn", "xla")

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

# Pallas kernels tile the sequence; rows are padded up to a multiple of this (the packer's
# shapes already are multiples of 128, so this only matters for odd --max-seq-len values).
_PALLAS_TILE = 128


def resolve_backend(backend: str, platform: str, compute_dtype: str = "float32") -> str:
    """The concrete backend `--attention backend` means on `platform` (cpu/gpu/tpu).

    Raises ValueError for an unknown name or a kernel that cannot run on that platform.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--attention {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if platform == "tpu":
            return "splash"
        if platform in ("gpu", "cuda", "rocm"):
            return "cudnn" if compute_dtype in ("bfloat16", "float16") else "pallas_gpu"
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
    return backend


def _visible_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] booleans: same segment and key not after query."""
    t = jnp.arange(segment_ids.shape[1])
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & (t[:, None] >= t[None, :]))[:, None]


def dense_attention(q, k, v, segment_ids, implementation: str) -> jax.Array:
    """jax.nn.dot_product_attention with the segment+causal mask spelled out (O(T^2))."""
    return jax.nn.dot_product_attention(
        q, k, v, mask=_visible_mask(segment_ids), implementation=implementation
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


def splash_attention(q, k, v, segment_ids, interpret: bool = False) -> jax.Array:
    """TPU Pallas splash attention, one kv head (and its query group) at a time (MQA kernel)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    seq = q.shape[1]
    q, k, v, seg = _pad_to_tile(q, k, v, segment_ids)
    batch, padded, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_heads // n_kv
    block = min(512, padded) if padded % min(512, padded) == 0 else _PALLAS_TILE
    kernel = sk.make_splash_mqa(
        sm.MultiHeadMask([sm.CausalMask((padded, padded))] * group),
        head_shards=1, q_seq_shards=1, interpret=interpret,
        block_sizes=sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block),
    )
    # The kernel does not scale the scores; q is scaled here, in its own dtype.
    qh = (q * jnp.asarray(head_dim**-0.5, q.dtype)).reshape(batch, padded, n_kv, group, head_dim)
    qh = qh.transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, hd]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, hd]

    def one_row(q_row, k_row, v_row, seg_row):
        ids = sk.SegmentIds(q=seg_row, kv=seg_row)
        return jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=ids))(q_row, k_row, v_row)

    out = jax.vmap(one_row)(qh, kh, vh, seg)  # [B, Hkv, G, T, hd]
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, padded, n_heads, head_dim)
    return out[:, :seq].astype(q.dtype)


def pallas_gpu_attention(q, k, v, segment_ids, interpret: bool = False) -> jax.Array:
    """The Pallas GPU (Triton) flash-attention kernel with segment ids and a causal mask."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    seq = q.shape[1]
    q, k, v, seg = _pad_to_tile(q, k, v, segment_ids)
    group = q.shape[2] // k.shape[2]
    # The kernel wants as many kv heads as query heads.
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    out = gpu_attention.mha(q, k, v, seg, sm_scale=q.shape[-1] ** -0.5, causal=True, interpret=interpret)
    return out[:, :seq].astype(q.dtype)


def _kv_heads_for_local_queries(k: jax.Array, group: int, n_local: int, axis: str) -> jax.Array:
    """Inside shard_map: the kv head of each of this device's `n_local` query heads.
    k: [B, T, Hkv, hd], whole -> [B, T, n_local, hd]."""
    first = jax.lax.axis_index(axis) * n_local
    return jnp.take(k, (first + jnp.arange(n_local)) // group, axis=2)


def _under_mesh(kernel: Callable, mesh: Mesh, n_heads: int, n_kv: int) -> AttentionFn:
    """Run a per-device kernel under shard_map: rows over data, heads over model if they split."""
    from actex.model.mesh import DATA, MODEL

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


def make_attention(backend: str, mesh: Mesh | None = None, *, n_heads: int = 0, n_kv_heads: int = 0) -> AttentionFn:
    """fn(q [B,T,H,hd], k, v [B,T,Hkv,hd], segment_ids [B,T]) -> [B,T,H,hd] for a resolved
    backend (see resolve_backend). Pallas kernels under a mesh of > 1 device run in
    shard_map (n_heads / n_kv_heads are needed then); on CPU they run interpreted."""
    if backend == "blockwise":
        return attention
    if backend in ("xla", "cudnn"):
        return functools.partial(dense_attention, implementation=backend)
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    interpret = platform == "cpu"
    if backend == "splash":
        kernel = functools.partial(splash_attention, interpret=interpret)
    elif backend == "pallas_gpu":
        kernel = functools.partial(pallas_gpu_attention, interpret=interpret)
    else:
        raise ValueError(f"unresolved attention backend {backend!r} (call resolve_backend first)")
    if mesh is None or np.prod(list(mesh.shape.values())) == 1:
        return kernel
    return _under_mesh(kernel, mesh, n_heads, n_kv_heads)
