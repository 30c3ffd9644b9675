"""actex verify on a run built by the engine: passes as extracted, fails once a tensor is altered.

Also drives `actex export` / `actex gc` through the CLI on the same run.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from actex import open_run
from actex.cli import app
from actex.store import layout, shards
from actex.store.commits import PartRecord
from actex.verify import forward_windows, verify

HOOKS = ["hook_embed", "blocks.0.hook_resid_mid", "blocks.1.mlp.hook_post", "ln_final.hook_normalized"]


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory) -> str:
    """A tiny random Qwen2 over five text rows, long ones split into 32-token windows."""
    from actex.data import build_tokenizer
    from actex.engine.extract import extract
    from actex.engine.extract import open_run as open_for_extraction
    from actex.engine.work import StaticChunks
    from actex.model.random_checkpoint import tiny_hf_config, write_random_checkpoint

    root = tmp_path_factory.mktemp("verify")
    model = root / "model"
    tokenizer = build_tokenizer(model, vocab_size=300)
    write_random_checkpoint(model, tiny_hf_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                                  num_hidden_layers=2), seed=0)
    rows = [{"text": f"row {i} " + "the quick brown fox jumps " * (i + 1)} for i in range(5)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = {
        "model": str(model), "hooks": HOOKS, "dtype": "float32", "output": str(root / "out"), "chunk_size": 2,
        "data": {"dataset": str(root / "data.jsonl"), "format": "text", "max_seq_len": 32, "long_policy": "split"},
    }
    run = open_for_extraction(fields)
    extract(run, StaticChunks(run.plan.num_chunks), worker="w0")
    return run.config.run_url


def rewrite_part(run, part, encoded) -> None:
    """Replace a part AND its commit record's checksums: wrong values written by a faulty
    model or kernel, not corruption in storage, so only the numeric comparison can tell."""
    run.store.write_bytes(part.path, encoded.data)
    record = run.record(part.chunk)
    parts = list(record.parts)
    parts[part.index] = PartRecord(part.path, len(encoded.data), encoded.sha256, encoded.header_bytes,
                                   encoded.header_crc32c)
    run.store.write_bytes(layout.commit_path(part.chunk), dataclasses.replace(record, parts=tuple(parts)).to_json())


def test_forward_windows():
    assert forward_windows(np.array([0, 1, 2, 0, 1, 0])) == [(0, 3), (3, 5), (5, 6)]


def test_verify_passes_then_fails_on_altered_tensor(engine_run):
    run = open_run(engine_run)
    report = verify(run, 100)
    assert report.ok and len(report.sample_ids) == run.num_samples == 5
    assert all(c.error < 1e-5 for c in report.checks)
    assert any(len(forward_windows(run.read_part(p, HOOKS[0]).positions)) > 1 for p in run.parts())
    assert CliRunner().invoke(app, ["verify", engine_run, "--samples", "2"]).exit_code == 0

    # Alter one value of one hook in every part, in place (same path, as corruption would).
    for part in run.parts():
        data = run.store.read_bytes(part.path)
        decoded = shards.decode_part(data)
        hooks = {h: a.copy() for h, a in decoded.hooks.items()}
        mlp = hooks["blocks.1.mlp.hook_post"]
        mlp[len(mlp) // 2, 3] += 0.05 * np.abs(mlp).max()
        encoded = shards.encode_part(hooks, decoded.token_ids, decoded.positions, decoded.sample_offsets,
                                     decoded.sample_ids, chunk=part.chunk, attempt="x", part=part.index)
        rewrite_part(run, part, encoded)
    altered = verify(open_run(engine_run), 100)
    failed = [c.hook for c in altered.checks if not c.ok]
    assert failed == ["blocks.1.mlp.hook_post"]
    result = CliRunner().invoke(app, ["verify", engine_run, "--samples", "100"])
    assert result.exit_code == 1 and "FAIL  blocks.1.mlp.hook_post" in result.output


def test_cli_export_and_gc(engine_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export", engine_run, str(tmp_path / "sae"), "--to", "saelens",
                                 "--hook", "hook_embed", "--context-size", "16"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sae" / "dataset_info.json").exists()
    result = runner.invoke(app, ["export", engine_run, str(tmp_path / "legacy"), "--to", "legacy-pickle",
                                 "--hook", "blocks.0.hook_resid_mid"])
    assert result.exit_code == 0 and (tmp_path / "legacy" / "shard_0000.pkl.gz").exists()
    result = runner.invoke(app, ["export", engine_run, str(tmp_path / "x"), "--to", "saelens", "--hook", "nope"])
    assert result.exit_code == 2 and "no hook 'nope'" in result.output
    result = runner.invoke(app, ["gc", engine_run, "--dry-run"])
    assert result.exit_code == 0 and "would delete 0 orphaned attempt(s) and 0 stale temp file(s); kept 3 committed" \
        in result.output


def test_verify_fails_on_nan_in_stored_values(tmp_path, monkeypatch):
    # A NaN is the most common corruption of all (overflow, a bad kernel): it must fail
    # verify, not vanish in a max(). The reference is the clean stored data itself.
    import actex.verify as verify_module
    from reader_fixtures import stored_reference, write_run

    expected = write_run(str(tmp_path / "run"), lengths=[[[5, 7]], [[6]]], dtype="float32")
    monkeypatch.setattr(verify_module, "reference_activations", stored_reference(expected))
    run = open_run(expected.url)
    assert verify(run, 10, reference=object()).ok

    part = run.parts()[0]
    decoded = shards.decode_part(run.store.read_bytes(part.path))
    hooks = {h: a.copy() for h, a in decoded.hooks.items()}
    hooks["blocks.0.hook_resid_post"][-1, 2] = np.nan  # last token: compared after clean ones
    encoded = shards.encode_part(hooks, decoded.token_ids, decoded.positions, decoded.sample_offsets,
                                 decoded.sample_ids, chunk=part.chunk, attempt="x", part=part.index)
    rewrite_part(run, part, encoded)
    checks = {c.hook: c for c in verify(open_run(expected.url), 10, reference=object()).checks}
    assert not checks["blocks.0.hook_resid_post"].ok
    assert checks["blocks.1.mlp.hook_post"].ok
