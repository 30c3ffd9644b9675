"""Stored int8 activations: symmetric 8-bit codes, a float32 step per token, and a 4-bit
exponent per block of 8 channels (docs/store.md, "int8 parts").

For one hook of width W, a part holds three tensors:

    <hook>              [tokens, W]                int8     codes in [-127, 127]
    <hook>/scale        [tokens]                   float32  the token's step: max |x| / 127
    <hook>/block_exp    [tokens, ceil(ceil(W/8)/2)] uint8    e of each block of 8 channels,
                                                            two per byte (low nibble first)

and channel c of token t is `code[t, c] * (scale[t] * 2 ** (-e[t, c // 8] / 2))`, the
product of the two factors taken in float32. e (0..15) is the smallest number of half
octaves that the block's own max |x| lies below the token's, so each block's step is
within a factor sqrt(2) of its own max / 127 (blocks more than 2^7.5 below the token's
max share the finest step, which is then negligible next to the token's norm).

Why blocks of 8 with 4-bit exponents (bench/quantize.py, docs/benchmarks.md): a token
with one channel 100-300x the others, as outlier features and massive activations make,
has a step set by that channel, and the other channels of its block round with that
step; the worst per-token relative L2 error grows as sqrt(block - 1). Blocks of 16 reach
1.2% there, blocks of 8 stay under 1%; per-token scales alone (one block of W) reach 7%.
A 16-bit scale per block of 8 would cost 0.25 bytes a value (0.625 of bfloat16's bytes);
the exponents cost 0.0625, so int8 stores 1.0625 bytes a value plus 4 bytes a token.
"""

from __future__ import annotations

import numpy as np

from actex.store.dtypes import activation_dtype

INT8 = "int8"
BLOCK = 8  # channels per block
LEVELS = 16  # exponents 0..15, one nibble
STEPS_PER_OCTAVE = 2  # exponent e divides the token's step by 2 ** (e / 2)
CODE_MAX = 127  # symmetric: -127..127 (-128 is never written)
SCALE, BLOCK_EXP = "scale", "block_exp"
# factor[e] = 2 ** (-e / 2) in float32: the table both the writer and readers multiply by.
FACTORS = (2.0 ** (-np.arange(LEVELS) / STEPS_PER_OCTAVE)).astype(np.float32)


def companion(hook: str, what: str) -> str:
    """The name of a quantized hook's scale or exponent tensor in a part."""
    return f"{hook}/{what}"


def is_companion(name: str) -> bool:
    return name.endswith((f"/{SCALE}", f"/{BLOCK_EXP}"))


def num_blocks(width: int) -> int:
    return -(-width // BLOCK)


def exp_bytes(width: int) -> int:
    """Bytes per token of a hook's packed block exponents (two nibbles a byte)."""
    return -(-num_blocks(width) // 2)


def token_bytes(width: int) -> int:
    """Stored bytes per token of one int8 hook: codes, scale, exponents."""
    return width + 4 + exp_bytes(width)


def stored_tensors(hook: str, width: int, dtype: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{tensor name: (shape after the token axis, numpy dtype)} a hook puts in a part."""
    if dtype != INT8:
        return {hook: ((width,), activation_dtype(dtype))}
    return {
        hook: ((width,), np.dtype(np.int8)),
        companion(hook, SCALE): ((), np.dtype(np.float32)),
        companion(hook, BLOCK_EXP): ((exp_bytes(width),), np.dtype(np.uint8)),
    }


def unpack_exponents(packed: np.ndarray, width: int) -> np.ndarray:
    """[tokens, exp_bytes] uint8 -> [tokens, num_blocks] exponents 0..15."""
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    return nibbles[:, : num_blocks(width)]


def pack_exponents(exps: np.ndarray) -> np.ndarray:
    """[tokens, num_blocks] 0..15 -> [tokens, exp_bytes] uint8, low nibble first."""
    if exps.shape[1] % 2:
        exps = np.pad(exps, ((0, 0), (0, 1)))
    return (exps[:, 0::2] | (exps[:, 1::2] << 4)).astype(np.uint8)


def block_steps(scale: np.ndarray, packed: np.ndarray, width: int) -> np.ndarray:
    """[tokens, num_blocks] float32 steps: scale[t] * 2 ** (-e / 2)."""
    return scale.astype(np.float32, copy=False)[:, None] * FACTORS[unpack_exponents(packed, width)]


def dequantize(codes: np.ndarray, scale: np.ndarray, packed: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Values [tokens, W] from codes [tokens, W], scales [tokens], packed exponents.

    One pass writes the output (numpy broadcasts the steps over each block of 8); only a
    width that is not a multiple of 8 goes through a padded copy of the codes.
    """
    tokens, width = codes.shape
    steps = block_steps(scale, packed, width)  # [tokens, blocks]
    blocks = steps.shape[1]
    if width % BLOCK:
        codes = np.pad(codes, ((0, 0), (0, blocks * BLOCK - width)))
    out = np.empty((tokens, blocks, BLOCK), np.float32)
    np.multiply(codes.reshape(tokens, blocks, BLOCK), steps[:, :, None], out=out)
    values = out.reshape(tokens, blocks * BLOCK)[:, :width]
    return values if np.dtype(dtype) == np.float32 else values.astype(dtype)
