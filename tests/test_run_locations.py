"""A local --model is recorded at its absolute location: run.json names the checkpoint from
any directory (verify, resume, other workers), and every spelling of it is one run."""

import json
import os

from engine_fixtures import TEXT_ROWS, jax_cache, tiny_model_dir, write_jsonl  # noqa: F401

from actex.config import with_model_location


def test_a_relative_model_directory_is_recorded_absolute_and_one_run(tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    from actex.engine.prepare import prepare_run

    dataset = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXT_ROWS[:2]])
    monkeypatch.chdir(tiny_model_dir.parent)
    fields = {"hooks": ["blocks.0.hook_resid_post"], "output": str(tmp_path / "out"),
              "data": {"dataset": str(dataset), "format": "text", "max_seq_len": 64}}
    relative = prepare_run({**fields, "model": tiny_model_dir.name})
    assert relative.config.model == os.path.realpath(tiny_model_dir)
    manifest = json.loads((tmp_path / "out" / relative.config.name / "run.json").read_text())
    assert manifest["config"]["model"] == os.path.realpath(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    again = prepare_run({**fields, "model": f"{tiny_model_dir}/"})  # another spelling, another directory
    assert again.config.run_url == relative.config.run_url


def test_hub_ids_and_bucket_urls_are_kept_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for model in ("Qwen/Qwen2.5-0.5B", "gs://bucket/models/qwen", "missing-local-dir"):
        assert with_model_location({"model": model}) == {"model": model}
