"""Exports load back with the stored values: SAELens datasets and the legacy pickles."""

from __future__ import annotations

import gzip
import json
import pickle

import numpy as np
import pytest
from datasets import Array2D, load_from_disk
from reader_fixtures import write_run

from actex import open_run
from actex.reader.exports.legacy import export_legacy, layer_keys
from actex.reader.exports.saelens import context_starts, export_saelens, infer_context_size

HOOK = "blocks.0.hook_resid_post"


def test_saelens_fixed_context_holds_every_token(tmp_path):
    expected = write_run(str(tmp_path / "run"), lengths=[[[8, 8], [8]], [[8, 8]], [[8]]], uncommitted=(2,))
    result = export_saelens(open_run(expected.url), tmp_path / "sae", HOOK, dtype="float32", seed=None)
    assert (result.context_size, result.rows, result.tokens_dropped) == (8, 5, 0)
    ds = load_from_disk(str(tmp_path / "sae"))
    assert ds.features[HOOK] == Array2D(shape=(8, 16), dtype="float32")
    assert ds.features["token_ids"].length == 8 and ds.features["token_ids"].feature.dtype == "int32"
    ds.set_format("numpy")
    np.testing.assert_array_equal(ds[:][HOOK].reshape(-1, 16), expected.hooks[HOOK].astype(np.float32))
    np.testing.assert_array_equal(ds[:]["token_ids"].reshape(-1), expected.token_ids)


def test_saelens_cuts_windows_and_drops_tails(tmp_path):
    # Samples of 10 and 7 tokens extracted in windows of 4 (positions 0-3, 0-3, 0-1 / 0-3, 0-2).
    expected = write_run(str(tmp_path / "run"), lengths=[[[10, 7]]], window=4)
    result = export_saelens(open_run(expected.url), tmp_path / "sae", HOOK, context_size=4, seed=None)
    assert (result.rows, result.tokens_dropped) == (3, 5)
    ds = load_from_disk(str(tmp_path / "sae")).with_format("numpy")
    rows = [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13]
    np.testing.assert_array_equal(ds[:][HOOK].reshape(-1, 16), expected.hooks[HOOK][rows].astype(np.float16))
    # Samples of different lengths (ARC prompts, say) need no --context-size: the default is
    # the largest power of two that fits the shortest window (min(7, window 4) -> 4).
    default = export_saelens(open_run(expected.url), tmp_path / "other", HOOK)
    assert (default.context_size, default.rows, default.tokens_dropped) == (4, 3, 5)


def test_saelens_default_context_size_for_varying_lengths(tmp_path):
    expected = write_run(str(tmp_path / "run"), lengths=[[[37, 21]], [[100]]])
    assert infer_context_size(open_run(expected.url)) == 16  # 21 tokens -> 16, each sample a row
    config = {"model": "tiny", "dtype": "bfloat16", "compute_dtype": "float32", "data": {"max_seq_len": 12}}
    windowed = write_run(str(tmp_path / "windowed"), lengths=[[[37, 21]]], window=12, config=config)
    assert infer_context_size(open_run(windowed.url)) == 8  # no window is longer than 12


def test_context_starts_never_cross_a_restart():
    positions = np.array([0, 1, 2, 0, 1, 2, 3, 4, 5, 6])
    assert context_starts(positions, np.zeros(10), 3).tolist() == [0, 3, 6]
    assert context_starts(positions, np.array([0] * 5 + [1] * 5), 3).tolist() == [0, 6]
    # From each window's end: [0, 3) is the whole 3-token window, then [4, 7) and [7, 10).
    assert context_starts(positions, np.zeros(10), 3, align="end").tolist() == [0, 4, 7]
    # Only each window's first context, the whole contexts.
    assert context_starts(positions, np.zeros(10), 3, first_only=True).tolist() == [0, 3]


def test_legacy_pickles_round_trip(tmp_path):
    expected = write_run(str(tmp_path / "run"), lengths=[[[3, 5], [2]], [[4]]])
    run = open_run(expected.url)
    result = export_legacy(run, tmp_path / "legacy", samples_per_shard=3, decode=lambda ids: f"ids{ids[:2]}")
    assert (result.shards, result.samples) == (2, 4)
    shards = []
    for k in range(2):
        with gzip.open(tmp_path / "legacy" / f"shard_{k:04d}.pkl.gz") as f:
            shards.append(pickle.load(f))
    assert set(shards[0]) == {0, 1}  # blocks.0.hook_resid_post -> 0, blocks.1.mlp.hook_post -> 1
    entries = shards[0][0] + shards[1][0]
    assert [e["sample_idx"] for e in entries] == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.concatenate([e["activation"] for e in entries]),
                                  expected.hooks[HOOK].astype(np.float32))
    assert entries[1]["shape"] == (5, 16)
    assert entries[1]["text_preview"] == f"ids{expected.token_ids[3:5].tolist()}"
    meta = json.loads((tmp_path / "legacy" / "metadata.json").read_text())
    assert meta["num_samples"] == 4 and "trusted" in meta["format"]
    with pytest.raises(ValueError, match="both map to legacy layer 0") as error:
        layer_keys(["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"])
    # It names the option `actex export` has (--hook, repeatable); there is no --hooks.
    assert "--hooks" not in str(error.value) and "--hook blocks.0.hook_resid_post" in str(error.value)
