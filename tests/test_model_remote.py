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


def _same_size_other_weights(data: bytes) -> bytes:
    """The checkpoint's weights file with one stored value changed, same length (a fine-tuned
    checkpoint of the same shape uploaded over the old one)."""
    header = 8 + int.from_bytes(data[:8], "little")
    changed = bytearray(data)
    changed[header + 5] ^= 0x40
    return bytes(changed)


@pytest.fixture(params=["gs", "s3"])
def uploaded(request, tiny_model_dir) -> tuple[str, dict]:
    """(url, storage_options) of the tiny checkpoint uploaded to GCS (CRC-32C) or S3 (MD5 ETag)."""
    if request.param == "gs":
        url, options = f"{request.getfixturevalue('gcs_bucket')}/models/tiny", {}
    else:
        url, options = f"{request.getfixturevalue('s3_bucket')}/models/tiny", request.getfixturevalue("s3_emulator").storage_options
    store = open_store(url, **options)
    for path in tiny_model_dir.iterdir():
        store.write_bytes(path.name, path.read_bytes())
    return url, options


def test_a_checkpoint_uploaded_over_the_old_one_is_fetched_again(uploaded, tiny_model_dir, tmp_path):
    url, options = uploaded
    store = open_store(url, **options)
    first = fetch_checkpoint(url, HUB_PATTERNS, root=tmp_path, storage_options=options)
    newer = _same_size_other_weights((tiny_model_dir / "model.safetensors").read_bytes())
    store.write_bytes("model.safetensors", newer)
    second = fetch_checkpoint(url, HUB_PATTERNS, root=tmp_path, storage_options=options)
    assert second == first  # the same cache folder, refreshed
    assert (second / "model.safetensors").read_bytes() == newer


def test_bytes_corrupted_in_transit_fail_the_store_checksum_and_are_not_kept(uploaded, tmp_path, monkeypatch):
    from actex.store import Store, StoreError

    honest = Store.read_range

    def flipping(self, rel, start, stop):  # one bit flipped on the wire, length unchanged
        data = honest(self, rel, start, stop)
        return data if rel != "model.safetensors" else bytes([data[0] ^ 1]) + data[1:]

    monkeypatch.setattr(Store, "read_range", flipping)
    url, options = uploaded
    with pytest.raises(StoreError, match="model.safetensors: the bytes read have (crc32c|md5)"):
        fetch_checkpoint(url, HUB_PATTERNS, root=tmp_path, storage_options=options)
    assert not list(tmp_path.glob("*/model.safetensors*")) and not list(tmp_path.glob("*/.model.safetensors*"))
    monkeypatch.setattr(Store, "read_range", honest)
    folder = fetch_checkpoint(url, HUB_PATTERNS, root=tmp_path, storage_options=options)
    assert (folder / "model.safetensors").read_bytes() == open_store(url, **options).read_bytes("model.safetensors")
