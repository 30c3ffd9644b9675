"""Small runs in store format v2 (or v1), written with the store's own encoders, for reader tests.

`write_run` lays out run.json, parts, samples.jsonl and commit records exactly as the
engine does, from random values, and returns what a reader must find: every committed
token's row in (chunk, part, row) order. Chunks listed in `uncommitted` get an attempt's
data but no commit record, so readers must not see them. `format_version=1` writes what
actex 0.1 wrote: parts without checksums, records with inline JSON stats.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import safetensors.numpy

from actex.store import dtypes, integrity, layout, quantize, shards
from actex.store.commits import CommitRecord, PartRecord, commit
from actex.store.folder import Store, open_store
from actex.store.manifest import HookSpec, PlanSummary, RunManifest
from actex.store.stats import HookStats, encode_stats

HOOKS = {"blocks.0.hook_resid_post": 16, "blocks.1.mlp.hook_post": 24}


@dataclass(frozen=True)
class Expected:
    """Committed contents in store order: row i of each array is the same token."""

    url: str
    storage_options: dict
    hooks: dict[str, np.ndarray]  # hook -> [tokens, width] in the stored dtype
    token_ids: np.ndarray  # [tokens]
    positions: np.ndarray  # [tokens]
    sample_ids: np.ndarray  # [tokens]
    chunk_of_token: np.ndarray  # [tokens]


def _positions(n: int, window: int | None) -> np.ndarray:
    # A long sample cut into forward windows has positions restarting at 0 per window.
    return np.arange(n) % window if window else np.arange(n)


def write_run(url: str, storage_options: dict | None = None, *, lengths: list[list[list[int]]],
              hooks: dict[str, int] = HOOKS, dtype: str = "bfloat16", uncommitted: tuple[int, ...] = (),
              window: int | None = None, seed: int = 0, config: dict | None = None,
              format_version: int = layout.FORMAT_VERSION) -> Expected:
    """lengths[chunk][part] = token counts of that part's samples (sample ids run in order)."""
    storage_options = storage_options or {}
    store = open_store(url, **storage_options)
    rng = np.random.default_rng(seed)
    num_samples = sum(len(p) for chunk in lengths for p in chunk)
    manifest = RunManifest(
        config=config or {"model": "tiny", "dtype": dtype, "compute_dtype": "float32"},
        config_hash="0" * 64, model_fingerprint="m", tokenizer_fingerprint="t",
        hooks=tuple(HookSpec(h, w, dtype) for h, w in hooks.items()),
        plan=PlanSummary(num_samples=num_samples, chunk_size=8, num_chunks=len(lengths), fingerprint="p"),
        format_version=format_version,
    )
    store.create_exclusive(layout.MANIFEST, manifest.to_json())
    kept: list[dict[str, np.ndarray]] = []
    sample_id = 0
    for chunk, parts in enumerate(lengths):
        attempt = f"20250101T000000Z-w0-{chunk:08x}"
        records, stats, metas, tokens = [], [], [], 0
        for k, sample_lengths in enumerate(parts):
            ids = np.arange(sample_id, sample_id + len(sample_lengths), dtype=np.int64)
            sample_id += len(sample_lengths)
            n = int(sum(sample_lengths))
            acts = random_hooks(rng, n, hooks, dtype)
            token_ids = rng.integers(0, 500, n).astype(np.int32)
            positions = np.concatenate([_positions(m, window) for m in sample_lengths] or [np.zeros(0)]).astype(np.int32)
            offsets = np.concatenate([[0], np.cumsum(sample_lengths)]).astype(np.int64)
            path = layout.part_path(chunk, attempt, k)
            if format_version == 1:
                data = encode_v1_part(acts, token_ids, positions, offsets, ids, chunk=chunk, attempt=attempt, part=k)
                records.append(PartRecord(path, len(data), hashlib.sha256(data).hexdigest()))
            else:
                part = shards.encode_part(acts, token_ids, positions, offsets, ids, chunk=chunk, attempt=attempt, part=k)
                data = part.data
                records.append(PartRecord(path, len(data), part.sha256, part.header_bytes, part.header_crc32c))
            store.write_bytes(path, data)
            stats.append({h: HookStats.from_array(stored_values(acts, h)) for h in hooks})
            metas += [{"sample_id": int(i), "n_tokens": int(m)} for i, m in zip(ids, sample_lengths)]
            tokens += n
            if chunk not in uncommitted:
                kept.append({**acts, "token_ids": token_ids, "positions": positions,
                             "sample_ids": np.repeat(ids, sample_lengths), "chunk": np.full(n, chunk)})
        store.write_bytes(layout.samples_path(chunk, attempt), shards.encode_samples_jsonl(metas))
        if chunk in uncommitted:
            continue
        merged = {h: HookStats.merge_all([HookStats.empty(w)] + [s[h] for s in stats]) for h, w in hooks.items()}
        if format_version == 1:
            record = CommitRecord(chunk, attempt, tuple(records), len(metas), tokens, "w0", format_version=1,
                                  stats={h: s.to_json() for h, s in merged.items()})
        else:
            stats_path, stats_data = layout.stats_path(chunk, attempt), encode_stats(merged)
            store.write_bytes(stats_path, stats_data)
            record = CommitRecord(chunk, attempt, tuple(records), len(metas), tokens, "w0", stats_path=stats_path,
                                  stats_crc32c=integrity.hex32(integrity.crc32c(stats_data)))
        assert commit(store, record)
    cat = lambda key: np.concatenate([k[key] for k in kept])  # noqa: E731
    return Expected(url, storage_options, {h: cat(h) for h in hooks}, cat("token_ids"), cat("positions"),
                    cat("sample_ids"), cat("chunk"))


def random_hooks(rng: np.random.Generator, n: int, hooks: dict[str, int], dtype: str) -> dict[str, np.ndarray]:
    """Random values of each hook for `n` tokens in the stored dtype; int8: codes with
    random steps and block exponents beside them (store/quantize.py's three tensors)."""
    if dtype != quantize.INT8:
        return {h: rng.standard_normal((n, w)).astype(dtypes.activation_dtype(dtype)) for h, w in hooks.items()}
    out = {}
    for h, w in hooks.items():
        out[h] = rng.integers(-quantize.CODE_MAX, quantize.CODE_MAX + 1, (n, w)).astype(np.int8)
        out[quantize.companion(h, quantize.SCALE)] = rng.uniform(0.01, 1.0, n).astype(np.float32)
        exps = rng.integers(0, quantize.LEVELS, (n, quantize.num_blocks(w)))
        out[quantize.companion(h, quantize.BLOCK_EXP)] = quantize.pack_exponents(exps)
    return out


def stored_values(acts: dict[str, np.ndarray], hook: str) -> np.ndarray:
    """A hook's values as a reader returns them (int8: dequantized from its three tensors)."""
    if acts[hook].dtype != np.int8:
        return acts[hook]
    return quantize.dequantize(acts[hook], acts[quantize.companion(hook, quantize.SCALE)],
                               acts[quantize.companion(hook, quantize.BLOCK_EXP)])


def stored_reference(expected: Expected):
    """A stand-in for verify's `reference_activations` that returns the clean stored values of
    the window's sample (looked up by its token ids): a run as written is then exact."""
    clean = {}
    for sid in np.unique(expected.sample_ids):
        rows = expected.sample_ids == sid
        clean[expected.token_ids[rows].tobytes()] = {h: a[rows] for h, a in expected.hooks.items()}
    return lambda reference, hooks, token_ids, positions: clean[np.asarray(token_ids).tobytes()]


def encode_v1_part(hooks, token_ids, positions, offsets, sample_ids, *, chunk, attempt, part) -> bytes:
    """A part as format v1 wrote it: the same tensors, no checksums in the header."""
    tensors = {**hooks, "token_ids": token_ids, "positions": positions, "sample_offsets": offsets,
               "sample_ids": sample_ids}
    metadata = {"format_version": "1", "chunk": str(chunk), "attempt": attempt, "part": str(part)}
    return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)


class CountingStore(Store):
    """A Store that records every ranged read, to prove which bytes a reader fetched."""

    def __init__(self, inner: Store):
        super().__init__(inner.fs, inner.root, inner.url, inner.retry)
        self.ranges: list[tuple[str, int, int]] = []

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        self.ranges.append((rel, start, stop))
        return super().read_range(rel, start, stop)

    def read_bytes(self, rel: str) -> bytes:
        if rel.endswith(".safetensors"):
            raise AssertionError(f"whole-file read of {rel}")
        return super().read_bytes(rel)


