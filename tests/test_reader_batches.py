"""Run.iter_batches: every committed token exactly once per epoch, values equal to the parts."""

from __future__ import annotations

import numpy as np
import pytest
from reader_fixtures import HOOKS, CountingStore, write_run

from actex import open_run
from actex.reader.ranges import only_index_between, read_ranges, row_range, whole
from actex.reader.run import Run
from actex.store import integrity
from actex.store.folder import open_store
from actex.store.shards import TensorInfo

HOOK = "blocks.1.mlp.hook_post"
# chunk -> part -> sample lengths; chunk 2 is written but never committed.
LENGTHS = [[[5, 9, 1], [7]], [[12, 3, 3, 0, 8]], [[4, 4]], [[11], [2, 6], [10]]]


@pytest.fixture
def run_dir(tmp_path):
    return write_run(str(tmp_path / "run"), lengths=LENGTHS, uncommitted=(2,))


@pytest.fixture
def fine_crc_run(tmp_path, monkeypatch):
    """LENGTHS with a checksum block every 2 rows of the hook (96 bytes), so blocks of a few
    rows are whole checksum blocks, as 16 MiB blocks are of 1 MiB checksum blocks at scale."""
    monkeypatch.setattr(integrity, "CRC_BLOCK_BYTES", 2 * HOOKS[HOOK] * 2)
    return write_run(str(tmp_path / "run"), lengths=LENGTHS, uncommitted=(2,))


def keys_of(batches) -> np.ndarray:
    """(sample id, position) identifies a stored token."""
    return np.concatenate([np.stack([b.sample_ids, b.positions], 1) for b in batches])


def check_values(expected, batches, hook=HOOK) -> None:
    """Each yielded row equals the stored row of the same token, and each token comes once."""
    want = {(s, p): i for i, (s, p) in enumerate(zip(expected.sample_ids.tolist(), expected.positions.tolist()))}
    got = keys_of(batches)
    assert len(got) == len(want) and len({tuple(k) for k in got.tolist()}) == len(want)
    rows = np.array([want[tuple(k)] for k in got.tolist()])
    np.testing.assert_array_equal(np.concatenate([b.activations for b in batches]), expected.hooks[hook][rows])
    np.testing.assert_array_equal(np.concatenate([b.token_ids for b in batches]), expected.token_ids[rows])


def test_run_describes_committed_chunks(run_dir):
    run = open_run(run_dir.url)
    assert run.hooks == HOOKS and run.dtype == "bfloat16"
    assert run.chunks == [0, 1, 3] and run.num_chunks == 4
    assert run.num_tokens == len(run_dir.token_ids) == 77
    assert run.num_samples == 13
    assert [s["n_tokens"] for s in run.samples(1)] == [12, 3, 3, 0, 8]
    with pytest.raises(KeyError, match="chunk 2 is not committed"):
        run.samples(2)


def test_in_order_without_shuffle(run_dir):
    batches = list(open_run(run_dir.url).iter_batches(HOOK, 10, shuffle=False, block_bytes=100))
    assert [len(b) for b in batches] == [10] * 7 + [7]
    np.testing.assert_array_equal(np.concatenate([b.activations for b in batches]), run_dir.hooks[HOOK])
    np.testing.assert_array_equal(np.concatenate([b.sample_ids for b in batches]), run_dir.sample_ids)
    np.testing.assert_array_equal(np.concatenate([b.positions for b in batches]), run_dir.positions)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 3])
def test_every_token_once_across_ranks(run_dir, shuffle, world_size):
    run = open_run(run_dir.url)
    per_rank = [
        list(run.iter_batches(HOOK, 7, shuffle=shuffle, seed=3, rank=r, world_size=world_size,
                              block_bytes=5 * 24 * 2, shuffle_bytes=20 * 24 * 2, prefetch=2, threads=2))
        for r in range(world_size)
    ]
    for batches in per_rank:
        assert all(len(b) == 7 for b in batches[:-1]) and 0 < len(batches[-1]) <= 7
    check_values(run_dir, [b for batches in per_rank for b in batches])


def test_shuffle_is_seeded_and_mixes_chunks(run_dir):
    run = open_run(run_dir.url)

    def order(seed, epoch):
        batches = run.iter_batches(HOOK, 16, seed=seed, epoch=epoch, block_bytes=4 * 24 * 2, shuffle_bytes=40 * 24 * 2)
        return keys_of(list(batches))

    first = order(0, 0)
    np.testing.assert_array_equal(first, order(0, 0))
    assert not np.array_equal(first, order(0, 1)) and not np.array_equal(first, order(1, 0))
    chunk_of = dict(zip(run_dir.sample_ids.tolist(), run_dir.chunk_of_token.tolist()))
    assert len({chunk_of[s] for s in first[:16, 0].tolist()}) >= 2  # one batch spans chunks


def test_dtype_conversion_and_bad_arguments(run_dir):
    run = open_run(run_dir.url)
    batch = next(run.iter_batches(HOOK, 4, shuffle=False, dtype=np.float32))
    assert batch.activations.dtype == np.float32
    np.testing.assert_array_equal(batch.activations, run_dir.hooks[HOOK][:4].astype(np.float32))
    with pytest.raises(ValueError, match="no hook 'blocks.9.hook_resid_post'"):
        next(run.iter_batches("blocks.9.hook_resid_post", 4))
    with pytest.raises(ValueError, match="rank must be in"):
        next(run.iter_batches(HOOK, 4, rank=2, world_size=2))
    # An integer dtype would keep the values' integer part (mostly zeros): refused.
    for integer in ("int8", np.int32, "uint8"):
        with pytest.raises(ValueError, match="batches hold floating values"):
            next(run.iter_batches(HOOK, 4, dtype=integer))
    assert next(run.iter_batches(HOOK, 4, shuffle=False, dtype="bfloat16")).activations.dtype.name == "bfloat16"


def test_a_folder_without_run_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope: no run.json here \(not an actex run"):
        open_run(str(tmp_path / "nope"))


@pytest.mark.parametrize("crc", ["coarse", "fine"])
def test_reads_only_the_requested_hook(request, crc):
    """Every fetched byte lies in a header, the hook's tensor or the index tensors."""
    run_dir = request.getfixturevalue("run_dir" if crc == "coarse" else "fine_crc_run")
    store = CountingStore(open_store(run_dir.url))
    run = Run(store)
    batches = list(run.iter_batches(HOOK, 8, block_bytes=6 * 24 * 2, shuffle_bytes=30 * 24 * 2))
    check_values(run_dir, batches)
    hook_bytes = 0
    for part in run.parts():
        spec = run.header(part)
        header_end = min(t.start for t in spec.values())
        other = [spec[h] for h in HOOKS if h != HOOK]
        for path, start, stop in store.ranges:
            if path != part.path:
                continue
            assert stop <= header_end or start >= header_end
            for t in other:
                assert stop <= t.start or start >= t.stop, f"read [{start}, {stop}) overlaps {path}'s other hook"
            hook_bytes += max(0, min(stop, spec[HOOK].stop) - max(start, spec[HOOK].start))
    assert hook_bytes == run_dir.hooks[HOOK].nbytes  # each hook byte fetched exactly once


def test_gcs_emulator(gcs_emulator, gcs_bucket):
    expected = write_run(f"{gcs_bucket}/run", gcs_emulator.storage_options, lengths=LENGTHS, uncommitted=(2,))
    run = open_run(expected.url, **gcs_emulator.storage_options)
    check_values(expected, list(run.iter_batches(HOOK, 9, seed=1, block_bytes=6 * 24 * 2)))


def test_two_requests_per_block(fine_crc_run):
    """A block is one read of the hook's rows and one of its index rows (plus 1 header read per part)."""
    store = CountingStore(open_store(fine_crc_run.url))
    run = Run(store)
    block_tokens = 6
    check_values(fine_crc_run, list(run.iter_batches(HOOK, 8, block_bytes=block_tokens * 24 * 2)))
    blocks = sum(-(-run.num_part_tokens(p) // block_tokens) for p in run.parts() if run.num_part_tokens(p))
    assert len(store.ranges) == len(run.parts()) + 2 * blocks


def test_index_gap_never_spans_a_hook(tmp_path):
    """Index ranges are read as one span only when no hook tensor lies inside it."""
    spec = {
        "token_ids": TensorInfo("I32", (10,), 100, 140),
        "positions": TensorInfo("I32", (10,), 140, 180),
        "hook": TensorInfo("BF16", (10, 2), 180, 220),
        "sample_ids": TensorInfo("I64", (1,), 220, 228),
    }
    store = CountingStore(open_store(str(tmp_path)))
    store.write_bytes("f", bytes(range(256)))
    ranges = [row_range(spec["token_ids"], 2, 4), row_range(spec["positions"], 2, 4)]
    assert only_index_between(spec, ranges)
    assert not only_index_between(spec, [*ranges, whole(spec["sample_ids"])])
    got = read_ranges(store, "f", ranges, max_gap=1 << 20)
    assert [bytes(g) for g in got] == [bytes(range(108, 116)), bytes(range(148, 156))]
    assert store.ranges == [("f", 108, 156)]  # one request, gap included
    store.ranges.clear()
    read_ranges(store, "f", ranges)
    assert store.ranges == [("f", 108, 116), ("f", 148, 156)]  # max_gap=0: touching ranges only
