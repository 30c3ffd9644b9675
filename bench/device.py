"""Forward throughput on one GPU or TPU host: actex per attention backend vs transformers.

    python bench/device.py                  # 0.5B and 7B shapes, every backend of the platform
    python bench/device.py --dry-run        # tiny shape on CPU (Pallas kernels interpreted): checks the script runs

For each shape (Qwen2.5-0.5B and Qwen2.5-7B, random bfloat16 weights made on the devices,
sharded over `--mesh`, default auto) and each attention backend the platform has, one
packed batch of `--tokens` tokens (rows of `--seq`, samples of ~400 tokens with segment ids,
rows a multiple of the data axis) goes through the capture of every block's
hook_resid_post, bfloat16 out. Printed per backend: compile seconds, tokens/s (best of
`--reps`), MFU (the blocks' matmul + causal-attention FLOPs, no LM head, over the devices'
bf16 peak from PEAK_FLOPS) and the devices' peak memory so far (the runtime has no reset,
so the figure only grows down the list; the first backend's is its own).
transformers (CUDA only; no torch_xla is assumed on TPU): Qwen2ForCausalLM in bfloat16 with
sdpa attention, random init on the GPU, the same number of tokens as unpacked rows of
`--seq`, forward with output_hidden_states under inference_mode; MFU counts the same
FLOPs as actex's (it also computes the LM head on top).
Budget: under 5 minutes on one host (--reps 3, two shapes, 3-4 backends each).
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
from forward import flops_per_token, timed  # bench/forward.py: the same FLOP count and timer

SHAPES = {
    "0.5b": tiny_hf_config(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, intermediate_size=4864, dtype="bfloat16"),
    "7b": tiny_hf_config(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False,
                         dtype="bfloat16"),
    "tiny": tiny_hf_config(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, dtype="bfloat16"),
}
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
        out = [(1.0 if "norm" in path else 0.0) + (0.1 if "norm" in path else 0.02)
               * jax.random.normal(k, shape, jnp.float32) for k, shape, path in zip(keys, leaves, paths)]
        return jax.tree.unflatten(tree, [x.astype(dtype) for x in out])

    return jax.jit(make, out_shardings=shardings)(jax.random.key(0))


def packed_batch(tokens: int, seq: int, data: int, vocab: int, sample: int = 400):
    """[rows, seq] token ids / positions / segment ids, rows a multiple of `data`, filled
    with samples of ~`sample` tokens; returns the arrays and the mean attended context."""
    rows = max(data, tokens // seq // data * data)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (rows, seq)).astype(np.int32)
    positions, segments = np.zeros_like(ids), np.zeros_like(ids)
    context = []
    for r in range(rows):
        col, number = 0, 1
        while col < seq:
            n = min(seq - col, int(rng.integers(sample // 2, sample * 3 // 2)))
            positions[r, col:col + n], segments[r, col:col + n] = np.arange(n), number
            context.append(n * (n + 1) / 2)
            col, number = col + n, number + 1
    return (ids, positions, segments), sum(context) / ids.size


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
    host_batch, context = packed_batch(tokens, seq, mesh.shape[DATA], config.vocab_size)
    batch = global_batch(host_batch, mesh)
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(config.n_layers)]
    real = host_batch[0].size
    for name in backends:
        try:
            backend = resolve_backend(name, platform, "bfloat16")
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
        mfu = rate * flops_per_token(config, context) / (peak * n_devices) if peak else None
        mem = device_peak_bytes(mesh.devices.flat)
        print(f"  actex {name:10s}: {rate:12,.0f} tokens/s  MFU {f'{mfu:.1%}' if mfu is not None else 'n/a':>6}  "
              f"peak device memory {f'{mem / 2**30:.1f} GiB' if mem else 'n/a'}  (compile {compile_s:.1f} s)")
    del params, batch
    gc.collect()
    return context


def bench_transformers(hf_config: dict, tokens: int, seq: int, reps: int, context: float, dry_run: bool):
    try:
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
    except ImportError:
        print("  transformers: not run (torch/transformers not installed)")
        return
    device = "cuda" if torch.cuda.is_available() else ("cpu" if dry_run else None)
    if device is None:
        print("  transformers: not run (no CUDA device; torch_xla is not assumed on TPU)")
        return
    config = Qwen2Config(**{k: v for k, v in hf_config.items() if k not in ("architectures", "torch_dtype")})
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
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
    mfu = rate * flops_per_token(ModelConfig.from_hf_config(hf_config), (seq + 1) / 2) / peak if peak else None
    mem = torch.cuda.max_memory_allocated() if device == "cuda" else None
    print(f"  transformers sdpa: {rate:12,.0f} tokens/s  MFU {f'{mfu:.1%}' if mfu is not None else 'n/a':>6}  "
          f"peak device memory {f'{mem / 2**30:.1f} GiB' if mem else 'n/a'}")
    del model
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="0.5b,7b")
    parser.add_argument("--backends", default=None, help="comma-separated; default: every backend of the platform")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mesh", default="auto")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape, small batch, one rep: the script runs")
    args = parser.parse_args()
    if args.dry_run:
        args.shapes, args.tokens, args.seq, args.reps = "tiny", 1024, 256, 1
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
        context = bench_actex(config, mesh, backends, args.tokens, args.seq, args.reps, jnp.bfloat16)
        if not args.skip_transformers:
            bench_transformers(hf_config, args.tokens, args.seq, args.reps, context, args.dry_run)
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
