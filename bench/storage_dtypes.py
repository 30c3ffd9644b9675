"""Per storage dtype (float32, bfloat16, int8): bytes per token, writer MB/s, extract tokens/s.

    .venv/bin/python bench/storage_dtypes.py [--tasks 6] [--hidden 384] [--layers 6] [--reps 2]

1. End-to-end: `extract` of bench/pipeline.py's random Qwen2 over real ARC tasks into a
   local store, every block's hook_resid_post, once per storage dtype (an untimed warm-up
   run per dtype first, then `--reps` interleaved rounds); tokens/s of the best round.
   Bytes per token are read back from the commit records: the parts' sizes over the stored
   tokens (activations, int8's scales and exponents, token ids, positions, headers).
2. Writer: one chunk of activations with planted outliers (a few channels 100x the rest
   and a massive first token, as real residuals have) coded to each dtype off the clock,
   then written as actex parts the engine's way (safetensors encode, sha256, local write)
   on one thread and on the 4-thread writer pool. MB/s counts the activations the forward
   produced (float32, 4 B a value), so the dtypes compare on the same work; the stored
   MB/s is given beside it.
The load average is printed before and after: the machine may be shared.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from pipeline import build_model, end_to_end

from actex.engine.assembly import PartBuffer, encode, part_tensors
from actex.engine.demo import demo_dataset
from actex.engine.quantize import quantize
from actex.store import quantize as q8
from actex.store.commits import read_commits
from actex.store.folder import open_store

DTYPES = ("float32", "bfloat16", "int8")


def planted(tokens: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """[tokens, width] float32: N(0, 1) with 4 outlier channels at 100x and token 0 at 1000x."""
    x = rng.standard_normal((tokens, width), np.float32)
    x[:, rng.choice(width, 4, replace=False)] *= 100.0
    x[0] *= 1000.0
    return x


def coded(x: np.ndarray, hook: str, dtype: str) -> dict[str, np.ndarray]:
    """The tensors a part stores for hook values x in `dtype` (int8: codes, scale, exponents)."""
    if dtype == "int8":
        codes, scale, packed, _ = jax.device_get(jax.jit(quantize)(x))
        return {hook: codes, q8.companion(hook, q8.SCALE): scale, q8.companion(hook, q8.BLOCK_EXP): packed}
    return {hook: x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)}


def writer_bench(dtype: str, samples: int, tokens: int, widths: dict[str, int], root: Path,
                 threads: int = 4) -> dict[str, float]:
    """Seconds per part on one thread and on a `threads` pool, and the part's bytes."""
    rng = np.random.default_rng(0)
    total = samples * tokens
    acts: dict[str, np.ndarray] = {}
    for hook, width in widths.items():
        acts |= coded(planted(total, width, rng), hook, dtype)
    part = PartBuffer(
        0, np.arange(samples, dtype=np.int64), np.arange(0, total + 1, tokens, dtype=np.int64),
        rng.integers(0, 512, total, dtype=np.int32), np.tile(np.arange(tokens, dtype=np.int32), samples), acts, total,
    )
    tensors = part_tensors(widths, dtype)
    store = open_store(root / f"writer-{dtype}")
    sizes = []

    def write_part(index: int) -> None:  # the engine's writer path: encode, hash, write
        encoded = encode(part, tensors, chunk=0, attempt="bench")
        store.write_bytes(f"part-{index:05d}.safetensors", encoded.data)
        sizes.append(len(encoded.data))

    start = time.perf_counter()
    write_part(0)
    one_s = time.perf_counter() - start
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(write_part, range(1, threads + 1)))
        pool_s = (time.perf_counter() - start) / threads
    return {"one_s": one_s, "pool_s": pool_s, "part_bytes": sizes[0], "tokens": total}


def part_bytes_per_token(url: str) -> tuple[float, int]:
    """(bytes of every committed part / stored tokens, stored tokens) of a run."""
    records = read_commits(open_store(url)).values()
    tokens = sum(r.tokens for r in records)
    return sum(p.bytes for r in records for p in r.parts) / tokens, tokens


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=6, help="ARC evaluation tasks (2 prompts each)")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("actex").setLevel(logging.ERROR)  # one truncation line per run otherwise

    with tempfile.TemporaryDirectory(prefix="actex-bench-") as tmp:
        root = Path(tmp)
        jax.config.update("jax_compilation_cache_dir", str(root / "jax-cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        model = build_model(root / "model", args.hidden, args.layers)
        fields = {
            "model": str(model), "run_name": "bench", "layers": "all", "activation": "residual",
            "compute_dtype": "float32", "batch_tokens": 8192, "chunk_size": 4,
            "data": {"dataset": str(demo_dataset(root / "arc.jsonl", args.tasks)), "format": "arc",
                     "predictions_per_task": 2, "max_seq_len": args.max_seq_len},
        }
        print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}); {load()}")
        print(f"model: random Qwen2 hidden {args.hidden}, {args.layers} layers, float32 compute; "
              f"{args.layers} hooks x {args.hidden}; {args.tasks} ARC tasks x 2 prompts, chunks of 4")
        for dtype in DTYPES:  # warm-up: every bucket shape and the int8 coder compile once
            end_to_end({**fields, "dtype": dtype}, str(root / f"warmup-{dtype}"))
        best: dict[str, float] = {}
        for rep in range(args.reps):  # interleaved, so other processes' load hits every dtype alike
            for dtype in DTYPES:
                output = root / f"out-{rep}-{dtype}"
                seconds, _, _ = end_to_end({**fields, "dtype": dtype}, str(output))
                per_token, tokens = part_bytes_per_token(str(output / "bench"))
                best[dtype] = max(best.get(dtype, 0.0), tokens / seconds)
                print(f"rep {rep} {dtype:>8}: {seconds:6.2f} s, {tokens:,} tokens, {tokens / seconds:,.0f} tokens/s, "
                      f"{per_token:,.0f} B/token in parts")

        widths = {f"blocks.{layer}.hook_resid_post": args.hidden for layer in range(args.layers)}
        values = sum(widths.values())
        print("end-to-end best tokens/s: " + ", ".join(f"{d} {best[d]:,.0f}" for d in DTYPES))
        for dtype in DTYPES:
            w = writer_bench(dtype, 16, 2048, widths, root)
            produced = w["tokens"] * values * 4 / 1e6  # MB of float32 activations
            stored = w["part_bytes"] / 1e6
            print(f"writer {dtype:>8}: {w['part_bytes'] / w['tokens']:,.0f} B/token "
                  f"({w['part_bytes'] / w['tokens'] / values:.3f} B/value); activations produced "
                  f"{produced / w['one_s']:,.0f} MB/s on 1 thread, {produced / w['pool_s']:,.0f} MB/s on the pool "
                  f"(stored {stored / w['one_s']:,.0f} / {stored / w['pool_s']:,.0f} MB/s)")
        print(load())


if __name__ == "__main__":
    sys.exit(main())
