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

import logging
import os
import sys
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from pipeline import bench_arguments, bench_fields, chunk_part, end_to_end, time_part_writes

from actex.engine.assembly import part_tensors
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
    acts: dict[str, np.ndarray] = {}
    for hook, width in widths.items():
        acts |= coded(planted(samples * tokens, width, rng), hook, dtype)
    part = chunk_part(acts, samples, tokens, rng)
    one_s, pool_s, part_bytes = time_part_writes(part, part_tensors(widths, dtype), root / f"writer-{dtype}", threads)
    return {"one_s": one_s, "pool_s": pool_s, "part_bytes": part_bytes, "tokens": samples * tokens}


def part_bytes_per_token(url: str) -> tuple[float, int]:
    """(bytes of every committed part / stored tokens, stored tokens) of a run."""
    records = read_commits(open_store(url)).values()
    tokens = sum(r.tokens for r in records)
    return sum(p.bytes for r in records for p in r.parts) / tokens, tokens


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    args = bench_arguments(__doc__.splitlines()[0], tasks=6, reps=2)
    logging.getLogger("actex").setLevel(logging.ERROR)  # one truncation line per run otherwise
    with tempfile.TemporaryDirectory(prefix="actex-bench-") as tmp:
        root = Path(tmp)
        fields = {**bench_fields(root, args), "compute_dtype": "float32"}
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
