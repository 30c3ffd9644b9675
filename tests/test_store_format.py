"""Format v2 on top of the store: parts, shard splitting, run.json, commit records, heartbeats."""

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors.torch import load as torch_load

from actex.store import layout, open_store
from actex.store.commits import (
    CommitRecord, Heartbeat, PartRecord, commit, committed_chunks, is_committed, read_commit,
    read_commits, read_heartbeats,
)
from actex.store.manifest import (
    HookSpec, ManifestMismatchError, PlanSummary, RunManifest, open_or_create_manifest, read_manifest,
)
from actex.store.shards import (
    decode_part, decode_samples_jsonl, encode_part, encode_samples_jsonl, read_header, split_samples,
    token_bytes,
)

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.mlp.hook_post")


def make_part_arrays(sample_lengths, widths=(8, 12), dtype=ml_dtypes.bfloat16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = sum(sample_lengths)
    hooks = {name: rng.standard_normal((tokens, w)).astype(dtype) for name, w in zip(HOOKS, widths)}
    token_ids = rng.integers(0, 150_000, tokens).astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in sample_lengths]).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(sample_lengths)]).astype(np.int64)
    sample_ids = np.arange(100, 100 + len(sample_lengths), dtype=np.int64)
    return hooks, token_ids, positions, offsets, sample_ids


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
def test_part_round_trip(dtype):
    hooks, token_ids, positions, offsets, sample_ids = make_part_arrays([3, 5, 1], dtype=dtype)
    encoded = encode_part(hooks, token_ids, positions, offsets, sample_ids, chunk=4, attempt="att-1", part=2)
    part = decode_part(encoded.data)
    for name in HOOKS:
        assert part.hooks[name].dtype == np.dtype(dtype)
        assert part.hooks[name].tobytes() == hooks[name].tobytes()  # bit-exact, bf16 included
    np.testing.assert_array_equal(part.token_ids, token_ids)
    np.testing.assert_array_equal(part.positions, positions)
    np.testing.assert_array_equal(part.sample_offsets, offsets)
    np.testing.assert_array_equal(part.sample_ids, sample_ids)
    assert part.metadata == {"format_version": "2", "chunk": "4", "attempt": "att-1", "part": "2"}
    assert (encoded.tokens, encoded.samples) == (9, 3)
    np.testing.assert_array_equal(part.positions[part.sample(1)], np.arange(5))


def test_part_opens_with_plain_safetensors():
    hooks, *index = make_part_arrays([4, 2])
    data = encode_part(hooks, *index, chunk=0, attempt="a", part=0).data
    tensors = torch_load(data)  # what a user without actex does
    assert tensors[HOOKS[0]].dtype == torch.bfloat16
    assert tensors[HOOKS[0]].float().numpy().tobytes() == hooks[HOOKS[0]].astype(np.float32).tobytes()
    assert safetensors.numpy.load(encode_part(
        {h: a.astype(np.float32) for h, a in hooks.items()}, *index, chunk=0, attempt="a", part=0
    ).data)["sample_ids"].tolist() == [100, 101]


def test_header_gives_byte_ranges_of_one_tensor(tmp_path):
    store = open_store(tmp_path / "run")
    hooks, *index = make_part_arrays([6, 7])
    data = encode_part(hooks, *index, chunk=1, attempt="a", part=0).data
    store.write_bytes("part.safetensors", data)
    header = read_header(store.read_range("part.safetensors", 0, 64 * 1024))
    info = header.tensors[HOOKS[1]]
    assert info.shape == (13, 12) and info.dtype == "BF16"
    array = info.to_numpy(store.read_range("part.safetensors", info.start, info.stop))
    assert array.tobytes() == hooks[HOOKS[1]].tobytes()


def test_encode_part_rejects_inconsistent_shapes():
    hooks, token_ids, positions, offsets, sample_ids = make_part_arrays([3, 5])
    with pytest.raises(ValueError, match="sample_offsets"):
        encode_part(hooks, token_ids, positions, offsets[:-1], sample_ids, chunk=0, attempt="a", part=0)
    bad = {HOOKS[0]: hooks[HOOKS[0]][:-1]}
    with pytest.raises(ValueError, match=r"hook blocks.0.hook_resid_post shape \(7, 8\), expected \(8, width\)"):
        encode_part(bad, token_ids, positions, offsets, sample_ids, chunk=0, attempt="a", part=0)


def test_split_samples_never_splits_a_sample_and_respects_the_size():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 400, 50).tolist() + [3000]  # the last is larger than a shard
    per_token = token_bytes([8, 12], "bfloat16")
    shard_size = 128 * 1024
    ranges = split_samples(lengths, per_token, shard_size)
    assert [i for r in ranges for i in r] == list(range(len(lengths)))  # in order, each once
    assert len(ranges) > 1 and ranges[-1] == range(50, 51)
    for r in ranges:
        hooks, *index = make_part_arrays([lengths[i] for i in r])
        size = len(encode_part(hooks, *index, chunk=0, attempt="a", part=0).data)
        assert size <= shard_size or len(r) == 1
    assert split_samples([], per_token, shard_size) == [range(0, 0)]


def test_samples_jsonl_round_trip_and_bad_line():
    records = [{"sample_id": 1, "source_row": 7, "n_tokens": 12, "truncated": False}]
    assert decode_samples_jsonl(encode_samples_jsonl(records)) == records
    with pytest.raises(ValueError, match="samples.jsonl:2: bad JSON"):
        decode_samples_jsonl(b'{"a": 1}\n{oops\n')


def manifest(**changes):
    fields = dict(
        config={"model": "tiny", "data": {"seed": 0, "format": "arc"}, "hooks": list(HOOKS)},
        config_hash="abc",
        model_fingerprint="m1",
        tokenizer_fingerprint="t1",
        hooks=(HookSpec(HOOKS[0], 8, "bfloat16"), HookSpec(HOOKS[1], 12, "bfloat16")),
        plan=PlanSummary(num_samples=10, chunk_size=4, num_chunks=3, fingerprint="p1"),
    )
    fields.update(changes)
    return RunManifest(**fields)


def test_manifest_created_once_and_reopened(store_url):
    url, options = store_url
    store = open_store(url, **options)
    ours = manifest(created_at=1_000.0)
    assert open_or_create_manifest(store, ours) == ours
    created = store.read_bytes("run.json")
    # A rerun or a second worker, later and with an identical identity: it must read the
    # stored run.json back, never write its own over it (created_at is the first worker's).
    again = open_or_create_manifest(store, manifest(created_at=2_000.0))
    assert again.identity() == ours.identity()
    assert again.created_at == 1_000.0
    assert store.read_bytes("run.json") == created
    assert read_manifest(store).to_dict()["plan"]["num_chunks"] == 3


def test_manifest_mismatch_lists_the_differing_fields(tmp_path):
    store = open_store(tmp_path / "run")
    open_or_create_manifest(store, manifest())
    other = manifest(
        config={"model": "tiny", "data": {"seed": 1, "format": "arc"}, "hooks": list(HOOKS)},
        config_hash="def",
        model_fingerprint="m2",
    )
    before = store.read_bytes("run.json")
    with pytest.raises(ManifestMismatchError) as err:
        open_or_create_manifest(store, other)
    # One field per line (issue 25 item 7), stored -> given: the config's own fields, not the
    # hashes and fingerprints that follow from them.
    lines = str(err.value).splitlines()
    assert lines[0].endswith("holds a different run (1 field(s) differ, stored -> given):")
    assert lines[1:-1] == ["  config.data.seed: 0 (stored) -> 1 (given)"]
    assert err.value.diffs == (("config.data.seed", 0, 1),)
    assert store.read_bytes("run.json") == before  # nothing touched
    # Only derived fields differ (another checkpoint, the same config): those are listed.
    with pytest.raises(ManifestMismatchError) as err:
        open_or_create_manifest(store, manifest(model_fingerprint="m2"))
    assert str(err.value).splitlines()[1:-1] == ["  model_fingerprint: m1 (stored) -> m2 (given)"]


def test_manifest_refuses_another_format_version(tmp_path):
    store = open_store(tmp_path / "run")
    raw = manifest().to_dict() | {"format_version": 99}
    store.write_bytes("run.json", json.dumps(raw).encode())
    with pytest.raises(ValueError, match="format_version 99"):
        read_manifest(store)


def write_attempt(store, chunk, worker, seed):
    """What the engine does: parts and samples.jsonl under a fresh attempt, then commit."""
    attempt = layout.new_attempt_id(worker)
    hooks, *index = make_part_arrays([2, 3], seed=seed)
    encoded = encode_part(hooks, *index, chunk=chunk, attempt=attempt, part=0)
    path = layout.part_path(chunk, attempt, 0)
    store.write_bytes(path, encoded.data)
    store.write_bytes(layout.samples_path(chunk, attempt), encode_samples_jsonl([{"sample_id": 100}, {"sample_id": 101}]))
    return CommitRecord(
        chunk=chunk, attempt=attempt, parts=(PartRecord(path, len(encoded.data), encoded.sha256),),
        samples=encoded.samples, tokens=encoded.tokens, worker=worker, timings={"forward_s": 0.1},
        stats={"norm": 1.5},
    )


def test_commit_records(store_url):
    url, options = store_url
    store = open_store(url, **options)
    assert committed_chunks(store) == set() and not is_committed(store, 0)
    first = write_attempt(store, 0, "w0", seed=0)
    assert commit(store, first)
    late = write_attempt(store, 0, "w1", seed=1)  # a second worker finished the same chunk
    assert not commit(store, late)
    assert commit(store, write_attempt(store, 12, "w1", seed=2))
    assert committed_chunks(store) == {0, 12} and is_committed(store, 12)
    record = read_commit(store, 0)
    assert record == first and record.attempt != late.attempt
    assert set(read_commits(store)) == {0, 12}
    on_disk = json.loads(store.read_bytes(layout.commit_path(0)))
    assert {"chunk", "attempt", "parts", "samples", "tokens"} <= set(on_disk)
    assert on_disk["parts"][0]["path"].startswith("chunks/000000/")
    part = store.read_bytes(record.parts[0].path)
    assert len(part) == record.parts[0].bytes and decode_part(part).metadata["attempt"] == record.attempt


def test_heartbeat_is_throttled_and_readable(tmp_path):
    store = open_store(tmp_path / "run")
    beat = Heartbeat(store, "w-3", interval_s=3600, info={"num_workers": 4})
    beat.add(chunks_done=1, samples=5, tokens=700, bytes=1000)
    assert beat.beat()
    beat.add(chunks_done=1)
    assert not beat.beat()  # throttled
    assert beat.beat(state="stopped", force=True)
    stored = read_heartbeats(store)["w-3"]
    assert stored["chunks_done"] == 2 and stored["tokens"] == 700 and stored["state"] == "stopped"
    assert stored["num_workers"] == 4 and stored["tokens_per_s"] > 0


def test_layout_names():
    assert layout.commit_path(42) == "commits/000042.json"
    assert layout.claim_path(7) == "claims/000007.json"
    assert layout.part_path(3, "a-1", 2) == "chunks/000003/a-1/part-00002.safetensors"
    assert layout.chunk_of_record("commits/000042.json") == 42
    assert layout.chunk_of_record("commits/notes.txt") is None
    a, b = layout.new_attempt_id("w0"), layout.new_attempt_id("w0")
    assert a != b and "-w0-" in a
    with pytest.raises(ValueError, match="bad worker id"):
        layout.worker_path("../x")

def test_heartbeat_abandoned_is_the_last_word(tmp_path):
    """The pre-emption deadline writes `abandoned` from another thread just before the process
    exits; the main thread's late `stopped` beat must not overwrite it."""
    store = open_store(tmp_path / "run")
    beat = Heartbeat(store, "w-1", interval_s=0)
    assert beat.beat(state="abandoned", force=True)
    assert not beat.beat(state="stopped", force=True)
    assert read_heartbeats(store)["w-1"]["state"] == "abandoned"


def test_the_version_run_json_records_is_the_package_version():
    import tomllib
    from pathlib import Path

    from actex.version import __version__

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert __version__ == pyproject["project"]["version"]
