"""Every actex hook as transformers' own model computes it: the numerical reference.

`reference_activations(model, hooks, token_ids, positions)` runs one forward window through
a transformers decoder (torch, eager attention) with forward hooks on its modules and
returns each TransformerLens hook point actex captures. `actex verify` compares stored
activations with it; the parity tests compare the JAX forward with it.

Where a hook is a module's input or output it is taken there (the decoder layer for the
residual stream, self_attn.o_proj's input for hook_z, mlp's input for mlp.hook_in,
down_proj's input for mlp.hook_post, the router for router logits; Gemma's post-norms
for hook_attn_out / hook_mlp_out). Three kinds are not a module's tensor and are derived
here from captured ones by their definitions: hook_resid_mid (resid_pre + attn_out),
ln1/ln2/ln_final.hook_normalized (the norm's input over its RMS), and attn.hook_rot_q/k
(the captured q/k rotated with the layer's own cos/sin, by the family's apply_rotary_pos_emb).

Needs torch and transformers (`pip install 'actex[torch]'`).
"""

from __future__ import annotations

import importlib

import numpy as np

from actex.model.hooks import HOOK_EMBED, HOOK_LN_FINAL, HOOK_LN_FINAL_OUT, parse_hook


def load_reference(model: str, revision: str | None = None, device: str = "cpu"):
    """transformers' decoder backbone (no LM head) in float32 with eager attention, from a
    local dir or the HF cache (Gemma 3's multimodal checkpoints: their language model)."""
    import torch
    import transformers
    from transformers import AutoModel

    # verify prints its own lines: no weight-loading bar, and no load report (an untied
    # checkpoint's lm_head is "UNEXPECTED" for the backbone, which reads as a failure).
    transformers.logging.disable_progress_bar()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        reference = AutoModel.from_pretrained(model, revision=revision, dtype=torch.float32,
                                              attn_implementation="eager")
    finally:
        transformers.logging.set_verbosity(verbosity)
    return decoder_of(reference).to(device).eval()


def decoder_of(model):
    """The module holding embed_tokens, layers and norm, whatever wraps it."""
    for path in ("model.language_model", "language_model", "model"):
        inner = model
        for attr in path.split("."):
            inner = getattr(inner, attr, None)
        if inner is not None and hasattr(inner, "layers"):
            return inner
    return model


def _rms_normalized(x, eps: float):
    x = x.float()
    return x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()


def _output(output):
    return output[0] if isinstance(output, tuple) else output


def _eps(model) -> float:
    norm = model.norm
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def _layer_hooks(layer: int, block, seen: dict) -> list:
    """Register the forward hooks of one decoder layer; return their handles."""
    attn, mlp = block.self_attn, block.mlp
    name = f"blocks.{layer}."

    def out(key, pick=_output):
        return lambda module, args, kwargs, output: seen.__setitem__(name + key, pick(output))

    def inp(key):
        return lambda module, args, kwargs: seen.__setitem__(name + key, args[0] if args else
                                                             next(iter(kwargs.values())))

    def rope(module, args, kwargs):
        seen[name + "rope"] = kwargs["position_embeddings"]

    gemma = hasattr(block, "post_feedforward_layernorm")
    handles = [
        block.register_forward_pre_hook(inp("hook_resid_pre"), with_kwargs=True),
        block.register_forward_hook(out("hook_resid_post"), with_kwargs=True),
        attn.register_forward_pre_hook(rope, with_kwargs=True),
        attn.o_proj.register_forward_pre_hook(inp("attn.hook_z"), with_kwargs=True),
        attn.v_proj.register_forward_hook(out("attn.hook_v"), with_kwargs=True),
        mlp.register_forward_pre_hook(inp("mlp.hook_in"), with_kwargs=True),
    ]
    # q/k: after the per-head norm where the family has one (Qwen3, Gemma 3), as RoPE sees
    # them; Gemma 3 norms [B, heads, T, hd], Qwen3 [B, T, heads, hd].
    heads_first = "gemma3" in type(block).__module__
    for key, proj, norm in (("attn.hook_q", "q_proj", "q_norm"), ("attn.hook_k", "k_proj", "k_norm")):
        module = getattr(attn, norm, None)
        pick = (lambda o: o.transpose(1, 2)) if module is not None and heads_first else _output
        handles.append((module or getattr(attn, proj)).register_forward_hook(out(key, pick), with_kwargs=True))
    if gemma:
        handles += [
            block.post_attention_layernorm.register_forward_hook(out("hook_attn_out"), with_kwargs=True),
            block.post_feedforward_layernorm.register_forward_hook(out("hook_mlp_out"), with_kwargs=True),
        ]
    else:
        handles += [
            attn.register_forward_hook(out("hook_attn_out"), with_kwargs=True),
            mlp.register_forward_hook(out("hook_mlp_out"), with_kwargs=True),
        ]
    if hasattr(mlp, "gate_proj"):
        handles += [
            mlp.gate_proj.register_forward_hook(out("mlp.hook_pre"), with_kwargs=True),
            mlp.down_proj.register_forward_pre_hook(inp("mlp.hook_post"), with_kwargs=True),
        ]
    if hasattr(mlp, "experts"):  # the router returns (logits, weights, indices)
        handles.append(mlp.gate.register_forward_hook(out("mlp.hook_router_logits"), with_kwargs=True))
    return handles


def _rotated(block, seen: dict, name: str, key: str):
    """q or k [B, T, heads * hd] rotated by the layer's cos/sin, as the family's attention does."""
    family = importlib.import_module(type(block).__module__)
    cos, sin = seen[name + "rope"]
    head_dim = block.self_attn.head_dim
    q = seen[name + key]  # [B, T, heads * hd] or [B, T, heads, hd]
    heads = q.reshape(*q.shape[:2], -1, head_dim).transpose(1, 2)  # [B, heads, T, hd]
    rotated, _ = family.apply_rotary_pos_emb(heads, heads, cos, sin)
    return rotated.transpose(1, 2)


def reference_activations(model, hooks: list[str], token_ids: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Run one forward window ([T] token ids and positions, or [B, T]) through `model`
    (a transformers decoder backbone, see load_reference) and return {hook: float32
    [T, width]} (or [B, T, width] for 2-d input)."""
    import torch

    n_layers = len(model.layers)
    seen: dict[str, torch.Tensor] = {}
    batched = np.ndim(token_ids) == 2

    def keep(key):
        return lambda module, args, kwargs, output: seen.__setitem__(key, _output(output))

    def keep_input(key):
        return lambda module, args, kwargs: seen.__setitem__(key, args[0] if args else kwargs["hidden_states"])

    handles = [
        model.embed_tokens.register_forward_hook(keep(HOOK_EMBED), with_kwargs=True),
        model.norm.register_forward_pre_hook(keep_input("ln_final.input"), with_kwargs=True),
        model.norm.register_forward_hook(keep(HOOK_LN_FINAL_OUT), with_kwargs=True),
    ]
    for layer, block in enumerate(model.layers):
        handles += _layer_hooks(layer, block, seen)
    device = next(model.parameters()).device
    as_batch = (lambda a: a) if batched else (lambda a: np.asarray(a)[None])
    try:
        with torch.no_grad():
            model(
                input_ids=torch.tensor(np.asarray(as_batch(token_ids), np.int64), device=device),
                position_ids=torch.tensor(np.asarray(as_batch(positions), np.int64), device=device),
                use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()
    eps = _eps(model)
    out = {}
    for hook in hooks:
        point = parse_hook(hook, n_layers)
        block_name = f"blocks.{point.layer}."
        if point.kind == "hook_resid_mid":
            value = seen[block_name + "hook_resid_pre"] + seen[block_name + "hook_attn_out"]
        elif point.kind == "ln1.hook_normalized":
            value = _rms_normalized(seen[block_name + "hook_resid_pre"], eps)
        elif point.kind == "ln2.hook_normalized":
            value = _rms_normalized(seen[block_name + "hook_resid_pre"] + seen[block_name + "hook_attn_out"], eps)
        elif point.kind == HOOK_LN_FINAL:  # TransformerLens's meaning: the norm before its gain
            value = _rms_normalized(seen["ln_final.input"], eps)
        elif point.kind in ("attn.hook_rot_q", "attn.hook_rot_k"):
            key = "attn.hook_q" if point.kind == "attn.hook_rot_q" else "attn.hook_k"
            value = _rotated(model.layers[point.layer], seen, block_name, key)
        else:
            value = seen[point.name]
        if point.kind.startswith("attn.hook_") or point.kind == "mlp.hook_router_logits":
            # [B, T, heads, hd] and the router's [B * T, E] as [B, T, width]
            value = value.reshape(*seen[block_name + "hook_resid_pre"].shape[:2], -1)
        value = value.float().cpu().numpy()
        out[hook] = value if batched else value[0]
    return out
