"""A chunk whose writes fail for good is never committed; the worker exits or goes on by policy."""

from __future__ import annotations

import logging

import pytest
from engine_fixtures import committed_tensors, jax_cache, run_fields, text_dataset, tiny_model_dir  # noqa: F401

from actex.engine.prepare import prepare_run
from actex.engine.worker import extract
from actex.engine.work import StaticChunks
from actex.store import layout
from actex.store.commits import committed_chunks
from actex.store import Store, StoreError


@pytest.fixture
def broken_chunk_1(monkeypatch):
    """Every write under chunk 1's attempts fails as if retries were exhausted."""
    prefix = f"{layout.CHUNKS_DIR}/{layout.chunk_name(1)}/"
    write = Store.write_bytes

    def failing(self, rel, data):
        if rel.startswith(prefix):
            raise StoreError(f"write {self.url_of(rel)} failed after 6 attempts: 503 Service Unavailable")
        return write(self, rel, data)

    monkeypatch.setattr(Store, "write_bytes", failing)


@pytest.mark.parametrize("policy", ["exit", "continue"])
def test_write_failure_policy(policy, broken_chunk_1, tiny_model_dir, text_dataset, tmp_path, caplog, monkeypatch):  # noqa: F811
    run = prepare_run(run_fields(tiny_model_dir, text_dataset, str(tmp_path)))
    assert run.plan.num_chunks >= 3
    source = StaticChunks(run.plan.num_chunks)
    if policy == "exit":
        with pytest.raises(StoreError, match="chunks/000001/.*503"):
            extract(run, source, worker="w0", on_write_failure=policy)
        assert 1 not in committed_chunks(run.store)
        return
    with caplog.at_level(logging.ERROR, logger="actex"):
        summary = extract(run, source, worker="w0", on_write_failure=policy)
    assert summary.failed == 1 and summary.committed == run.plan.num_chunks - 1
    assert committed_chunks(run.store) == set(range(run.plan.num_chunks)) - {1}
    assert any("chunk 1 not committed" in r.message and "chunks/000001/" in r.message for r in caplog.records)
    # Every other chunk is whole and right: the same tensors as a clean run, less chunk 1's samples.
    monkeypatch.undo()  # the store works again
    clean = prepare_run(run_fields(tiny_model_dir, text_dataset, str(tmp_path / "clean")))
    extract(clean, StaticChunks(clean.plan.num_chunks), worker="w0")
    expected = committed_tensors(clean.config.run_url)
    failed = range(*run.plan.chunk_range(1))
    assert len(failed) > 0 and set(failed) <= set(expected)
    assert committed_tensors(run.config.run_url) == {sid: t for sid, t in expected.items() if sid not in failed}


def test_cli_exit_code_after_write_failures_lets_the_fleet_restart(broken_chunk_1, tiny_model_dir, text_dataset, tmp_path):  # noqa: F811
    """`actex fleet` never restarts a worker that exited 2 (bad flags, config mismatch): a
    store that kept failing is no such thing, so the worker must exit 1 with one line."""
    from typer.testing import CliRunner

    from actex.cli import app

    args = [
        "extract", "--model", str(tiny_model_dir), "--dataset", str(text_dataset), "--format", "text",
        "--output", str(tmp_path), "--run-name", "r", "--layers", "0", "--max-seq-len", "64",
        "--long-policy", "split", "--chunk-size", "3", "--no-progress",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("actex: error: ") and "chunks/000001/" in lines[0], result.stderr
    assert not (tmp_path / "r" / layout.commit_path(1)).exists()
