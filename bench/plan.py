"""Plan benchmark: one pass to plan, then samples(k) in O(chunk) whatever k.

    .venv/bin/python bench/plan.py [--rows 200000] [--chunk-size 64] [--reps 5] [--keep DIR]

Generates a barc-shaped JSONL (each row: `examples`, a list of 3-6 [input, output] grid
pairs of 3x3 to 20x20 cells, about 4 KB a row, like barc0/200k_HEAVY) under a temp dir
(or --keep DIR, reused when present), then measures with the ARC defaults
(8 predictions per task, chunks of 64 samples):

1. `build_plan`: the one pass (parse + validate + count + row index), fingerprint included;
2. the row index: its size as stored with the run, and the time to load it back
   (`plan_from_index`, what every other worker and every restart does instead of step 1);
3. `samples(k)` for the first and the last chunk: median of --reps, each on a fresh
   plan loaded from the index (nothing cached between reps but the OS page cache).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from actex.data import DataConfig, build_plan, build_tokenizer
from actex.data.plan import plan_from_index


def grid(rng: random.Random) -> list[list[int]]:
    h, w = rng.randint(3, 20), rng.randint(3, 20)
    return [[rng.randint(0, 9) for _ in range(w)] for _ in range(h)]


def write_barc_jsonl(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    partial = path.with_suffix(".partial")
    with open(partial, "w") as f:
        for k in range(rows):
            examples = [[grid(rng), grid(rng)] for _ in range(rng.randint(3, 6))]
            f.write(json.dumps({"examples": examples, "seeds": [f"bench{k}"]}) + "\n")
    partial.rename(path)  # an interrupted generation is never taken for a whole file


def median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the generated JSONL in")
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="actex-bench-plan-"))
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"barc-{args.rows}.jsonl"
    if not data.exists():
        started = time.perf_counter()
        write_barc_jsonl(data, args.rows)
        print(f"generated {data} in {time.perf_counter() - started:.1f} s")
    tokenizer = build_tokenizer(folder / "tokenizer", vocab_size=512)
    cfg = DataConfig(dataset=str(data))
    print(f"data: {args.rows:,} barc-shaped rows, {data.stat().st_size / 1e6:,.0f} MB; chunk size {args.chunk_size}")

    started = time.perf_counter()
    plan = build_plan(cfg, tokenizer, args.chunk_size)
    plan_s = time.perf_counter() - started
    print(f"plan once: {plan_s:.1f} s ({plan.num_samples:,} samples, {plan.num_chunks:,} chunks, {plan.num_rows:,} rows)")

    index = plan.index_bytes()
    started = time.perf_counter()
    plan_from_index(cfg, tokenizer, index, plan.fingerprint, "bench")
    print(f"row index: {len(index) / 1e6:.2f} MB stored with the run; loaded back in {time.perf_counter() - started:.3f} s")

    def chunk(k: int) -> None:
        fresh = plan_from_index(cfg, tokenizer, index, plan.fingerprint, "bench")
        assert len(fresh.samples(k)) == args.chunk_size

    last = plan.num_chunks - 1
    chunk(0), chunk(last)  # warm the page cache for both ends alike
    first_s, last_s = median_s(lambda: chunk(0), args.reps), median_s(lambda: chunk(last), args.reps)
    print(f"samples(k), median of {args.reps}: first chunk {first_s * 1e3:.1f} ms, last chunk (k={last}) {last_s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
