"""int8 quantization on the device (the stored layout: store/quantize.py).

Only codes, one float32 step per token and packed 4-bit block exponents cross to the
host: 1.07 bytes a value instead of the 4 of the float32 the forward captured.
"""

from __future__ import annotations

import jax.numpy as jnp

from actex.store.quantize import BLOCK, CODE_MAX, FACTORS, num_blocks


def quantize(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """x [..., W] finite float32 -> (codes int8 [..., W], scale float32 [...],
    packed exponents uint8 [..., ceil(blocks / 2)], dequantized float32 [..., W]).

    The dequantized values are computed exactly as a reader computes them (the same
    float32 products), so statistics and errors taken from them are of the stored values.
    """
    width = x.shape[-1]
    blocks = num_blocks(width)
    lead = x.shape[:-1]
    padded = jnp.pad(x, [(0, 0)] * len(lead) + [(0, blocks * BLOCK - width)])
    grouped = padded.reshape(*lead, blocks, BLOCK)
    block_max = jnp.abs(grouped).max(-1)  # [..., blocks]
    token_max = block_max.max(-1)  # [...]
    scale = token_max / CODE_MAX
    ratio = block_max / jnp.where(token_max > 0, token_max, 1.0)[..., None]
    factors = jnp.asarray(FACTORS)
    # The most half octaves below the token's step that still covers the block's max:
    # compared with the very float32 table readers use, so no rounding of a log decides.
    exps = (factors >= ratio[..., None]).sum(-1) - 1  # [..., blocks] in 0..15
    steps = scale[..., None] * factors[exps]
    codes = jnp.clip(jnp.round(grouped / jnp.where(steps > 0, steps, 1.0)[..., None]), -CODE_MAX, CODE_MAX)
    values = (codes * steps[..., None]).reshape(*lead, blocks * BLOCK)[..., :width]
    exps = exps.astype(jnp.uint8)
    if blocks % 2:
        exps = jnp.pad(exps, [(0, 0)] * len(lead) + [(0, 1)])
    packed = exps[..., 0::2] | (exps[..., 1::2] << 4)
    codes = codes.reshape(*lead, blocks * BLOCK)[..., :width].astype(jnp.int8)
    return codes, scale, packed, values
