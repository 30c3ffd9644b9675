"""Host memory of `extract` on a chunk much larger than parts_in_flight x part size.

    .venv/bin/python bench/memory.py [--part-mb 32] [--parts-in-flight 2] [--writers 2] [--ratio 4]

Builds a random Qwen2 (hidden 384, 6 layers) and text rows of ~1,900 tokens, sized so
that one chunk's activations (all 6 hook_resid_post, bfloat16) are --ratio times
parts_in_flight x part size. Chunk 0 is extracted once as a warm-up (compiles every
bucket); then, in a fresh process state, chunk 1 is extracted while the resident set size
is sampled every 10 ms. Reported: the peak above the RSS just before chunk 1 started, next
to the bound stated in docs/architecture.md ("Host memory"):

    (2 x parts_in_flight + 2) x part size  +  (host_queue + 1) x one batch's outputs

With --id-order the parts are cut in sample-id order as before issue 11 (packing fills them
longest-first, so nearly every part of the chunk is held until its last batch).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
from pathlib import Path

import psutil

from actex.data import build_tokenizer
from actex.engine import pipeline
from actex.engine.prepare import prepare_run
from actex.engine.worker import extract
from actex.engine.pipeline import PipelineConfig
from actex.model.random_checkpoint import tiny_hf_config, write_random_checkpoint

HIDDEN, LAYERS = 384, 6
TOKEN_BYTES = HIDDEN * LAYERS * 2  # bf16, every layer's hook_resid_post


class Chunks:
    """A ChunkSource over a fixed list of chunks."""

    def __init__(self, chunks: list[int]):
        self.list = chunks

    def chunks(self, stop):
        yield from self.list

    def finished(self, chunk: int) -> None:
        pass


def peak_rss_during(fn) -> tuple[int, int]:
    """(RSS before, peak RSS while fn runs), bytes."""
    process = psutil.Process()
    before = process.memory_info().rss
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return before, max(peak[0], process.memory_info().rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part-mb", type=float, default=32.0)
    parser.add_argument("--parts-in-flight", type=int, default=2)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=4.0, help="chunk bytes / (parts_in_flight x part size)")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--id-order", action="store_true", help="cut parts in sample-id order (before issue 11)")
    args = parser.parse_args()

    if args.id_order:
        assemble = pipeline.ChunkAssembler
        pipeline.ChunkAssembler = lambda tokenized, widths, dtype, shard_size, batches=None: assemble(tokenized, widths, dtype, shard_size)

    folder = Path(tempfile.mkdtemp(prefix="actex-bench-memory-"))
    tokenizer = build_tokenizer(folder / "model", vocab_size=512)
    config = tiny_hf_config(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                            num_attention_heads=HIDDEN // 64, num_key_value_heads=1, intermediate_size=HIDDEN * 8 // 3)
    write_random_checkpoint(folder / "model", config, seed=0)

    part_bytes = int(args.part_mb * 1e6)
    chunk_bytes = args.ratio * args.parts_in_flight * part_bytes
    chunk_size = 64
    tokens_per_sample = int(chunk_bytes / TOKEN_BYTES / chunk_size) + 1
    rng = random.Random(0)
    rows = folder / "rows.jsonl"
    with open(rows, "w") as f:
        for _ in range(2 * chunk_size):
            # Lengths vary by 2x so that packing order and sample-id order differ.
            words = rng.randint(tokens_per_sample * 2 // 3, tokens_per_sample * 4 // 3)
            f.write('{"text": "' + " ".join(str(rng.randint(0, 99)) for _ in range(words // 2)) + '"}\n')
    fields = {
        "model": str(folder / "model"), "output": str(folder / "out"), "run_name": "bench",
        "layers": "all", "activation": "residual", "dtype": "bfloat16", "batch_tokens": args.batch_tokens,
        "chunk_size": chunk_size, "shard_size": part_bytes,
        "data": {"dataset": str(rows), "format": "text", "max_seq_len": 4096, "long_policy": "truncate"},
    }
    run = prepare_run(fields)
    config = PipelineConfig(writers=args.writers, parts_in_flight=args.parts_in_flight)
    extract(run, Chunks([0]), worker="warmup", pipeline=config)
    before, peak = peak_rss_during(lambda: extract(run, Chunks([1]), worker="bench", pipeline=config))

    from actex.store.commits import read_commit

    record = read_commit(run.store, 1)
    batch_bytes = args.batch_tokens * TOKEN_BYTES
    bound = (2 * args.parts_in_flight + 2) * part_bytes + (config.host_queue + 1) * batch_bytes
    print(f"model: random Qwen2 hidden {HIDDEN}, {LAYERS} layers; {LAYERS} hooks bf16 = {TOKEN_BYTES:,} bytes/token")
    print(f"chunk 1: {record.samples} samples, {record.tokens:,} tokens, {record.bytes / 1e6:,.0f} MB in {len(record.parts)} parts "
          f"of <= {part_bytes / 1e6:.0f} MB; parts_in_flight {args.parts_in_flight}, writers {args.writers}, "
          f"batch {args.batch_tokens} tokens ({batch_bytes / 1e6:.0f} MB); parts cut in {'sample-id' if args.id_order else 'fill'} order")
    print(f"RSS before chunk 1 {before / 2**20:,.0f} MiB, peak {peak / 2**20:,.0f} MiB: "
          f"+{(peak - before) / 1e6:,.0f} MB (chunk {record.bytes / 1e6:,.0f} MB; stated bound {bound / 1e6:,.0f} MB)")


if __name__ == "__main__":
    main()
