"""`--model gs://...`: a checkpoint in a bucket (fake-gcs-server) loads through a verified
local cache with the same fingerprint and the same values as from local disk."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from engine_fixtures import jax_cache, tiny_model_dir  # noqa: F401

from actex.model import load_model
from actex.model.remote import fetch_checkpoint
from actex.model.weights import HUB_PATTERNS
from actex.store.folder import open_store


@pytest.fixture
def bucket_model(gcs_bucket, tiny_model_dir) -> str:
    url = f"{gcs_bucket}/models/tiny"
    store = open_store(url)
    for path in tiny_model_dir.iterdir():
        store.write_bytes(path.name, path.read_bytes())
    return url


def test_a_checkpoint_in_gcs_loads_with_the_local_fingerprint_and_values(bucket_model, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    remote, local = load_model(bucket_model, dtype="float32"), load_model(str(tiny_model_dir), dtype="float32")
    assert remote.fingerprint == local.fingerprint
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), remote.params, local.params)
    assert all(jax.tree.leaves(same))
    assert (remote.path / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_a_truncated_cached_file_is_fetched_again_and_a_short_object_is_refused(bucket_model, tmp_path):
    folder = fetch_checkpoint(bucket_model, HUB_PATTERNS, root=tmp_path)
    weights = folder / "model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[:-10])  # an interrupted copy of an older actex, a bad disk
    assert fetch_checkpoint(bucket_model, HUB_PATTERNS, root=tmp_path).joinpath("model.safetensors").read_bytes() == full
    open_store(bucket_model).write_bytes("model.safetensors", full[:-10])  # a broken upload
    with pytest.raises(ValueError, match="but its header describes"):
        fetch_checkpoint(bucket_model, HUB_PATTERNS, root=tmp_path / "other")
