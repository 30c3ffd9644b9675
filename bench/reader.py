"""Reader throughput per storage dtype, checked against unchecked, local and fake-gcs-server.

    .venv/bin/python bench/reader.py [--local-mb 512] [--gcs-mb 64] [--dtypes float32,bfloat16,int8]

Writes a synthetic run per storage dtype (two hooks: the one read, width 896 = Qwen2.5-0.5B's
residual, and a narrow one whose bytes sit between and must NOT be read), then times
`Run.iter_batches` over every token of the first hook, in order and shuffled. GB/s counts
the values delivered to the caller (`batch.activations.nbytes`: int8 runs deliver float32,
dequantized, so their GB/s is of float32 values). Each setting is timed in rounds of
interleaved epochs: as the reader runs (every byte checked against its CRC-32C), with the
CRC comparison replaced by a length check (`unchecked`), and with `--gil-held` also with
every check holding the GIL (the reader before its checks overlapped the reads), so the
ratios are taken under the same load. `--local-mb` is the read hook's stored size per dtype.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import google_crc32c
import numpy as np

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


# How an epoch is read: as the reader does; with every check holding the GIL (what
# google_crc32c.value does with a slice of a read: the reader before its checks moved to
# ctypes); with no CRC comparison at all.
CHECKED, GIL_HELD, UNCHECKED = "checked", "GIL held", "unchecked"


@contextmanager
def checks(mode: str):
    if mode == CHECKED:
        yield
    elif mode == GIL_HELD:
        with mock.patch.object(integrity, "_C_VALUE", None):
            yield
    else:
        with mock.patch.object(integrity, "check_rows", length_only):
            yield


def epoch(url: str, options: dict, mode: str, **kwargs) -> tuple[int, float, float]:
    """Value bytes delivered, wall seconds and this process's CPU seconds (every thread) for
    one epoch (a fresh Run: headers fetched again)."""
    with checks(mode):
        run = open_run(url, **options)
        start, cpu = time.perf_counter(), time.process_time()
        delivered = sum(batch.activations.nbytes for batch in run.iter_batches(HOOK, 4096, **kwargs))
        return delivered, time.perf_counter() - start, time.process_time() - cpu


def measure(url: str, options: dict, label: str, repeat: int, modes: tuple[str, ...], **kwargs) -> None:
    """Median (and best) GB/s of `repeat` epochs per mode, the modes interleaved."""
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    delivered = 0
    loads = []
    for _ in range(repeat):
        for mode in modes:
            delivered, s, c = epoch(url, options, mode, **kwargs)
            seconds[mode].append(s)
            cpu[mode].append(c)
        loads.append(os.getloadavg()[0])
    rate = {m: delivered / sorted(s)[len(s) // 2] / 1e9 for m, s in seconds.items()}
    best = {m: delivered / min(s) / 1e9 for m, s in seconds.items()}
    # CPU seconds per GB delivered: what the load on a shared machine changes least.
    cost = {m: sorted(c)[len(c) // 2] / (delivered / 1e9) for m, c in cpu.items()}
    columns = "  ".join(f"{m} {rate[m]:5.2f} GB/s (best {best[m]:5.2f}, {cost[m]:4.2f} CPU s/GB)" for m in modes)
    print(f"{label:40s} {delivered / 1e9:5.2f} GB  {columns}  checked/unchecked {rate[CHECKED] / rate[UNCHECKED]:4.2f}"
          f"  (load {min(loads):.1f}-{max(loads):.1f})", flush=True)


def overlap(repeat: int = 7) -> None:
    """1,500 checks of a 1 MiB block on one thread beside 3M Python additions on this one:
    the wall time together is the sum when the checks hold the GIL, less when they do not."""
    block = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)

    def checks(value) -> None:
        for _ in range(1500):
            value(block)

    def python_work() -> None:
        total = 0
        for i in range(3_000_000):
            total += i

    def timed(*work) -> float:
        start = time.perf_counter()
        threads = [threading.Thread(target=w) for w in work[1:]]
        for thread in threads:
            thread.start()
        work[0]()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start

    settings = {"checks alone": (lambda: checks(integrity.crc32c),), "python alone": (python_work,),
                "together, GIL held": (python_work, lambda: checks(google_crc32c.value)),
                "together, GIL released": (python_work, lambda: checks(integrity.crc32c))}
    seconds = {name: sorted(timed(*work) for _ in range(repeat)) for name, work in settings.items()}
    for name, s in seconds.items():
        print(f"{name:24s} median {s[len(s) // 2]:.3f} s  (load {os.getloadavg()[0]:.1f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-mb", type=int, default=512)
    parser.add_argument("--gcs-mb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="epochs per setting and mode (median reported)")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    parser.add_argument("--gil-held", action="store_true", help="also time the checks holding the GIL (before)")
    parser.add_argument("--overlap", action="store_true", help="only time checks beside Python work, GIL held vs not")
    args = parser.parse_args()
    if args.overlap:
        overlap()
        return
    modes = (CHECKED, GIL_HELD, UNCHECKED) if args.gil_held else (CHECKED, UNCHECKED)
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
            measure(url, {}, f"{dtype}: local, in order", args.repeat, modes, shuffle=False)
            measure(url, {}, f"{dtype}: local, shuffled (256 MB buffer)", args.repeat, modes, shuffle=True,
                    shuffle_bytes=256 << 20)
            if gcs is not None:
                gcs_url = f"{gcs[0]}/{dtype}"
                write_run(gcs_url, gcs[1], lengths=lengths_for(args.gcs_mb, 8, dtype), hooks=WIDTHS, dtype=dtype)
                measure(gcs_url, gcs[1], f"{dtype}: fake-gcs-server, shuffled", args.repeat, modes, shuffle=True,
                        threads=16, prefetch=16)


if __name__ == "__main__":
    main()
