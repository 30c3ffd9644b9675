"""Plan benchmark: one pass to plan, then samples(k) in O(chunk) whatever k.

    .venv/bin/python bench/plan.py [--rows 200000] [--chunk-size 64] [--reps 3] [--ends 10] [--keep DIR]

Generates a barc-shaped JSONL (each row: `examples`, a list of 3-6 [input, output] grid
pairs of 3x3 to 20x20 cells, about 4 KB a row, like barc0/200k_HEAVY) under a temp dir
(or --keep DIR, reused when present), then measures with the ARC defaults
(8 predictions per task, chunks of 64 samples):

1. `build_plan`: the one pass (parse + validate + count + row index), fingerprint included;
2. the row index: its size as stored with the run, and the time to load it back
   (`plan_from_index`, what every other worker and every restart does instead of step 1);
3. for the first and the last --ends chunks: the time to read a chunk's rows (the part
   that used to grow with k: every earlier line was read again) and the whole `samples(k)`
   (read + validate + render 8 augmented prompts per task; rows differ in size, so single
   chunks differ by their content: the figures are medians over --ends chunks x --reps).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from actex.data import DataConfig, build_plan, build_tokenizer
from actex.data.plan import plan_from_index
from actex.data.sources import read_rows


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
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ends", type=int, default=10, help="chunks measured at each end")
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

    fresh = plan_from_index(cfg, tokenizer, index, plan.fingerprint, "bench")

    def read(k: int) -> None:
        start, stop = fresh.chunk_range(k)
        lo = int(np.searchsorted(fresh.row_first_ids, start, side="right")) - 1
        hi = int(np.searchsorted(fresh.row_first_ids, stop, side="left"))
        refs = [(int(fresh.row_indices[i]), int(fresh.file_nos[i]), int(fresh.locator_a[i]), int(fresh.locator_b[i])) for i in range(lo, hi)]
        assert len(list(read_rows(cfg, refs))) == hi - lo

    def render(k: int) -> None:
        assert len(fresh.samples(k)) == args.chunk_size

    ends = {"first": range(args.ends), "last": range(plan.num_chunks - args.ends, plan.num_chunks)}
    for k in [*ends["first"], *ends["last"]]:
        read(k)  # warm the page cache for both ends alike
    render(0)  # and the chat template's compiled form
    for name, chunks in ends.items():
        read_s = statistics.median(median_s(lambda: read(k), args.reps) for k in chunks)
        full_s = statistics.median(median_s(lambda: render(k), args.reps) for k in chunks)
        print(f"{name} {args.ends} chunks (k = {chunks.start}..{chunks.stop - 1}): read rows {read_s * 1e3:.1f} ms, "
              f"samples(k) {full_s * 1e3:.1f} ms (medians)")


if __name__ == "__main__":
    main()
