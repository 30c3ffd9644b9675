"""Reader throughput: one hook, shuffled, from a local store and from fake-gcs-server.

    .venv/bin/python bench/reader.py [--local-mb 1024] [--gcs-mb 128]

Writes a synthetic run (two hooks: the one read, width 896 bf16 = Qwen2.5-0.5B's residual,
and a wider one that must NOT be read), then times `Run.iter_batches` over every token of
the first hook. MB/s counts activation bytes delivered to the caller.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import servers  # noqa: E402  (emulator helpers shared with the tests)
from reader_fixtures import write_run  # noqa: E402

from actex import open_run  # noqa: E402

HOOK, OTHER = "blocks.12.hook_resid_post", "blocks.12.mlp.hook_post"
WIDTHS = {HOOK: 896, OTHER: 4864}
TOKENS_PER_SAMPLE = 2048


def lengths_for(mb: int, parts: int) -> list[list[list[int]]]:
    """One part per chunk, samples of 2048 tokens, about `mb` MB of the read hook in all."""
    tokens = mb * 1_000_000 // (WIDTHS[HOOK] * 2)
    per_part = max(1, tokens // parts // TOKENS_PER_SAMPLE)
    return [[[TOKENS_PER_SAMPLE] * per_part] for _ in range(parts)]


def epoch_seconds(url: str, options: dict, **kwargs) -> tuple[int, float]:
    """Tokens delivered and wall seconds for one epoch (a fresh Run: headers fetched again)."""
    run = open_run(url, **options)
    start = time.perf_counter()
    tokens = sum(len(batch) for batch in run.iter_batches(HOOK, 4096, **kwargs))
    return tokens, time.perf_counter() - start


def measure(url: str, options: dict, label: str, repeat: int, **kwargs) -> None:
    """Median and best of `repeat` epochs: on a shared machine the spread is the news."""
    runs = [epoch_seconds(url, options, **kwargs) for _ in range(repeat)]
    tokens = runs[0][0]
    seconds = sorted(s for _, s in runs)
    median, best = seconds[len(seconds) // 2], seconds[0]
    mb = tokens * WIDTHS[HOOK] * 2 / 1e6
    print(f"{label:34s} {tokens:>10,} tokens  median {median:5.2f} s {mb / median:7,.0f} MB/s"
          f"  best {best:5.2f} s {tokens / best:>10,.0f} tokens/s {mb / best:7,.0f} MB/s"
          f"  (load {os.getloadavg()[0]:.1f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-mb", type=int, default=1024)
    parser.add_argument("--gcs-mb", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="epochs per setting (median and best reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        # The unread hook is narrow in the synthetic data to keep the write short; its bytes
        # still sit between the read hook's parts, so ranged reads must skip them.
        widths = {HOOK: WIDTHS[HOOK], OTHER: 64}
        url = f"{tmp}/run"
        write_run(url, lengths=lengths_for(args.local_mb, 16), hooks=widths)
        measure(url, {}, "local, in order", args.repeat, shuffle=False)
        measure(url, {}, "local, shuffled (1 GB buffer)", args.repeat, shuffle=True)
        measure(url, {}, "local, shuffled (256 MB buffer)", args.repeat, shuffle=True, shuffle_bytes=256 << 20)
        if args.gcs_mb:
            # The tests' own fixtures, called as plain functions: same server, same setup.
            emulator = stack.enter_context(contextmanager(servers.gcs_emulator.__wrapped__)())
            bucket = servers.gcs_bucket.__wrapped__(emulator)
            gcs_url = f"{bucket}/run"
            write_run(gcs_url, emulator.storage_options, lengths=lengths_for(args.gcs_mb, 8), hooks=widths)
            measure(gcs_url, emulator.storage_options, "fake-gcs-server, shuffled", args.repeat,
                    shuffle=True, threads=16, prefetch=16)


if __name__ == "__main__":
    main()
