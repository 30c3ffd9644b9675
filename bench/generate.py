"""Generation benchmark: actex's greedy decoding vs transformers' generate on this CPU.

    python bench/generate.py [--layers 24 --rows 4 --prompt 256 --new 32 --memory-prompt 16384]

Prints (1) for the same random Qwen2.5-0.5B-shaped float32 checkpoint (first --layers
blocks; the 151,936-token LM head whatever the depth), batch and prompts: prefill seconds,
decode seconds and decode tokens/s of actex (`make_generate_fn`, jitted, KV cache in fixed
buffers) and of transformers `generate(do_sample=False)` (sdpa, inference_mode,
DynamicCache); prefill is timed as a generation of one token, decode as the rest;
(2) the KV cache of one --memory-prompt-token prompt + --memory-new tokens on the full
24-layer 0.5B shape: computed (2 x layers x kv heads x head_dim x bytes per token) and as
XLA allocates it (the compiled program's temporary buffers from `memory_analysis()`,
against a 128-token prompt's; compiled for abstract shapes: no weights needed, nothing run).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from forward import CHECKPOINT, QWEN25_05B, checkpoint, timed

from actex.model import load_model
from actex.model.generate import kv_cache_bytes, make_generate_fn
from actex.model.config import ModelConfig
from actex.model.params import global_param_axes, layer_param_axes


def prompts(rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, QWEN25_05B["vocab_size"], (rows, length)).astype(np.int32)
    return ids, np.ones_like(ids)


def actex_split(loaded, rows: int, length: int, new: int, reps: int) -> dict:
    ids, mask = prompts(rows, length)
    never = np.array([-1], np.int32)  # no stop token: every row runs to the budget, like transformers below
    out = {}
    for name, n in (("one", 1), ("all", new)):
        generate = make_generate_fn(loaded.config, n)
        start = time.perf_counter()
        compiled = generate.lower(loaded.params, ids, mask, never).compile()
        out[f"compile_{name}_s"] = time.perf_counter() - start
        run = lambda: jax.block_until_ready(compiled(loaded.params, ids, mask, never))  # noqa: E731
        run()
        out[f"{name}_s"] = timed(run, reps)
    return split(out["one_s"], out["all_s"], rows, new) | {k: v for k, v in out.items() if k.startswith("compile")}


def transformers_split(path, n_layers: int, rows: int, length: int, new: int, reps: int) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32, num_hidden_layers=n_layers).eval()
    ids = torch.as_tensor(prompts(rows, length)[0], dtype=torch.long)
    times = {}
    for name, n in (("one", 1), ("all", new)):
        def run():
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
        run()
        times[name] = timed(run, reps)
    return split(times["one"], times["all"], rows, new) | {"attn": model.config._attn_implementation}


def split(one_s: float, all_s: float, rows: int, new: int) -> dict:
    """Prefill = a generation of one token; decode = the other new - 1 steps."""
    decode_s = all_s - one_s
    return {"prefill_s": one_s, "decode_s": decode_s, "decode_tokens_per_s": rows * (new - 1) / decode_s}


def abstract_params(config: ModelConfig, dtype) -> dict:
    """ShapeDtypeStructs of the parameters (tied head): compile without weights."""
    spec = lambda shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    layers = {name: spec((config.n_layers, *shape)) for name, (shape, _) in layer_param_axes(config).items()}
    return {"layers": layers, **{name: spec(shape) for name, (shape, _) in global_param_axes(config).items()}}


def compiled_temp_bytes(config: ModelConfig, prompt: int, new: int, dtype) -> int:
    """XLA's temporary buffers of generate for one prompt (compiled for abstract shapes)."""
    params = abstract_params(config, dtype)
    ids = jax.ShapeDtypeStruct((1, prompt), jnp.int32)
    stop = jax.ShapeDtypeStruct((1,), jnp.int32)
    return make_generate_fn(config, new).lower(params, ids, ids, stop).compile().memory_analysis().temp_size_in_bytes


def kv_memory(prompt: int, new: int, baseline: int = 128) -> dict:
    """The 0.5B shape's KV cache computed, and what XLA allocates beyond a `baseline`-token
    prompt's program. float32 parameters: XLA:CPU upcasts bfloat16 matmul operands to
    float32 and hoists the copies of all weights out of the loops, which would swamp the
    measurement (TPU and GPU multiply bfloat16 natively). The cache's dtype is the
    parameters', so the bfloat16 cache is half the float32 one measured here."""
    config = ModelConfig.from_hf_config(QWEN25_05B)
    start = time.perf_counter()
    temp = compiled_temp_bytes(config, prompt, new, jnp.float32)
    base = compiled_temp_bytes(config, baseline, new, jnp.float32)
    # 1024 more cache slots: how many copies of the cache the program holds at its peak.
    longer = compiled_temp_bytes(config, prompt, new + 1024, jnp.float32)
    return {
        "kv_bytes_per_token_bf16": kv_cache_bytes(config, 1, 1, "bfloat16"),
        "kv_cache_bytes_bf16": kv_cache_bytes(config, 1, prompt + new, "bfloat16"),
        "kv_cache_bytes_f32": kv_cache_bytes(config, 1, prompt + new, "float32"),
        "xla_temp_bytes_f32": temp,
        "xla_temp_bytes_f32_baseline_prompt": base,
        "xla_temp_growth_f32": temp - base,
        "kv_growth_f32_computed": kv_cache_bytes(config, 1, prompt - baseline, "float32"),
        "cache_copies_at_peak": (longer - temp) / kv_cache_bytes(config, 1, 1024, "float32"),
        "compile_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--memory-prompt", type=int, default=16384)
    parser.add_argument("--memory-new", type=int, default=1024)
    args = parser.parse_args()

    checkpoint()
    loaded = load_model(CHECKPOINT, dtype="float32", max_layers=args.layers, lm_head=True)
    if args.layers < loaded.config.n_layers:
        # The loader keeps the first blocks; decode through those only.
        import dataclasses

        loaded = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, n_layers=args.layers))
    shape = {"layers": args.layers, "rows": args.rows, "prompt": args.prompt, "new": args.new}
    ours = actex_split(loaded, args.rows, args.prompt, args.new, args.reps)
    del loaded
    theirs = transformers_split(CHECKPOINT, args.layers, args.rows, args.prompt, args.new, args.reps)
    print(json.dumps({"shape": shape, "actex": ours, "transformers": theirs,
                      "decode_speedup": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]}, indent=2))
    print(json.dumps({"kv_memory": {"prompt": args.memory_prompt, "new": args.memory_new,
                                    **kv_memory(args.memory_prompt, args.memory_new)}}, indent=2))


if __name__ == "__main__":
    main()
