"""Rotary position embeddings (RoPE), with the scaling variants the model families use.

Numerical reference: the installed transformers (written against 5.25):
`modeling_rope_utils.py` (`ROPE_INIT_FUNCTIONS`, `RotaryEmbeddingConfigMixin`), the
families' `<Family>RotaryEmbedding` modules and their configuration classes (Gemma 3's
`Gemma3TextConfig.convert_rope_params_to_dict` for the per-layer-type tables).

A `Rope` holds one table's inverse frequencies as float32 values computed on the host
with NumPy, repeating transformers' float32 torch operations one by one in the same order
(its `1.0 / t` is `reciprocal(t) * 1.0`, Python scalars are rounded to float32 before an
operation, and so on). One step cannot be repeated bit for bit: torch raises
`theta ** exponent` with its own float32 `pow` (SLEEF's in vectorised loops, libm's in
the rest), which is not correctly rounded; here that power is correctly rounded (computed
in float64, then rounded once to float32). The two powers differ by at most 1 ulp (on
the x86 AVX-512 machine measured: in 1.6% of the entries over head sizes 2..512 and
thetas 1e3..8e6; in none at head_dim 16, the tests' size). Every other step is
bit-identical, so `inv_freq` equals transformers' wherever the powers agree and is within
1 ulp elsewhere (2 for YaRN's interpolated entries, 1 / (factor * power)). Because the
table is computed here, not on the accelerator, it is the same on CPU, GPU and TPU.

`rope_angles` and `apply_rope` then compute what the rotary modules' `forward` and
`apply_rotary_pos_emb` compute: angles `float32(position) * inv_freq` in float32, their
cos and sin times the table's `attention_scaling` (rounded to float32), and the
(first half, second half) rotation of `rotate_half`.

Config formats (both parse to the same `Rope`):
  * transformers 5 writes `rope_parameters`: one dict with `rope_type`, `rope_theta` and
    the type's fields; for Gemma 3 a dict keyed by layer type ("full_attention",
    "sliding_attention"), one such dict each.
  * older config.json files carry a top-level `rope_theta` and a `rope_scaling` dict
    (`rope_type`, or the older `type`, and the fields); Gemma 3 adds
    `rope_local_base_freq`, the sliding layers' theta (they use default scaling), and its
    `rope_scaling` applies to the global ("full_attention") layers only.

Supported rope types: default, linear, dynamic (exact up to the original length only,
see `Rope.max_exact_positions`), yarn and llama3. Everything else (longrope,
proportional, partial rotation, ...) is refused with a one-line ValueError naming the
config field, never computed approximately.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FULL, SLIDING = "full_attention", "sliding_attention"
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

# transformers' configuration classes' `default_theta` (used when config.json has no
# rope_theta) and `max_position_embeddings` defaults, for the families actex runs. Any
# other model_type falls back to PreTrainedConfig's theta 10000 and no default length.
_DEFAULT_THETA = {"mixtral": 1_000_000.0}
_GEMMA3_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}
_DEFAULT_MAX_POSITIONS = {
    "llama": 2048,
    "qwen2": 32768,
    "qwen3": 32768,
    "qwen3_moe": 32768,
    "mistral": 131072,
    "mixtral": 131072,
    "gemma2": 8192,
    "gemma3_text": 131072,
}


@dataclasses.dataclass(frozen=True)
class Rope:
    """One rotary table: what cos/sin at any position need.

    Frozen and hashable: configs use it as a dict key, and two configs whose tables are
    equal compare equal.
    """

    # [head_dim // 2] inverse frequencies, float32 values (Python floats holding them
    # exactly), equal to transformers' `inv_freq` or 1-2 ulps away (module docstring).
    inv_freq: tuple[float, ...]
    # Multiplies cos and sin (YaRN's attention factor); 1.0 for the other types.
    attention_scaling: float = 1.0
    # 'dynamic' only: transformers recomputes inv_freq once a forward sees a position
    # >= this (its max_position_embeddings); the table here is exact below it only.
    # None: exact at any position.
    max_exact_positions: int | None = None


def rope_from_hf(
    params: dict | None,
    *,
    theta: float,
    head_dim: int,
    max_position_embeddings: int | None,
    field: str = "rope_parameters",
) -> Rope:
    """The table of one RoPE parameter dict, as transformers' rope init function computes it.

    Args:
        params: one (flat, or one layer type's) rope dict: `rope_type` (or the legacy
            `type`; `rope_type` wins when both are present), optional `rope_theta`, and the
            type's fields. None or {} is default RoPE.
        theta: the base used when `params` has no `rope_theta` (the config's top-level
            `rope_theta` or the family's default).
        head_dim: the attention head size (even); the table has head_dim // 2 entries.
        max_position_embeddings: the config's; read by 'dynamic' (the length it is exact
            to) and as `original_max_position_embeddings` for 'yarn' and 'llama3' when the
            dict has none (transformers' `standardize_rope_params`). None: refused where
            needed.
        field: the config.json path of `params`, for error messages.

    The fields each type reads, with transformers' defaults: linear reads `factor`
    (inv_freq / factor); dynamic, yarn and llama3 are described on `_dynamic`, `_yarn` and
    `_llama3`.

    Returns: the Rope; `attention_scaling` is 1.0 except for yarn, `max_exact_positions`
    None except for dynamic.

    Raises:
        ValueError (one line, naming the field and its value) for an unsupported rope
        type (longrope, proportional, ...), partial_rotary_factor other than 1, a missing
        or ill-typed field the type needs (factor, ...), values transformers would divide
        by zero with, an odd or non-positive head_dim, or a missing
        max_position_embeddings where the type needs it.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim: expected a positive even integer, got {head_dim!r}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ValueError(f"field {field}: expected an object, got {params!r}")
    fields = _Fields(params, field)

    rope_type = _rope_type(params, fields, field)
    if "rope_theta" in params:
        theta = fields.number("rope_theta", positive=True)
    elif not _is_number(theta) or theta <= 0:
        raise ValueError(f"field rope_theta: expected a positive number, got {theta!r}")

    if rope_type == "default":
        return Rope(_floats(_default_inv_freq(theta, head_dim)))
    if rope_type == "linear":
        factor = fields.number("factor", positive=True)
        return Rope(_floats(_default_inv_freq(theta, head_dim) / np.float32(factor)))
    if rope_type == "dynamic":
        return _dynamic(fields, theta, head_dim, max_position_embeddings)
    original = fields.number("original_max_position_embeddings", positive=True, required=False)
    if original is None:
        if max_position_embeddings is None:
            raise ValueError(
                f"field {field}.original_max_position_embeddings: missing, and no "
                f"max_position_embeddings to fall back to (rope_type {rope_type!r} needs one)"
            )
        original = max_position_embeddings
    if rope_type == "yarn":
        return _yarn(fields, theta, head_dim, original)
    return _llama3(fields, theta, head_dim, original)


def hf_ropes(hf: dict, head_dim: int) -> dict[str, Rope]:
    """The Rope of each attention layer type of a config.json dict.

    Returns {"full_attention": Rope, "sliding_attention": Rope}. For most families both
    keys map to the same Rope (one table), read as transformers' `convert_rope_params_to_dict`
    reads it: `rope_scaling` if non-empty, else `rope_parameters` (so a legacy
    `rope_scaling` wins when a file has both), `rope_theta` inside that dict, else the
    top-level `rope_theta`, else the family's default (1e6 for mixtral, 1e4 otherwise);
    a top-level `original_max_position_embeddings` replaces the dict's for yarn and llama3,
    as transformers 5's `standardize_rope_params` does.

    model_type gemma3_text (or gemma3, whose `text_config` is read): the global
    ("full_attention") layers use `rope_theta` (default 1e6) and `rope_scaling`; the
    sliding layers `rope_local_base_freq` (default 1e4) with default RoPE (legacy format);
    or the transformers-5 `rope_parameters` keyed by layer type, each dict read as above
    (a missing `rope_theta` filled the same way). A per-layer yarn dict's `truncate` is
    ignored, as transformers ignores it (it reads `truncate` from the top level of
    `rope_parameters`, where the per-layer form has none, so truncation is always on).

    A missing `max_position_embeddings` is the family's transformers default.

    Raises: ValueError, one line, naming the config.json path of the offending field
    (e.g. "field rope_parameters.full_attention.factor: ..."): everything `rope_from_hf`
    refuses, a top-level partial_rotary_factor other than 1, per-layer-type parameters for
    a family whose transformers code reads one flat dict, and a Gemma 3 `rope_scaling`
    with only the legacy `type` key (transformers reads it as default RoPE).
    """
    prefix = ""
    model_type = hf.get("model_type")
    if model_type == "gemma3" and isinstance(hf.get("text_config"), dict):
        hf, prefix, model_type = hf["text_config"], "text_config.", "gemma3_text"
    gemma3 = model_type in ("gemma3", "gemma3_text")
    top = _Fields(hf, prefix.rstrip(".") or None)
    max_positions = top.number("max_position_embeddings", positive=True, integer=True, required=False)
    if max_positions is None:
        max_positions = _DEFAULT_MAX_POSITIONS.get("gemma3_text" if gemma3 else model_type)
    partial = top.number("partial_rotary_factor", required=False)
    if partial is not None and partial != 1:
        raise ValueError(
            f"field {prefix}partial_rotary_factor: {partial!r} not supported "
            "(only 1.0: RoPE over the whole head)"
        )
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ValueError(f"field {prefix}{key}: expected an object, got {hf[key]!r}")
    if gemma3:
        return _gemma3_ropes(hf, top, head_dim, max_positions, prefix)

    theta = top.number("rope_theta", positive=True, required=False)
    theta = _DEFAULT_THETA.get(model_type, 10_000.0) if theta is None else theta
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = dict(hf.get(key) or {})
    nested = sorted(set(params) & {FULL, SLIDING})
    if nested:
        raise ValueError(
            f"field {prefix}{key}.{nested[0]}: per-layer-type RoPE parameters are not read "
            f"by model_type {model_type!r} (one flat dict expected)"
        )
    original = top.number("original_max_position_embeddings", positive=True, required=False)
    if original is not None:
        params["original_max_position_embeddings"] = original
    rope = rope_from_hf(params, theta=theta, head_dim=head_dim,
                        max_position_embeddings=max_positions, field=prefix + key)
    return {FULL: rope, SLIDING: rope}


def rope_angles(positions: jax.Array, rope: Rope) -> tuple[jax.Array, jax.Array]:
    """cos, sin of the rotary angles of `rope` at `positions`.

    Args:
        positions: int32 [B, T] token positions (exact in float32 below 2**24).
        rope: the table.

    Returns: cos, sin, float32 [B, T, 1, head_dim // 2] (the 1 broadcasts over heads),
    `attention_scaling` applied as transformers applies it (cos * float32(scaling)).
    For 'dynamic' tables they match transformers only below `rope.max_exact_positions`.
    """
    inv_freq = jnp.asarray(np.asarray(rope.inv_freq, np.float32))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if rope.attention_scaling != 1.0:
        scaling = np.float32(rope.attention_scaling)
        cos, sin = cos * scaling, sin * scaling
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the (first half, second half) pairs of each head of x by the angles.

    Args:
        x: [B, T, heads, head_dim] queries or keys, any float dtype.
        cos, sin: float32 [B, T, 1, head_dim // 2], from `rope_angles`.

    Returns: x rotated, computed in float32 and cast back to x's dtype, as transformers'
    `x * cos + rotate_half(x) * sin` with cos and sin repeated over both halves.
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ---- the rope types ---------------------------------------------------------------------


def _default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """float32 [head_dim // 2]: 1 / theta ** (arange(0, head_dim, 2) / head_dim)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return np.float32(1.0) / _pow_f32(theta, exponents)


def _pow_f32(base: float, exponents: np.ndarray) -> np.ndarray:
    """float32(base) ** exponents (float32), correctly rounded to float32.

    Computed in float64 and rounded once; torch's float32 pow may be 1 ulp away.
    """
    return (np.float64(np.float32(base)) ** exponents.astype(np.float64)).astype(np.float32)


def _rope_type(params: dict, fields: "_Fields", field: str) -> str:
    """The dict's rope type (`rope_type`, else the legacy `type`), refused in one line when
    actex does not compute it or when only part of each head is rotated."""
    type_key = "rope_type" if "rope_type" in params else "type"
    rope_type = params.get(type_key, "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"field {field}.{type_key}: {rope_type!r} not supported "
            f"(expected one of {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    partial = fields.number("partial_rotary_factor", required=False)
    if partial is not None and partial != 1:
        raise ValueError(
            f"field {field}.partial_rotary_factor: {partial!r} not supported "
            "(only 1.0: RoPE over the whole head)"
        )
    return rope_type


def _dynamic(fields: _Fields, theta: float, head_dim: int, max_positions: int | None) -> Rope:
    """transformers' `_compute_dynamic_ntk_parameters` at init (seq_len = max positions).

    Reads `factor`. NTK scaling grows theta with the sequence length past
    max_position_embeddings; below it the table is default RoPE (transformers' init-time
    table, theta * 1.0 ** (d / (d - 2))), so `max_exact_positions` is
    max_position_embeddings.
    """
    factor = fields.number("factor", positive=True)
    if max_positions is None:
        raise ValueError("field max_position_embeddings: missing (rope_type 'dynamic' needs it)")
    if head_dim <= 2:
        raise ValueError(f"head_dim: {head_dim} too small for rope_type 'dynamic' (> 2 needed)")
    seq_len = max_positions
    # The same Python float operations, in the same order: the result is theta up to
    # rounding of (factor * L / L) - (factor - 1), then float32(base) as torch takes it.
    base = theta * ((factor * seq_len / max_positions) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return Rope(_floats(_default_inv_freq(base, head_dim)), max_exact_positions=max_positions)


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    """YaRN's attention temperature term, 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn(fields: _Fields, theta: float, head_dim: int, original: float) -> Rope:
    """transformers' `_compute_yarn_parameters`, operation for operation.

    Reads `factor` (required: transformers derives a null one from
    max_position_embeddings / original_max_position_embeddings, refused here),
    `original` (the dict's original_max_position_embeddings, else max_position_embeddings;
    `hf_ropes` applies a top-level config.json value, which transformers 5 prefers),
    beta_fast (a falsy value means 32), beta_slow (falsy means 1), attention_factor (None:
    0.1 * ln(factor) + 1 for factor > 1, else 1; or, if mscale and mscale_all_dim are both
    truthy, (0.1 * mscale * ln(factor) + 1) / (0.1 * mscale_all_dim * ln(factor) + 1)),
    truncate (default True: floor/ceil the correction range; a falsy value, None included,
    does not truncate). transformers 5 reads original_max_position_embeddings only through
    that dict: it does not scale max_position_embeddings by the factor, and
    max_position_embeddings itself is used only as that fallback.
    """
    factor = fields.number("factor", positive=True)
    attention_factor = fields.number("attention_factor", required=False)
    mscale = fields.number("mscale", required=False)
    mscale_all_dim = fields.number("mscale_all_dim", required=False)
    beta_fast = fields.number("beta_fast", required=False) or 32
    beta_slow = fields.number("beta_slow", required=False) or 1
    truncate = fields.params.get("truncate", True)
    if truncate is not None and not isinstance(truncate, bool):
        raise ValueError(f"field {fields.where}.truncate: expected true, false or null, got {truncate!r}")
    for name, beta in (("beta_fast", beta_fast), ("beta_slow", beta_slow)):
        if beta < 0:
            raise ValueError(f"field {fields.where}.{name}: expected a positive number, got {beta!r}")
    if theta == 1:
        raise ValueError("field rope_theta: 1 leaves yarn's correction range undefined (log 1 = 0)")

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # The dimension index whose wavelength fits `rotations` turns into `original`.
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = (np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    extrapolation_weight = np.float32(1) - np.clip(ramp, np.float32(0), np.float32(1))

    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    pos_freqs = _pow_f32(theta, exponents)
    extrapolated = np.float32(1) / pos_freqs
    interpolated = np.float32(1) / (np.float32(factor) * pos_freqs)
    inv_freq = (interpolated * (np.float32(1) - extrapolation_weight)
                + extrapolated * extrapolation_weight)
    return Rope(_floats(inv_freq), attention_scaling=float(attention_factor))


def _llama3(fields: _Fields, theta: float, head_dim: int, original: float) -> Rope:
    """transformers' `_compute_llama3_parameters`, operation for operation.

    Reads factor, low_freq_factor, high_freq_factor; `original` is the dict's
    original_max_position_embeddings, else max_position_embeddings.
    """
    factor = fields.number("factor", positive=True)
    low_freq_factor = fields.number("low_freq_factor", positive=True)
    high_freq_factor = fields.number("high_freq_factor", positive=True)
    if high_freq_factor == low_freq_factor:
        raise ValueError(
            f"field {fields.where}.high_freq_factor: {high_freq_factor!r} equals low_freq_factor "
            "(the smoothing divides by their difference)"
        )
    f32 = np.float32
    inv_freq = _default_inv_freq(theta, head_dim)
    low_freq_wavelen = f32(original / low_freq_factor)
    high_freq_wavelen = f32(original / high_freq_factor)
    # torch's `2 * math.pi / t` and `n / t` are reciprocal(t) * scalar.
    wavelen = (f32(1) / inv_freq) * f32(2 * math.pi)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq)
    smooth = (((f32(1) / wavelen) * f32(original) - f32(low_freq_factor))
              / f32(high_freq_factor - low_freq_factor))
    smoothed = (f32(1) - smooth) * scaled / f32(factor) + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return Rope(_floats(np.where(medium, smoothed, scaled).astype(np.float32)))


# ---- helpers ------------------------------------------------------------------------------


def _floats(values: np.ndarray) -> tuple[float, ...]:
    """The float32 values as a tuple of Python floats (exact: float64 holds any float32)."""
    assert values.dtype == np.float32, values.dtype
    return tuple(float(v) for v in values)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class _Fields:
    """Typed reads of one config dict, with errors naming the config.json path."""

    def __init__(self, params: dict, where: str | None):
        self.params, self.where = params, where

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def number(self, key: str, *, required: bool = True, positive: bool = False,
               integer: bool = False) -> float | None:
        """params[key] as a finite number (None when absent or null and not required)."""
        value = self.params.get(key)
        if value is None:
            if required:
                raise ValueError(f"field {self.path(key)}: missing (a number is required)")
            return None
        ok = _is_number(value) and (not integer or isinstance(value, int)) and (not positive or value > 0)
        if not ok:
            kind = ("positive " if positive else "") + ("integer" if integer else "number")
            raise ValueError(f"field {self.path(key)}: expected a {kind}, got {value!r}")
        return value


def _gemma3_ropes(hf: dict, top: _Fields, head_dim: int, max_positions: int | None,
                  prefix: str) -> dict[str, Rope]:
    """Gemma 3's two tables, as `Gemma3TextConfig.convert_rope_params_to_dict` builds them."""
    given = hf.get("rope_parameters")
    if given is None:
        layers: dict[str, Any] = {SLIDING: {"rope_type": "default"}, FULL: {"rope_type": "default"}}
        origin = {FULL: "rope_scaling", SLIDING: "rope_local_base_freq"}
    else:
        extra = sorted(set(given) - {FULL, SLIDING})
        if extra:
            raise ValueError(
                f"field {prefix}rope_parameters.{extra[0]}: not a layer type; gemma3 reads a dict "
                f"keyed by layer type ({FULL}, {SLIDING})"
            )
        layers = {k: (dict(v) if isinstance(v, dict) else v) for k, v in given.items()}
        origin = {k: f"rope_parameters.{k}" for k in (FULL, SLIDING)}
        for layer_type, layer in layers.items():
            if layer is not None and not isinstance(layer, dict):
                raise ValueError(f"field {prefix}rope_parameters.{layer_type}: expected an object, got {layer!r}")
    scaling = hf.get("rope_scaling")
    if scaling is not None:
        if not isinstance(layers.get(FULL), dict):
            raise ValueError(f"field {prefix}rope_scaling: no rope_parameters.{FULL} to apply it to")
        if given is None and "type" in scaling and "rope_type" not in scaling and scaling["type"] != "default":
            # Gemma3TextConfig merges rope_scaling into {"rope_type": "default"}: a legacy
            # `type` alone is then ignored and the layers get default RoPE.
            raise ValueError(
                f"field {prefix}rope_scaling.type: {scaling['type']!r} is ignored by transformers "
                "for gemma3 (it reads rope_scaling.rope_type); not supported"
            )
        layers[FULL].update(scaling)
        origin[FULL] = "rope_scaling" if given is None else origin[FULL]

    ropes = {}
    for layer_type, theta_key in ((FULL, "rope_theta"), (SLIDING, "rope_local_base_freq")):
        layer = layers.get(layer_type) or {"rope_type": "default"}
        layer = {k: v for k, v in layer.items() if k != "truncate"}  # see hf_ropes
        theta = top.number(theta_key, positive=True, required=False)
        theta = _GEMMA3_THETA[layer_type] if theta is None else theta
        ropes[layer_type] = rope_from_hf(layer, theta=theta, head_dim=head_dim,
                                         max_position_embeddings=max_positions,
                                         field=prefix + origin[layer_type])
    return ropes
