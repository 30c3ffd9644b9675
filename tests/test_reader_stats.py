"""HookStats: mergeable statistics equal numpy's over a whole run."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from reader_fixtures import HOOKS, write_run

from actex import open_run
from actex.reader.run import spread
from actex.store.stats import HookStats


def numpy_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    x = x.astype(np.float64)
    return x.mean(0), x.var(0), float(np.linalg.norm(x, axis=1).mean())


def test_merge_of_pieces_equals_whole():
    rng = np.random.default_rng(0)
    x = (3.0 + rng.standard_normal((1000, 7)) * 5).astype(ml_dtypes.bfloat16)
    pieces = [HookStats.from_array(x[a:b]) for a, b in [(0, 1), (1, 300), (300, 300), (300, 1000)]]
    merged = HookStats.merge_all(pieces)
    mean, var, norm = numpy_stats(x)
    assert merged.count == 1000
    np.testing.assert_allclose(merged.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(merged.variance, var, rtol=1e-10)
    assert merged.mean_l2_norm == pytest.approx(norm, rel=1e-12)


def test_json_round_trip_is_compact_and_close():
    stats = HookStats.from_array(np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32))
    record = json.loads(json.dumps(stats.to_json()))
    back = HookStats.from_json(record)
    assert back.count == 50 and all(len(repr(v)) <= 16 for v in record["mean"])
    np.testing.assert_allclose(back.mean, stats.mean, rtol=1e-8)
    np.testing.assert_allclose(back.m2, stats.m2, rtol=1e-8)
    with pytest.raises(ValueError, match="bad hook stats record"):
        HookStats.from_json({"count": 1, "mean": [0.0], "m2": [0.0, 1.0], "norm_sum": 0.0})


def test_run_stats_match_numpy_over_committed_tokens(tmp_path):
    expected = write_run(str(tmp_path / "run"), lengths=[[[5, 9], [7]], [[12, 0, 8]], [[30]]], uncommitted=(1,))
    run = open_run(expected.url)
    for hook in HOOKS:
        stats = run.stats(hook)
        mean, var, norm = numpy_stats(expected.hooks[hook])
        assert stats.count == len(expected.token_ids)
        np.testing.assert_allclose(stats.mean, mean, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats.variance, var, rtol=1e-6)
        assert stats.mean_l2_norm == pytest.approx(norm, rel=1e-6)
    summary = run.summary()
    assert summary["chunks_committed"] == 2 and summary["tokens"] == 51
    assert summary["hooks"]["blocks.0.hook_resid_post"]["stats"]["count"] == 51


def test_summary_reads_the_stats_of_a_spread_of_chunks_not_of_every_chunk(tmp_path):
    lengths = [[[5, 9], [7]], [[12, 0, 8]], [[30]], [[4]], [[6, 2]]]  # tokens per chunk: 21, 20, 30, 4, 8
    expected = write_run(str(tmp_path / "run"), lengths=lengths)
    run = open_run(expected.url)
    read = []
    honest = run.store.read_many
    run.store.read_many = lambda paths: read.extend(paths) or honest(paths)
    summary = run.summary(stats_chunks=2)
    assert summary["stats_chunks"] == 2 and summary["chunks_committed"] == 5
    stats_read = [path for path in read if path.endswith("stats.safetensors")]
    assert [path.split("/")[1] for path in stats_read] == ["000000", "000004"]  # not chunks 1-3
    hook = next(iter(HOOKS))
    mean, var, norm = numpy_stats(np.concatenate([expected.hooks[hook][:21], expected.hooks[hook][-8:]]))
    sampled = run.stats(hook, spread(run.chunks, 2))
    assert sampled.count == 29 and summary["hooks"][hook]["stats"]["count"] == 29
    np.testing.assert_allclose(sampled.mean, mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sampled.variance, var, rtol=1e-6)
    assert run.summary(stats_chunks=None)["hooks"][hook]["stats"]["count"] == 83
    assert spread([3, 5, 8, 13, 21], 3) == [3, 8, 21] and spread([1, 2], 5) == [1, 2] and spread([1, 2], 0) == []


def test_device_moments_of_a_large_offset_feature_match_numpy_float64():
    """A feature at 3e4 + N(0, 0.01), float32 as stored: the engine's per-batch moments
    (reduced on the device in float32) merged across batches give numpy's float64 variance
    to 1e-3 (a plain float32 mean before squaring was 42% off)."""
    from actex.engine.moments import batch_moments, to_stats

    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        x = np.stack([3e4 + rng.normal(0, 0.01, (4, 256)), rng.normal(0, 1, (4, 256))], -1).astype(np.float32)
        segments = np.ones((4, 256), np.int32)
        segments[3, 200:] = 0  # padding: not a token
        batches.append((x, segments))
    merged = HookStats.merge_all(to_stats(batch_moments({"h": x}, seg))["h"] for x, seg in batches)
    real = np.concatenate([x[seg > 0] for x, seg in batches]).astype(np.float64)
    assert merged.count == len(real)
    np.testing.assert_allclose(merged.variance, real.var(0), rtol=1e-3)
    np.testing.assert_allclose(merged.mean, real.mean(0), rtol=1e-9, atol=1e-6)
    assert merged.mean_l2_norm == pytest.approx(np.linalg.norm(real, axis=1).mean(), rel=1e-6)
