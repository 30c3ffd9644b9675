"""Hook point names (TransformerLens's), their validation, order and widths.

A hook name is either global (`hook_embed`, `ln_final.hook_normalized`,
`ln_final.hook_out`) or per block (`blocks.{l}.hook_resid_post`, ...). Everything else in
actex refers to activations by these strings; this module is the only place that parses them.

`ln_final.hook_normalized` means what it means in TransformerLens: the final RMSNorm's
normalised input before its gain, x / sqrt(mean(x^2) + eps). `ln_final.hook_out` (not a
TransformerLens name) is the norm's output with the gain applied: Hugging Face's
`last_hidden_state`, the input of the LM head.
"""

from __future__ import annotations

import difflib
import re
from typing import NamedTuple

HOOK_EMBED = "hook_embed"
HOOK_LN_FINAL = "ln_final.hook_normalized"  # pre-gain, as in TransformerLens
HOOK_LN_FINAL_OUT = "ln_final.hook_out"  # post-gain: HF's last_hidden_state
GLOBAL_HOOKS = (HOOK_EMBED, HOOK_LN_FINAL, HOOK_LN_FINAL_OUT)

# Per-block hook suffixes, in the order they are computed inside a block (meanings:
# model/blocks.py's docstring).
BLOCK_HOOKS = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "mlp.hook_in",
    "mlp.hook_pre",
    "mlp.hook_post",
    "mlp.hook_router_logits",
    "hook_mlp_out",
    "hook_resid_post",
)
DENSE_MLP_HOOKS = ("mlp.hook_pre", "mlp.hook_post")  # not on routed-expert (MoE) layers
MOE_HOOKS = ("mlp.hook_router_logits",)  # only on MoE layers


def model_block_hooks(moe: bool) -> tuple[str, ...]:
    """The BLOCK_HOOKS a dense (`moe` False) or mixture-of-experts model computes."""
    absent = DENSE_MLP_HOOKS if moe else MOE_HOOKS
    return tuple(kind for kind in BLOCK_HOOKS if kind not in absent)

# TransformerLens 3's component names (TransformerBridge: `hook_in` / `hook_out` on each
# component) for the same tensors, accepted as input and stored under the names above.
ALIASES = {
    "hook_in": "hook_resid_pre",
    "hook_out": "hook_resid_post",
    "ln2.hook_in": "hook_resid_mid",
    "attn.hook_out": "hook_attn_out",
    "mlp.hook_out": "hook_mlp_out",
    "attn.q.hook_out": "attn.hook_q",
    "attn.k.hook_out": "attn.hook_k",
    "attn.v.hook_out": "attn.hook_v",
    "attn.o.hook_in": "attn.hook_z",
    "ln2.hook_out": "mlp.hook_in",
    "mlp.out.hook_in": "mlp.hook_post",
}
GLOBAL_ALIASES = {"embed.hook_out": HOOK_EMBED}

# The legacy system's activation types, and the `activation` argument of hooks_for_layers.
ACTIVATIONS = {
    "residual": "hook_resid_post",
    "mlp": "hook_mlp_out",
    "attn": "hook_attn_out",
}

_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


class HookPoint(NamedTuple):
    """A parsed hook name: `layer` is None for the global hooks."""

    name: str
    layer: int | None
    kind: str  # a BLOCK_HOOKS suffix or one of GLOBAL_HOOKS


def _expected_names(n_layers: int, kinds: tuple[str, ...]) -> str:
    return (
        f"{', '.join(GLOBAL_HOOKS)}, or blocks.{{0..{n_layers - 1}}}."
        f"{{{', '.join(kinds)}}}"
    )


def _did_you_mean(name: str, match: re.Match | None, kinds: tuple[str, ...]) -> str:
    """' (did you mean 'blocks.3.hook_resid_post'?)' for a near miss of a hook name, else ''."""
    if match is not None:
        close = difflib.get_close_matches(match.group(2), kinds, n=1, cutoff=0.8)
        return f" (did you mean 'blocks.{match.group(1)}.{close[0]}'?)" if close else ""
    close = difflib.get_close_matches(name, GLOBAL_HOOKS, n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"layer {layer} out of range: model has {n_layers} layers (0-{n_layers - 1})"
        )


def canonical_name(name: str) -> str:
    """actex's name of a TransformerLens 3 alias (`blocks.3.hook_out` ->
    `blocks.3.hook_resid_post`); any other name unchanged. No validation."""
    name = GLOBAL_ALIASES.get(name, name)
    match = _BLOCK_RE.fullmatch(name)
    if match is not None and match.group(2) in ALIASES:
        return f"blocks.{match.group(1)}.{ALIASES[match.group(2)]}"
    return name


def parse_hook(name: str, n_layers: int, kinds: tuple[str, ...] = BLOCK_HOOKS) -> HookPoint:
    """Validate one hook name against a model with `n_layers` blocks; a TransformerLens 3
    alias comes back under its canonical name (`blocks.3.hook_out` -> `blocks.3.hook_resid_post`).
    `kinds`: the block hooks the model has (model_block_hooks), listed when a name is unknown."""
    name = canonical_name(name)
    if name in GLOBAL_HOOKS:
        return HookPoint(name, None, name)
    match = _BLOCK_RE.fullmatch(name)
    kind = match and match.group(2)
    if match is None or kind not in BLOCK_HOOKS:
        raise ValueError(f"unknown hook {name!r}{_did_you_mean(name, match, kinds)}; "
                         f"expected one of {_expected_names(n_layers, kinds)}")
    layer = int(match.group(1))
    _check_layer(layer, n_layers)
    return HookPoint(f"blocks.{layer}.{kind}", layer, kind)


def _order_key(point: HookPoint, n_layers: int) -> tuple[int, int]:
    # Canonical order is the order of computation: embed, blocks in depth order, ln_final.
    if point.kind == HOOK_EMBED:
        return (-1, 0)
    if point.kind in (HOOK_LN_FINAL, HOOK_LN_FINAL_OUT):
        return (n_layers, GLOBAL_HOOKS.index(point.kind))
    return (point.layer, BLOCK_HOOKS.index(point.kind))


def parse_hooks(names, n_layers: int, kinds: tuple[str, ...] = BLOCK_HOOKS) -> tuple[str, ...]:
    """Validated, de-duplicated hook names in canonical (computation) order.

    `names` is an iterable of hook names or one comma-separated string; `kinds` as in parse_hook.
    """
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",") if part.strip()]
    points = {point.name: point for point in (parse_hook(name, n_layers, kinds) for name in names)}
    if not points:
        raise ValueError("no hooks given: name at least one hook point")
    ordered = sorted(points.values(), key=lambda p: _order_key(p, n_layers))
    return tuple(p.name for p in ordered)


def parse_layers(layers: str | int | list[int], n_layers: int) -> list[int]:
    """Layer selection: "all", "0-23", "0,4,8", "3", a list of ints; each in range."""
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(layers, str):
        text = layers.strip()
        if text == "all":
            return list(range(n_layers))
        selected: list[int] = []
        for part in text.split(","):
            part = part.strip()
            span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if span:
                start, stop = int(span.group(1)), int(span.group(2))
                if start > stop:
                    raise ValueError(f"bad layer range {part!r}: start > end")
                selected.extend(range(start, stop + 1))
            elif part.isdigit():
                selected.append(int(part))
            else:
                raise ValueError(
                    f"bad layer selection {layers!r}: expected 'all', 'a-b' or 'a,b,c'"
                )
        layers = selected
    for layer in layers:
        _check_layer(int(layer), n_layers)
    return sorted({int(layer) for layer in layers})


def hooks_for_layers(layers: str | int | list[int], activation: str, n_layers: int) -> list[str]:
    """Hook names for an activation type (residual/mlp/attn or a block hook suffix) at layers."""
    kind = ACTIVATIONS.get(activation, activation)
    kind = ALIASES.get(kind, kind)
    if kind not in BLOCK_HOOKS:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of "
            f"{', '.join([*ACTIVATIONS, *BLOCK_HOOKS])}"
        )
    return [f"blocks.{layer}.{kind}" for layer in parse_layers(layers, n_layers)]


def hook_width(config, hook: str) -> int:
    """Width of a hook's activation per token (its stored [tokens, width] columns).

    Raises a one-line ValueError for a hook this family does not compute (mlp.hook_post
    of a routed-expert layer, router logits of a dense one).
    """
    point = parse_hook(hook, config.n_layers)
    moe = getattr(config, "moe", None)
    if moe is not None and point.kind in DENSE_MLP_HOOKS:
        raise ValueError(f"hook {hook!r}: {config.model_type} layers route tokens to experts and have no "
                         f"single MLP activation; they have mlp.hook_in, mlp.hook_router_logits and hook_mlp_out")
    if moe is None and point.kind in MOE_HOOKS:
        raise ValueError(f"hook {hook!r}: only mixture-of-experts models have router logits; "
                         f"{config.model_type} has mlp.hook_pre and mlp.hook_post")
    q_width, kv_width = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    widths = {"attn.hook_q": q_width, "attn.hook_rot_q": q_width, "attn.hook_z": q_width,
              "attn.hook_k": kv_width, "attn.hook_rot_k": kv_width, "attn.hook_v": kv_width,
              "mlp.hook_pre": config.d_mlp, "mlp.hook_post": config.d_mlp,
              "mlp.hook_router_logits": moe.n_experts if moe else 0}
    return widths.get(point.kind, config.d_model)


def layers_needed(hooks: tuple[str, ...], n_layers: int) -> int:
    """How many decoder blocks must run to produce `hooks` (no block past the deepest)."""
    needed = 0
    for name in hooks:
        point = parse_hook(name, n_layers)
        if point.kind in (HOOK_LN_FINAL, HOOK_LN_FINAL_OUT):
            needed = max(needed, n_layers)
        elif point.kind == "hook_resid_pre":
            # The input of block l is the output of block l - 1: block l itself need not run.
            needed = max(needed, point.layer)
        elif point.layer is not None:
            needed = max(needed, point.layer + 1)
    return needed
