"""Reader throughput per storage dtype, checked against unchecked, local and fake-gcs-server.

    .venv/bin/python bench/reader.py [--local-mb 512] [--gcs-mb 64] [--dtypes float32,bfloat16,int8]

Writes a synthetic run per storage dtype (two hooks: the one read, width 896 = Qwen2.5-0.5B's
residual, and a narrow one whose bytes sit between and must NOT be read), then times
`Run.iter_batches` over every token of the first hook, in order and shuffled. GB/s counts
the values delivered to the caller (`batch.activations.nbytes`: int8 runs deliver float32,
dequantized, so their GB/s is of float32 values). Each setting is timed twice per epoch
round, interleaved: as the reader runs (every byte checked against its CRC-32C) and with
the CRC comparison replaced by a length check (`unchecked`), so the ratio of the two is
taken under the same load. `--local-mb` is the read hook's stored size per dtype.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import servers  # noqa: E402  (emulator helpers shared with the tests)
from reader_fixtures import write_run  # noqa: E402

from actex import open_run  # noqa: E402
from actex.store import integrity, quantize  # noqa: E402
from actex.store.integrity import CorruptPartError  # noqa: E402

HOOK, OTHER = "blocks.12.hook_resid_post", "blocks.12.mlp.hook_post"
WIDTHS = {HOOK: 896, OTHER: 64}
TOKENS_PER_SAMPLE = 2048
STORED_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, quantize.INT8: 1}


def lengths_for(mb: int, parts: int, dtype: str) -> list[list[list[int]]]:
    """One part per chunk, samples of 2048 tokens, about `mb` MB of the read hook in all."""
    tokens = mb * 1_000_000 // (WIDTHS[HOOK] * STORED_BYTES[dtype])
    per_part = max(1, tokens // parts // TOKENS_PER_SAMPLE)
    return [[[TOKENS_PER_SAMPLE] * per_part] for _ in range(parts)]


def length_only(raw, *, where: str, tensor: str, row_bytes: int, lo: int, hi: int, **_) -> None:
    """integrity.check_rows without the CRC: what the read costs when nothing is checked."""
    if len(raw) != (hi - lo) * row_bytes:
        raise CorruptPartError(f"{where}: truncated: tensor {tensor}")


@contextmanager
def checks(on: bool):
    if on:
        yield
        return
    with mock.patch.object(integrity, "check_rows", length_only):
        yield


def epoch(url: str, options: dict, checked: bool, **kwargs) -> tuple[int, float]:
    """Value bytes delivered and wall seconds for one epoch (a fresh Run: headers fetched again)."""
    with checks(checked):
        run = open_run(url, **options)
        start = time.perf_counter()
        delivered = sum(batch.activations.nbytes for batch in run.iter_batches(HOOK, 4096, **kwargs))
        return delivered, time.perf_counter() - start


def measure(url: str, options: dict, label: str, repeat: int, **kwargs) -> dict[bool, float]:
    """Median GB/s of `repeat` epochs, checked and unchecked epochs interleaved."""
    seconds: dict[bool, list[float]] = {True: [], False: []}
    delivered = 0
    loads = []
    for _ in range(repeat):
        for checked in (True, False):
            delivered, s = epoch(url, options, checked, **kwargs)
            seconds[checked].append(s)
        loads.append(os.getloadavg()[0])
    rate = {c: delivered / sorted(s)[len(s) // 2] / 1e9 for c, s in seconds.items()}
    best = {c: delivered / min(s) / 1e9 for c, s in seconds.items()}
    print(f"{label:40s} {delivered / 1e9:5.2f} GB  checked {rate[True]:5.2f} GB/s (best {best[True]:5.2f})"
          f"  unchecked {rate[False]:5.2f} GB/s (best {best[False]:5.2f})  ratio {rate[True] / rate[False]:4.2f}"
          f"  (load {min(loads):.1f}-{max(loads):.1f})", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-mb", type=int, default=512)
    parser.add_argument("--gcs-mb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="epochs per setting and mode (median reported)")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        gcs = None
        if args.gcs_mb:
            # The tests' own fixtures, called as plain functions: same server, same setup.
            emulator = stack.enter_context(contextmanager(servers.gcs_emulator.__wrapped__)())
            gcs = (servers.gcs_bucket.__wrapped__(emulator), emulator.storage_options)
        for dtype in args.dtypes.split(","):
            url = f"{tmp}/{dtype}"
            write_run(url, lengths=lengths_for(args.local_mb, 16, dtype), hooks=WIDTHS, dtype=dtype)
            measure(url, {}, f"{dtype}: local, in order", args.repeat, shuffle=False)
            measure(url, {}, f"{dtype}: local, shuffled (256 MB buffer)", args.repeat, shuffle=True,
                    shuffle_bytes=256 << 20)
            if gcs is not None:
                gcs_url = f"{gcs[0]}/{dtype}"
                write_run(gcs_url, gcs[1], lengths=lengths_for(args.gcs_mb, 8, dtype), hooks=WIDTHS, dtype=dtype)
                measure(gcs_url, gcs[1], f"{dtype}: fake-gcs-server, shuffled", args.repeat, shuffle=True,
                        threads=16, prefetch=16)


if __name__ == "__main__":
    main()
