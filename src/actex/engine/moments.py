"""Device statistics: per-hook moments of each batch reduced on the accelerator.

Only a few vectors per hook cross to the host (`to_stats` makes them mergeable float64
HookStats), instead of a float64 pass over every activation there. int8 storage is coded
here too, on the device, so its moments are of the values readers get back.
"""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from actex.engine.quantize import quantize
from actex.store import quantize as q8
from actex.store.stats import HookStats


def hook_moments(x: jax.Array, real: jax.Array, first: jax.Array) -> dict:
    """Moments of x [rows, seq, width] (float32) over the stored tokens (`real`, [rows, seq]
    bool): count, shift, sum of
    x - shift, sum of (x - shift)^2, sum of L2 norms, and how many values are not finite.

    The sums are of deviations from a shift, the batch's first real token: a feature at 3e4
    with a spread of 0.01 has deviations of ~0.01, which float32 sums as precisely as any
    other (x - shift is even exact for values within a factor 2 of the shift). Summing x
    itself, its float32 mean was off by more than the spread and the variance by 42%.
    """
    mask = real[..., None]  # [rows, seq, 1]
    shift = x.reshape(-1, x.shape[-1])[first]
    deviation = jnp.where(mask, x - shift, 0.0)
    return {
        "count": real.sum(), "shift": shift, "s1": deviation.sum((0, 1)), "s2": (deviation * deviation).sum((0, 1)),
        "norm_sum": jnp.sqrt(jnp.where(mask, x * x, 0.0).sum(-1)).sum(),
        "nonfinite": (mask & ~jnp.isfinite(x)).sum(),
    }


def stored_tokens(stored: jax.Array) -> jax.Array:
    """[rows, seq] bool from the stored-token mask (PositionSelection.mask), or from segment
    ids (> 0: every real token, where every position is stored)."""
    return stored if stored.dtype == jnp.bool_ else stored > 0


@jax.jit
def batch_moments(outputs: dict, stored: jax.Array) -> dict:
    """Per hook, over the stored tokens of a packed batch, `hook_moments` of their values;
    `to_stats` turns them into HookStats.

    Reduced on the device, in float32 from the stored-dtype values: only a few vectors per
    hook cross to the host, instead of a float64 pass over every activation there (which
    cost more host CPU than encoding, hashing and writing the parts together). A value the
    cast to the stored dtype made infinite (float16 holds at most 65504) is counted.
    """
    real = stored_tokens(stored)
    first = jnp.argmax(real.reshape(-1))  # any index when the batch has no token: count 0
    return {hook: hook_moments(x.astype(jnp.float32), real, first) for hook, x in outputs.items()}


@jax.jit
def quantize_batch(outputs: dict, stored: jax.Array) -> tuple[dict, dict]:
    """int8 storage: ({tensor: array} to store, moments) for float32 outputs.

    Moments are of the dequantized values (what readers get), plus the quantization error:
    the largest and the summed per-token relative L2 error against the float32 values. A
    value that is not finite cannot be coded: it is counted (as `nonfinite`) and stored as 0.
    """
    real = stored_tokens(stored)
    first = jnp.argmax(real.reshape(-1))
    stored, moments = {}, {}
    for hook, x in outputs.items():
        x = x.astype(jnp.float32)
        finite = jnp.isfinite(x)
        x = jnp.where(finite, x, 0.0)
        codes, scale, packed, values = quantize(x)
        stored |= {hook: codes, q8.companion(hook, q8.SCALE): scale, q8.companion(hook, q8.BLOCK_EXP): packed}
        norm = jnp.sqrt((x * x).sum(-1))
        error = jnp.where(real, jnp.sqrt(((values - x) ** 2).sum(-1)) / jnp.where(norm > 0, norm, 1.0), 0.0)
        moments[hook] = hook_moments(values, real, first) | {
            "nonfinite": (real[..., None] & ~finite).sum(), "qerr_max": error.max(), "qerr_sum": error.sum(),
        }
    return stored, moments


def to_stats(moments: dict) -> dict[str, HookStats]:
    """Host copies of batch_moments' (or quantize_batch's) moments as HookStats (float64,
    mergeable): the shifted sums give mean = shift + S1/n and M2 = S2 - S1^2/n, with no
    cancellation at any offset."""
    stats = {}
    for hook, m in moments.items():
        n = int(m["count"])
        quant = {"quant_error_max": float(m["qerr_max"]), "quant_error_sum": float(m["qerr_sum"])} if "qerr_max" in m else {}
        if n == 0:
            stats[hook] = replace(HookStats.empty(int(np.shape(m["shift"])[0])), **quant)
            continue
        s1 = np.asarray(m["s1"], np.float64)
        mean = np.asarray(m["shift"], np.float64) + s1 / n
        m2 = np.maximum(np.asarray(m["s2"], np.float64) - s1 * s1 / n, 0.0)
        stats[hook] = HookStats(n, mean, m2, float(m["norm_sum"]), nonfinite=int(m["nonfinite"]), **quant)
    return stats
