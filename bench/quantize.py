"""int8 storage: error and size per block size, and the speed of coding and decoding.

    .venv/bin/python bench/quantize.py

Tokens of a 896-wide hook (Qwen2.5-0.5B's residual): Gaussian channels, plus one channel
r times the others (outlier features and massive activations put r at 30-3000). For each
scheme, the worst and mean per-token relative L2 error ||q(x) - x|| / ||x|| over the
tokens and the bytes a value. `actex int8` is the stored format (engine/quantize.py,
dequantized by store/quantize.py); the others are symmetric absmax with a float16 scale
per block of B channels (B = 896: per-token scales alone), coded as int8 or as
float8_e4m3fn (max |x| of the block mapped to 448, e4m3's largest finite value). A last
column, "heavy", has Student-t (3 degrees of freedom) channels: the heavy-tailed values
of MLP activations, where a float code's range could pay for its coarser mantissa.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from actex.engine.quantize import quantize
from actex.store.quantize import dequantize, token_bytes

WIDTH, TOKENS = 896, 20000


def absmax_blocks(x: np.ndarray, block: int) -> np.ndarray:
    grouped = x.reshape(len(x), -1, block)
    step = (np.abs(grouped).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    step = np.where(step > 0, step, 1)
    return (np.clip(np.round(grouped / step), -127, 127) * step).reshape(x.shape)


def float8_blocks(x: np.ndarray, block: int) -> np.ndarray:
    grouped = x.reshape(len(x), -1, block)
    scale = (np.abs(grouped).max(-1, keepdims=True) / 448).astype(np.float16).astype(np.float32)
    scale = np.where(scale > 0, scale, 1)
    codes = (grouped / scale).astype(ml_dtypes.float8_e4m3fn)
    return (codes.astype(np.float32) * scale).reshape(x.shape)


def actex_int8(x: np.ndarray) -> np.ndarray:
    codes, scale, packed, _ = jax.jit(quantize)(jnp.asarray(x))
    return dequantize(np.asarray(codes), np.asarray(scale), np.asarray(packed))


def errors(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    e = np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1)
    return float(e.max()), float(e.mean())


def tokens_with_outlier(ratio: float, rng) -> np.ndarray:
    x = rng.standard_normal((TOKENS, WIDTH)).astype(np.float32)
    if ratio:
        x[:, 3] = ratio * np.sign(x[:, 3])
    return x


def main() -> None:
    rng = np.random.default_rng(0)
    schemes = {"actex int8 (B=8, 4-bit exps)": (actex_int8, token_bytes(WIDTH) / WIDTH)}
    for block in (16, 32, 64, WIDTH):
        schemes[f"absmax B={block} f16 scale"] = (lambda x, b=block: absmax_blocks(x, b), 1 + 2 / block)
    for block in (8, 32, WIDTH):
        schemes[f"float8_e4m3fn B={block} f16 scale"] = (lambda x, b=block: float8_blocks(x, b), 1 + 2 / block)
    ratios = (0, 30, 100, 300, 3000)
    print(f"| scheme | bytes/value (vs bf16) | " + " | ".join(f"r={r} worst / mean %" for r in ratios)
          + " | heavy worst / mean % |")
    print("|---|---|" + "---|" * 6)
    data = {r: tokens_with_outlier(r, rng) for r in ratios}
    data["heavy"] = rng.standard_t(3, (TOKENS, WIDTH)).astype(np.float32)
    for name, (fn, size) in schemes.items():
        cells = [f"{100 * w:.2f} / {100 * m:.2f}" for w, m in (errors(x, fn(x)) for x in data.values())]
        print(f"| {name} | {size:.4f} ({size / 2:.3f}) | " + " | ".join(cells) + " |")

    x = data[100]
    codes, scale, packed, _ = (np.asarray(a) for a in jax.jit(quantize)(jnp.asarray(x)))
    coded = jax.jit(quantize)
    jax.block_until_ready(coded(jnp.asarray(x)))
    t = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(coded(jnp.asarray(x)))
    code_s = (time.perf_counter() - t) / 5
    t = time.perf_counter()
    for _ in range(5):
        dequantize(codes, scale, packed)
    decode_s = (time.perf_counter() - t) / 5
    print(f"\ncode (jax, this CPU): {x.nbytes / code_s / 1e9:.2f} GB/s of float32 in; "
          f"decode (numpy): {x.nbytes / decode_s / 1e9:.2f} GB/s of float32 out")


if __name__ == "__main__":
    main()
