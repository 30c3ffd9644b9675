"""Forward throughput on one GPU or TPU host: actex per attention backend vs transformers.

    python bench/device.py                  # 0.5B and 7B shapes, every backend of the platform
    python bench/device.py --dry-run        # tiny shape on CPU (Pallas kernels interpreted): checks the script runs
    python bench/device.py --families       # Llama-3.2-1B, Gemma-2-2B, Gemma-3-1B, Qwen3-MoE (bench/families.py's shapes)
    python bench/device.py --families --dry-run   # the same families at toy sizes, on CPU

For each shape (Qwen2.5-0.5B and Qwen2.5-7B, random bfloat16 weights made on the devices,
sharded over `--mesh`, default auto) and each attention backend the platform has, one
packed batch of `--tokens` tokens (rows of `--seq`, samples of ~400 tokens with segment ids,
rows a multiple of the data axis) goes through the capture of every block's
hook_resid_post, bfloat16 out. Printed per backend: compile seconds, tokens/s (best of
`--reps`), MFU (the blocks' matmul + causal-attention FLOPs, no LM head, over the devices'
bf16 peak from PEAK_FLOPS) and the devices' peak memory so far (the runtime has no reset,
so the figure only grows down the list; the first backend's is its own).
Families (`--families`, or any of their names in `--shapes`): the real configs of
bench/families.py (llama3-1b, gemma2-2b, gemma3-1b, and qwen3-moe: Qwen3-30B-A3B's 128
experts, top-8, at reduced width; `--shapes qwen3-30b-a3b` is the full model, ~61 GB in
bf16, for one big device or a mesh). A backend that cannot compute a family's features
(cudnn: no soft-cap, pallas_gpu: no sliding window) is refused and listed as not run.
FLOPs count each layer's window and, for MoE, the router and the top-k experts only.
transformers (CUDA only; no torch_xla is assumed on TPU): the shape's CausalLM
(AutoModelForCausalLM) in bfloat16 with sdpa attention (Gemma 2: eager, for its soft-cap),
random init on the GPU, the same number of tokens as unpacked rows of
`--seq`, forward with output_hidden_states under inference_mode; MFU counts the same
FLOPs as actex's (it also computes the LM head on top).
Budget: under 5 minutes on one host (--reps 3, two shapes, 3-4 backends each); --families
is four smaller shapes (not yet timed on a device).
"""

from __future__ import annotations

import argparse
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

from actex.model import make_capture_fn
from actex.model.attention import resolve_backend
from actex.model.mesh import DATA, choose_mesh, describe, global_batch, param_shardings
from actex.model.config import ModelConfig
from actex.model.params import global_param_axes, layer_param_axes
from actex.model.random_checkpoint import tiny_hf_config
from families import FAMILIES, HF_ATTENTION, flops_per_token, hf_config  # bench/families.py
from forward import timed  # bench/forward.py: the same timer

SHAPES = {
    "0.5b": tiny_hf_config(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, intermediate_size=4864, dtype="bfloat16"),
    "7b": tiny_hf_config(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False,
                         dtype="bfloat16"),
    "tiny": tiny_hf_config(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, dtype="bfloat16"),
}
# The families at their real shapes (bench/families.py), and at toy sizes for --dry-run.
SHAPES |= {name: hf_config(name) | {"dtype": "bfloat16"} for name in FAMILIES}
SHAPES |= {f"tiny-{name}": hf_config(name, dry_run=True) | {"dtype": "bfloat16"} for name in FAMILIES}
# Qwen/Qwen3-30B-A3B's config.json: the whole model (opt-in: ~61 GB of bf16 weights).
SHAPES["qwen3-30b-a3b"] = FAMILIES["qwen3-moe"] | dict(
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, dtype="bfloat16")
# Dense bf16 peak FLOP/s per device, by a substring of jax's device_kind / torch's name.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6": 918e12, "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
}
BACKENDS = {"tpu": ("blockwise", "splash", "xla"), "gpu": ("blockwise", "cudnn", "pallas_gpu", "xla"),
            "cpu": ("blockwise", "xla", "splash", "pallas_gpu")}


def peak_flops(kind: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def random_params(config: ModelConfig, mesh, dtype=jnp.bfloat16):
    """N(0, 0.02) weights (norm scales near 1) made directly in their shards on the devices."""
    shardings = param_shardings(config, mesh)
    shapes = {name: shape for name, (shape, _) in global_param_axes(config).items()}
    shapes["layers"] = {name: (config.n_layers, *shape) for name, (shape, _) in layer_param_axes(config).items()}

    def make(key):
        leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
        keys = jax.random.split(key, len(leaves))
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
            shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
        # Norm gains near 1: Gemma stores (gain - 1), so its norms are drawn near 0.
        centre = 0.0 if config.gemma else 1.0
        out = [(centre if "norm" in path else 0.0) + (0.1 if "norm" in path else 0.02)
               * jax.random.normal(k, shape, jnp.float32) for k, shape, path in zip(keys, leaves, paths)]
        return jax.tree.unflatten(tree, [x.astype(dtype) for x in out])

    return jax.jit(make, out_shardings=shardings)(jax.random.key(0))


def packed_batch(tokens: int, seq: int, data: int, vocab: int, sample: int = 400):
    """[rows, seq] token ids / positions / segment ids, rows a multiple of `data`, filled
    with samples of ~`sample` tokens; returns the arrays and the samples' lengths."""
    rows = max(data, tokens // seq // data * data)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (rows, seq)).astype(np.int32)
    positions, segments = np.zeros_like(ids), np.zeros_like(ids)
    lengths = []
    for r in range(rows):
        col, number = 0, 1
        while col < seq:
            n = min(seq - col, int(rng.integers(sample // 2, sample * 3 // 2)))
            positions[r, col:col + n], segments[r, col:col + n] = np.arange(n), number
            lengths.append(n)
            col, number = col + n, number + 1
    return (ids, positions, segments), lengths


def device_peak_bytes(devices) -> int | None:
    stats = [d.memory_stats() or {} for d in devices]
    values = [s.get("peak_bytes_in_use") for s in stats]
    return max(values) if all(v is not None for v in values) else None


def bench_actex(config, mesh, backends, tokens, seq, reps, dtype):
    platform = mesh.devices.flat[0].platform
    kind = mesh.devices.flat[0].device_kind
    peak = peak_flops(kind)
    n_devices = mesh.devices.size
    params = random_params(config, mesh, dtype)
    host_batch, lengths = packed_batch(tokens, seq, mesh.shape[DATA], config.vocab_size)
    batch = global_batch(host_batch, mesh)
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(config.n_layers)]
    real = host_batch[0].size
    for name in backends:
        try:
            backend = resolve_backend(name, platform, "bfloat16", softcap=config.attn_softcap,
                                      windowed=config.sliding_window is not None)
            capture = make_capture_fn(config, hooks, "bfloat16", mesh=mesh, attention=backend)
            start = time.perf_counter()
            compiled = capture.lower(params, *batch).compile()
            compile_s = time.perf_counter() - start
            run = lambda: jax.block_until_ready(compiled(params, *batch))  # noqa: E731
            run()
            seconds = timed(run, reps)
        except Exception as error:  # a kernel this device/shape does not support: say so, go on
            print(f"  actex {name:10s}: not run: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            continue
        rate = real / seconds
        mfu = rate * flops_per_token(config, lengths) / (peak * n_devices) if peak else None
        mem = device_peak_bytes(mesh.devices.flat)
        print(f"  actex {name:10s}: {rate:12,.0f} tokens/s  MFU {f'{mfu:.1%}' if mfu is not None else 'n/a':>6}  "
              f"peak device memory {f'{mem / 2**30:.1f} GiB' if mem else 'n/a'}  (compile {compile_s:.1f} s)")
    del params, batch
    gc.collect()


def bench_transformers(hf_config: dict, tokens: int, seq: int, reps: int, dry_run: bool):
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        print("  transformers: not run (torch/transformers not installed)")
        return
    device = "cuda" if torch.cuda.is_available() else ("cpu" if dry_run else None)
    if device is None:
        print("  transformers: not run (no CUDA device; torch_xla is not assumed on TPU)")
        return
    model_type = hf_config.get("model_type", "qwen2")
    attention = HF_ATTENTION.get(model_type, "sdpa")  # Gemma 2's soft-capping: eager
    skip = ("architectures", "torch_dtype", "dtype", "model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in hf_config.items() if k not in skip})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attention).eval()
    rows = max(1, tokens // seq)
    ids = torch.randint(0, config.vocab_size, (rows, seq), device=device)

    def run():
        with torch.inference_mode():
            model(ids, output_hidden_states=True)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run()
    rate = rows * seq / timed(run, reps)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_flops(name)
    # Unpacked rows attend over the whole row: context = (seq + 1) / 2 on average.
    mfu = rate * flops_per_token(ModelConfig.from_hf_config(hf_config), [seq] * rows) / peak if peak else None
    mem = torch.cuda.max_memory_allocated() if device == "cuda" else None
    print(f"  transformers {attention + ':':6s} {rate:10,.0f} tokens/s  MFU {f'{mfu:.1%}' if mfu is not None else 'n/a':>6}  "
          f"peak device memory {f'{mem / 2**30:.1f} GiB' if mem else 'n/a'}")
    del model
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="0.5b,7b", help=f"comma-separated, of: {', '.join(SHAPES)}")
    parser.add_argument("--families", action="store_true",
                        help=f"shapes {','.join(FAMILIES)} (with --dry-run: their tiny versions)")
    parser.add_argument("--backends", default=None, help="comma-separated; default: every backend of the platform")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mesh", default="auto")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape, small batch, one rep: the script runs")
    args = parser.parse_args()
    if args.families:
        args.shapes = ",".join(FAMILIES)
    if args.dry_run:
        args.shapes = ",".join(f"tiny-{name}" for name in FAMILIES) if args.families else "tiny"
        args.tokens, args.seq, args.reps = 1024, 256, 1
    started = time.perf_counter()
    platform = jax.devices()[0].platform
    print(f"jax {jax.__version__} on {len(jax.local_devices())} x {jax.devices()[0].device_kind} ({platform}); "
          f"{args.tokens} tokens per batch in rows of {args.seq}, bf16 weights, every hook_resid_post")
    backends = args.backends.split(",") if args.backends else BACKENDS.get(platform, ("blockwise", "xla"))
    for shape in args.shapes.split(","):
        hf_config = SHAPES[shape]
        config = ModelConfig.from_hf_config(hf_config)
        mesh = choose_mesh(args.mesh, config, "bfloat16")
        print(f"{shape} shape, mesh {describe(mesh)}:")
        bench_actex(config, mesh, backends, args.tokens, args.seq, args.reps, jnp.bfloat16)
        if not args.skip_transformers:
            bench_transformers(hf_config, args.tokens, args.seq, args.reps, args.dry_run)
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
