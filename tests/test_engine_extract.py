"""End-to-end extraction in-process on a tiny random Qwen2: every backend, parts, resume,
config agreement; and the chunk assembler on its own."""

from __future__ import annotations

import json

import numpy as np
import pytest
from engine_fixtures import TINY_HOOKS, arc_dataset, jax_cache, committed_tensors, run_fields, text_dataset, tiny_model_dir  # noqa: F401

from actex.data import TokenizedSample, tokenize_samples
from actex.engine.prepare import prepare_run
from actex.engine.worker import extract
from actex.engine.assembly import ChunkAssembler
from actex.engine.work import StaticChunks
from actex.model import make_capture_fn
from actex.store.commits import read_commits
from actex.store.manifest import ManifestMismatchError
from actex.store import shards
from actex.store.stats import HookStats, decode_stats


def extract_all(fields: dict, storage_options: dict | None = None):
    run = prepare_run(fields, storage_options=storage_options)
    return run, extract(run, StaticChunks(run.plan.num_chunks), worker="w0")


def direct_hooks(run, windows: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The model's own output for each window alone in a padded row: [{hook: [n, width]}]."""
    seq = run.config.data.max_seq_len
    rows = lambda make: np.stack([np.pad(make(w), (0, seq - len(w))) for w in windows]).astype(np.int32)  # noqa: E731
    capture = make_capture_fn(run.model.config, run.config.hooks, "float32")
    out = capture(run.model.params, rows(lambda w: w), rows(lambda w: np.arange(len(w))), rows(np.ones_like))
    return [{hook: np.asarray(values[i, : len(w)]) for hook, values in out.items()} for i, w in enumerate(windows)]


def store_snapshot(store) -> dict[str, bytes]:
    return {path: store.read_bytes(path) for path in store.list()}


def test_extract_equals_direct_forward_on_every_backend(store_url, tiny_model_dir, text_dataset):
    output, options = store_url
    run, summary = extract_all(run_fields(tiny_model_dir, text_dataset, output), options)
    url = f"{output}/t"

    assert summary.committed == run.plan.num_chunks == 3 and summary.skipped == 0
    records = read_commits(run.store)
    assert sorted(records) == [0, 1, 2]
    stored = committed_tensors(url, options)
    assert sorted(stored) == list(range(run.plan.num_samples))

    samples = [s for k in range(run.plan.num_chunks) for s in run.plan.samples(k)]
    tokenized = tokenize_samples(samples, run.tokenizer, run.config.data)
    assert max(len(t.windows) for t in tokenized) > 1, "the long row must be split into windows"
    windows = [(t, start, stop) for t in tokenized for start, stop in t.windows]
    direct = direct_hooks(run, [t.token_ids[start:stop] for t, start, stop in windows])
    for (sample, start, stop), expected in zip(windows, direct):
        got = stored[sample.sample_id]
        assert np.frombuffer(got["token_ids"], np.int32).tolist() == sample.token_ids.tolist()
        positions = np.frombuffer(got["positions"], np.int32)
        assert positions[start:stop].tolist() == list(range(stop - start))
        for hook in TINY_HOOKS:
            values = np.frombuffer(got[hook], np.float32).reshape(-1, run.widths[hook])[start:stop]
            np.testing.assert_allclose(values, expected[hook], rtol=2e-5, atol=2e-5, err_msg=hook)

    meta = [json.loads(line) for line in run.store.read_bytes(records[2].samples_path).decode().splitlines()]
    assert [m["sample_id"] for m in meta] == [6, 7, 8]
    assert [m["source_row"] for m in meta] == [6, 7, 8]
    assert meta[-1]["n_tokens"] == len(tokenized[-1].token_ids)
    # Chunk statistics (reduced on the device) agree with the stored values of the chunk.
    chunk_stats = decode_stats(run.store.read_bytes(records[0].stats_path))
    assert set(chunk_stats) == set(TINY_HOOKS) and len(records[0].to_json()) < 2048  # small whatever the hooks
    for hook in TINY_HOOKS:
        chunk0 = np.concatenate(
            [np.frombuffer(stored[i][hook], np.float32).reshape(-1, run.widths[hook]) for i in range(3)]
        )
        expected, got = HookStats.from_array(chunk0), chunk_stats[hook]
        assert got.count == expected.count == records[0].tokens
        np.testing.assert_allclose(got.mean, expected.mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.m2, expected.m2, rtol=1e-4, atol=1e-6)
        assert got.norm_sum == pytest.approx(expected.norm_sum, rel=1e-5)
    heartbeat = json.loads(run.store.read_bytes("workers/w0.json"))
    assert heartbeat["chunks_done"] == 3 and heartbeat["state"] == "finished"

    # Resume is rerunning: nothing left to do, nothing rewritten.
    before = store_snapshot(run.store.child("commits"))
    _, again = extract_all(run_fields(tiny_model_dir, text_dataset, output), options)
    assert (again.committed, again.skipped) == (0, 3)
    assert store_snapshot(run.store.child("commits")) == before


def test_parts_split_at_shard_size_and_hold_the_same_tensors(tmp_path, tiny_model_dir, arc_dataset):
    arc = {"format": "arc", "predictions_per_task": 2, "max_seq_len": 2048, "long_policy": "truncate"}
    fields = run_fields(tiny_model_dir, arc_dataset, str(tmp_path / "a"), chunk_size=4, batch_tokens=4096, data=arc)
    whole, _ = extract_all(fields)
    split, _ = extract_all({**fields, "output": str(tmp_path / "b"), "shard_size": 1})

    # A shard size below one sample's bytes: one part per sample, never a sample cut in two.
    for chunk, record in read_commits(split.store).items():
        assert len(record.parts) == record.samples
    assert all(len(r.parts) == 1 for r in read_commits(whole.store).values())
    assert committed_tensors(whole.config.run_url) == committed_tensors(split.config.run_url)
    assert set(json.loads(split.store.read_bytes("run.json"))["config"]) >= {"hooks", "dtype", "shard_size"}


def test_different_config_refuses_before_touching_the_run(tmp_path, tiny_model_dir, text_dataset):
    fields = run_fields(tiny_model_dir, text_dataset, str(tmp_path))
    run, _ = extract_all(fields)
    before = store_snapshot(run.store)
    with pytest.raises(ManifestMismatchError, match=r"(?s)config\.dtype.*config\.chunk_size|config\.chunk_size.*config\.dtype"):
        prepare_run({**fields, "dtype": "bfloat16", "chunk_size": 2})
    assert store_snapshot(run.store) == before


def test_run_name_derives_from_the_config_hash(tmp_path, tiny_model_dir, text_dataset):
    fields = {**run_fields(tiny_model_dir, text_dataset, str(tmp_path)), "run_name": None}
    first = prepare_run(fields).config
    assert first.name == f"run-{first.config_hash[:12]}"
    assert prepare_run({**fields, "output": str(tmp_path / "elsewhere")}).config.config_hash == first.config_hash
    assert prepare_run({**fields, "dtype": "bfloat16"}).config.name != first.name


# --------------------------------------------------------------------------- assembler


def test_assembler_reassembles_windows_out_of_order_and_cuts_parts():
    samples = [
        TokenizedSample(10, np.arange(5, dtype=np.int32), ((0, 3), (3, 5)), {}),
        TokenizedSample(11, np.arange(2, dtype=np.int32), ((0, 2),), {}),
        TokenizedSample(12, np.zeros(0, np.int32), (), {"skipped": "too long"}),
    ]
    # A shard of 1 byte is below any sample's size: one part per sample.
    assembler = ChunkAssembler(samples, {"h": 2}, "float32", shard_size=1)
    host = {"h": np.arange(2 * 4 * 2, dtype=np.float32).reshape(2, 4, 2)}  # [rows, seq, width]
    positions = np.array([[0, 1, 0, 1], [0, 1, 2, 0]], np.int32)
    # Row 0: window 2 of sample 10 then sample 11; row 1: window 1 of sample 10.
    assembler.add([(10, 3, 0, 0, 2)], positions, host)
    first = assembler.ready_parts()
    assert [p.sample_ids.tolist() for p in first] == [[12]]  # empty: complete from the start
    assembler.add([(11, 0, 0, 2, 2), (10, 0, 1, 0, 3)], positions, host)
    parts = sorted(first + assembler.ready_parts(final=True), key=lambda p: p.index)

    assert [p.sample_ids.tolist() for p in parts] == [[10], [11], [12]]
    np.testing.assert_array_equal(parts[0].acts["h"], np.concatenate([host["h"][1, :3], host["h"][0, :2]]))
    assert parts[0].positions.tolist() == [0, 1, 2, 0, 1]
    np.testing.assert_array_equal(parts[1].acts["h"], host["h"][0, 2:4])
    assert [r["n_tokens"] for r in assembler.records] == [5, 2, 0] and assembler.records[2]["skipped"] == "too long"


def test_assembler_keeps_samples_together_under_the_shard_size():
    samples = [TokenizedSample(i, np.arange(n, dtype=np.int32), ((0, n),), {}) for i, n in enumerate([3, 3, 3, 9])]
    # 16 bytes per token (float32 width 2 + ids), 16 per sample of index, plus the header
    # allowance: exactly two 3-token samples fit.
    shard_size = shards.part_bytes([3, 3], token_bytes=16)
    assembler = ChunkAssembler(samples, {"h": 2}, "float32", shard_size=shard_size)
    assert [p.sample_ids.tolist() for p in assembler.parts] == [[0, 1], [2], [3]]
    assert assembler.parts[0].sample_offsets.tolist() == [0, 3, 6]


def test_assembler_refuses_to_finish_a_chunk_with_missing_tokens():
    samples = [TokenizedSample(0, np.arange(4, dtype=np.int32), ((0, 4),), {})]
    assembler = ChunkAssembler(samples, {"h": 1}, "float32", shard_size=1 << 20)
    with pytest.raises(RuntimeError, match=r"samples \[0\]\): 0 of 4 tokens"):
        assembler.ready_parts(final=True)


def test_written_parts_free_their_activations_before_the_chunk_commits(tmp_path, tiny_model_dir, text_dataset, monkeypatch):
    """Backpressure bounds the parts waiting for a writer; a part already written must not
    stay in memory until its whole chunk commits (with a slow store, several chunks wait)."""
    import gc
    import weakref

    from actex.engine import pipeline

    alive: dict[int, list] = {}
    encode, commit = pipeline.encode, pipeline.commit

    def tracking_encode(part, *args, chunk, **kwargs):
        alive.setdefault(chunk, []).extend(weakref.ref(a) for a in part.acts.values())
        return encode(part, *args, chunk=chunk, **kwargs)

    def checking_commit(store, record):
        gc.collect()
        held = sum(ref() is not None for ref in alive[record.chunk])
        assert held == 0, f"chunk {record.chunk}: {held} written activation arrays still in memory"
        return commit(store, record)

    monkeypatch.setattr(pipeline, "encode", tracking_encode)
    monkeypatch.setattr(pipeline, "commit", checking_commit)
    run, summary = extract_all(run_fields(tiny_model_dir, text_dataset, str(tmp_path), shard_size=1))
    assert summary.committed == run.plan.num_chunks and sum(map(len, alive.values())) > 0


def test_the_same_run_reached_by_another_spelling_of_output_is_accepted(tmp_path, tiny_model_dir, text_dataset):
    """`output` and `run_name` say where the run lives, not what it is (the config hash
    leaves them out): `--output DIR/` and a named `run-<hash>` reach the same run."""
    from actex.config import NOT_HASHED
    from actex.store.manifest import LOCATION_FIELDS

    fields = {**run_fields(tiny_model_dir, text_dataset, str(tmp_path)), "run_name": None}
    first = prepare_run(fields)
    again = prepare_run({**fields, "output": str(tmp_path) + "/", "run_name": first.config.name})
    assert again.config.run_url == first.config.run_url
    # The revision is not hashed either, but it is pinned by run.json's config instead.
    assert LOCATION_FIELDS | {"revision"} == NOT_HASHED
