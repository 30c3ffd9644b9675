"""The arithmetic every block shares: projections, RMSNorm, activations, matmul precision.

Numerics follow transformers' eager implementations with one deliberate difference:
every matmul accumulates in float32 (`preferred_element_type`) and norms run in float32,
whatever the parameter dtype; activations between operations stay in the parameter dtype,
as in transformers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ w [in, out] (+ b [out]): float32 accumulation, result in x's dtype."""
    y = jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, float32: RMSNorm before its gain
    (TransformerLens's `hook_normalized`)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, gemma: bool = False) -> jax.Array:
    """RMSNorm of x [..., D] with gain weight [D], result in x's dtype.

    Llama/Qwen (transformers' LlamaRMSNorm): weight * normalized.astype(x.dtype), the gain
    multiplying in x's dtype. Gemma (Gemma2RMSNorm): normalized * (1 + weight) in float32,
    then cast; a Gemma gain of 0 is the identity.
    """
    normalized = rms_normalize(x, eps)
    if gemma:
        return (normalized * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * normalized.astype(x.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    """The MLP gate's nonlinearity: "silu", or "gelu_tanh" (transformers' gelu_pytorch_tanh)."""
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {name!r}")


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft-capping, cap * tanh(x / cap), in x's dtype; identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def matmul_precision(dtype) -> str | None:
    """The matmul precision that makes `dtype` compute mean that dtype on every backend.

    JAX's default lets TPUs multiply float32 operands in one bfloat16 pass and GPUs use
    TF32 (10-bit mantissa), so a float32 forward would agree with float32 references only
    to ~1e-3. "highest" asks for true float32 (several bf16 passes on TPU, no TF32 on GPU;
    see docs/benchmarks.md for the cost). CPUs always compute float32 matmuls in float32,
    so their results are the same either way. bfloat16 inputs keep the default.
    """
    return "highest" if jnp.dtype(dtype) == jnp.float32 else None
