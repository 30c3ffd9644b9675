"""Forward benchmark: actex capture vs transformers on a Qwen2.5-0.5B-shaped random model.

    python bench/forward.py [--rows 4 --seq 256 --reps 3 --long 4096,8192 --memory-seq 32768]

Prints (1) tokens/s of actex capturing all 24 hook_resid_post and of transformers'
Qwen2ForCausalLM(output_hidden_states=True) under inference_mode, same float32 weights and
token batch, and their ratio; (2) actex's achieved GFLOP/s next to a jitted matmul's;
(3) compile time; (4) tokens/s on single long prompts; (5) the peak resident memory of
a 32k-token forward through the first layers (in a child process, so its peak is its own).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from actex.model import load_model, make_capture_fn
from actex.model.random_checkpoint import tiny_hf_config, write_random_checkpoint

# Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B), random weights.
QWEN25_05B = tiny_hf_config(
    vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
)
CHECKPOINT = Path(tempfile.gettempdir()) / "actex-bench-qwen2.5-0.5b-random"


def checkpoint() -> Path:
    if not (CHECKPOINT / "model.safetensors").exists():
        write_random_checkpoint(CHECKPOINT, QWEN25_05B, seed=0)
    return CHECKPOINT


def flops_per_token(config, context: float) -> float:
    """Multiply-adds x2 of the blocks at an average attended context (no LM head)."""
    d, f, hd = config.d_model, config.d_mlp, config.head_dim
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    dense = d * q + 2 * d * kv + q * d + 3 * d * f
    attention = 2 * context * q  # scores and weighted values
    return 2 * config.n_layers * (dense + attention)


def inputs(rows: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, QWEN25_05B["vocab_size"], (rows, seq)).astype(np.int32)
    positions = np.tile(np.arange(seq, dtype=np.int32), (rows, 1))
    return token_ids, positions, np.ones((rows, seq), np.int32)


def timed(fn, reps: int) -> float:
    """Best wall time of `reps` calls (after the caller has warmed up)."""
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(reps: int) -> float:
    """A jitted float32 matmul of the MLP's shape: the machine's practical peak."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((1024, 896), np.float32))
    b = jnp.asarray(np.random.default_rng(1).standard_normal((896, 4864), np.float32))
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    seconds = timed(lambda: matmul(a, b).block_until_ready(), reps * 5)
    return 2 * 1024 * 896 * 4864 / seconds / 1e9


def compiled_capture(loaded, hooks, out_dtype, batch):
    """The capture function compiled ahead of time for `batch`, and the compile seconds."""
    capture = make_capture_fn(loaded.config, hooks, out_dtype)
    start = time.perf_counter()
    compiled = capture.lower(loaded.params, *batch).compile()
    return compiled, time.perf_counter() - start


def actex_throughput(loaded, rows, seq, reps):
    hooks = [f"blocks.{l}.hook_resid_post" for l in range(loaded.config.n_layers)]
    batch = inputs(rows, seq)
    compiled, compile_s = compiled_capture(loaded, hooks, "float32", batch)
    run = lambda: jax.block_until_ready(compiled(loaded.params, *batch))  # noqa: E731
    run()
    return rows * seq / timed(run, reps), compile_s


def transformers_throughput(path, rows, seq, reps):
    import torch
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    token_ids = torch.as_tensor(inputs(rows, seq)[0], dtype=torch.long)

    def run():
        with torch.inference_mode():
            model(token_ids, output_hidden_states=True)

    run()
    return rows * seq / timed(run, reps), model.config._attn_implementation


def long_prompt(loaded, seq, n_layers=None):
    """tokens/s and seconds of one seq-token prompt through n_layers (default all)."""
    n_layers = n_layers or loaded.config.n_layers
    batch = inputs(1, seq, seed=seq)
    compiled, _ = compiled_capture(
        loaded, [f"blocks.{n_layers - 1}.hook_resid_post"], "bfloat16", batch)
    seconds = timed(lambda: jax.block_until_ready(compiled(loaded.params, *batch)), 1)
    return seq / seconds, seconds


def peak_rss_gib() -> float:
    """This process's resident high-water mark. VmHWM, not ru_maxrss: ru_maxrss survives
    exec, so a child would report its parent's peak at fork time."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def memory_child(seq: int, n_layers: int) -> None:
    """Run in a fresh process: one seq-token forward through n_layers, print peak RSS."""
    loaded = load_model(checkpoint(), max_layers=n_layers)
    before = peak_rss_gib()
    tokens_per_s, seconds = long_prompt(loaded, seq, n_layers)
    peak = peak_rss_gib()
    print(json.dumps({"peak_gib": peak, "after_load_gib": before, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--long", default="4096,8192")
    parser.add_argument("--memory-seq", type=int, default=32768)
    parser.add_argument("--memory-layers", type=int, default=2)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_seq, args.memory_layers)

    path = checkpoint()
    loaded = load_model(path)
    config = loaded.config
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; Qwen2.5-0.5B shape, float32, "
          f"batch {args.rows} x {args.seq}")

    peak = matmul_gflops(args.reps)
    ours, compile_s = actex_throughput(loaded, args.rows, args.seq, args.reps)
    achieved = ours * flops_per_token(config, args.seq / 2) / 1e9
    print(f"jitted matmul [1024,896]x[896,4864]: {peak:.0f} GFLOP/s")
    print(f"actex  24 x hook_resid_post: {ours:.0f} tokens/s, {achieved:.0f} GFLOP/s "
          f"({achieved / peak:.0%} of matmul), compile {compile_s:.1f} s")
    if not args.skip_transformers:
        theirs, impl = transformers_throughput(path, args.rows, args.seq, args.reps)
        print(f"transformers output_hidden_states ({impl}): {theirs:.0f} tokens/s; "
              f"ratio actex/transformers {ours / theirs:.2f}x")

    for seq in [int(s) for s in args.long.split(",") if s]:
        tokens_per_s, seconds = long_prompt(loaded, seq)
        achieved = tokens_per_s * flops_per_token(config, seq / 2) / 1e9
        print(f"one {seq}-token prompt, 24 layers: {tokens_per_s:.0f} tokens/s "
              f"({seconds:.1f} s, {achieved:.0f} GFLOP/s with causal attention)")

    if args.memory_seq:
        del loaded
        child = subprocess.run(
            [sys.executable, __file__, "--memory-child", f"--memory-seq={args.memory_seq}",
             f"--memory-layers={args.memory_layers}"],
            capture_output=True, text=True, check=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"one {args.memory_seq}-token prompt, first {args.memory_layers} layers: "
              f"peak RSS {result['peak_gib']:.2f} GiB (after load {result['after_load_gib']:.2f}"
              f" GiB), {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
