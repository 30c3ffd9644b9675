"""Generation options: --samples-per-prompt N (every prompt becomes N consecutive samples,
its `draw`s, each generating from its own sample id's PRNG stream; at 1 nothing about a
run changes), and sampling options that only act together."""

import json

import pytest
from data_fixtures import HAND_TASK, tokenizer, tokenizer_dir, write_jsonl  # noqa: F401
from engine_fixtures import jax_cache, tiny_model_dir  # noqa: F401

from actex.config import RunConfig
from actex.data import DataConfig, build_plan


def all_samples(plan):
    return [s for k in range(plan.num_chunks) for s in plan.samples(k)]


def test_text_rows_give_n_consecutive_draws_across_chunk_borders(tmp_path, tokenizer):  # noqa: F811
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(4)])
    plan = build_plan(DataConfig(dataset=str(path), format="text", samples_per_prompt=3), tokenizer, 2)
    samples = all_samples(plan)  # chunks of 2 split every row's 3 draws
    assert plan.num_samples == 12 and [s.sample_id for s in samples] == list(range(12))
    assert [(s.text, s.meta["draw"]) for s in samples] == [(f"row {i}", d) for i in range(4) for d in range(3)]


def test_arc_draws_follow_each_augmented_prediction(tmp_path, tokenizer):  # noqa: F811
    path = write_jsonl(tmp_path / "a.jsonl", [HAND_TASK])
    one = all_samples(build_plan(DataConfig(dataset=str(path), predictions_per_task=2), tokenizer, 8))
    two = all_samples(build_plan(DataConfig(dataset=str(path), predictions_per_task=2, samples_per_prompt=2),
                                 tokenizer, 8))
    assert len(two) == 2 * len(one)
    for i, sample in enumerate(two):
        prompt = one[i // 2]  # the same augmented prompt, twice
        assert sample.text == prompt.text and sample.meta["draw"] == i % 2
        assert {k: sample.meta[k] for k in ("test_index", "prediction")} == \
            {k: prompt.meta[k] for k in ("test_index", "prediction")}


def test_the_default_changes_no_hash_and_extraction_refuses_draws(tmp_path, tokenizer):  # noqa: F811
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    cfg = DataConfig(dataset=str(path), format="text")
    assert "samples_per_prompt" not in cfg.canonical()  # runs made before the field keep their hash
    drawn = cfg.model_copy(update={"samples_per_prompt": 2})
    assert build_plan(drawn, tokenizer, 8).fingerprint != build_plan(cfg, tokenizer, 8).fingerprint
    fields = {"model": "m", "output": str(tmp_path), "data": drawn.model_dump(), "hooks": ("hook_embed",),
              "compute_dtype": "float32"}
    with pytest.raises(ValueError, match="samples_per_prompt 2: samples of one prompt differ only when generated"):
        RunConfig.model_validate(fields)
    run = RunConfig.model_validate({**fields, "data": cfg.model_dump(), "generation": {}})
    assert "samples_per_prompt" not in run.canonical()["data"]


def test_generated_draws_of_one_prompt_differ(tmp_path, tiny_model_dir):  # noqa: F811
    from actex.engine.prepare import prepare_run
    from actex.engine.worker import extract
    from actex.engine.work import StaticChunks
    from actex.store.folder import open_store
    from actex.reader.run import Run

    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i} the quick brown fox"} for i in range(2)])
    fields = {"model": str(tiny_model_dir), "hooks": ["blocks.1.hook_resid_post"], "dtype": "float32",
              "output": str(tmp_path / "out"), "chunk_size": 4,
              "data": {"dataset": str(path), "format": "text", "max_seq_len": 64, "samples_per_prompt": 3},
              "generation": {"max_new_tokens": 12, "temperature": 1.0, "stop_tokens": []}}
    run = prepare_run(fields)
    extract(run, StaticChunks(run.plan.num_chunks), worker="w0")
    stored = Run(open_store(run.config.run_url))
    records = [s for c in range(stored.num_chunks) for s in stored.samples(c)]
    assert [s["draw"] for s in records] == [0, 1, 2] * 2
    for row in range(2):
        draws = records[3 * row: 3 * row + 3]
        assert len({s["n_prompt_tokens"] for s in draws}) == 1  # one prompt
        assert len({json.dumps(s["generated_text"]) for s in draws}) == 3  # three answers


@pytest.mark.parametrize("fields", [{"top_k": 20}, {"top_p": 0.9}])
def test_top_k_and_top_p_without_temperature_are_refused(fields):
    from actex.config import GenerationConfig

    with pytest.raises(ValueError, match="only act when sampling: set temperature above 0"):
        GenerationConfig.model_validate(fields)
    assert GenerationConfig.model_validate({**fields, "temperature": 0.7})
