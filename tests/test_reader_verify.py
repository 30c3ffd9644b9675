"""actex verify on a run built by the engine: passes as extracted, fails once a tensor is altered.

Also drives `actex export` / `actex gc` through the CLI on the same run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from actex import open_run
from actex.cli import app
from actex.reader.verify import TOLERANCE, forward_windows, verify
from actex.store import layout, shards
from actex.store.commits import PartRecord

HOOKS = ["hook_embed", "blocks.0.hook_resid_mid", "blocks.1.mlp.hook_post", "ln_final.hook_normalized",
         "ln_final.hook_out"]


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory) -> str:
    """A tiny random Qwen2 over five text rows, long ones split into 32-token windows."""
    from actex.data import build_tokenizer
    from actex.engine.worker import extract
    from actex.engine.prepare import prepare_run
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
    run = prepare_run(fields)
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
    run.store.write_bytes(layout.commit_path(part.chunk), record.model_copy(update={"parts": tuple(parts)}).to_json())


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


def stored_samples(url: str, hook: str) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """sample id -> (token_ids [n], positions [n], hook values [n, width]) read from the parts."""
    run = open_run(url)
    out = {}
    for part in run.parts():
        decoded = shards.decode_part(run.store.read_bytes(part.path))
        for i, sid in enumerate(decoded.sample_ids.tolist()):
            rows = decoded.sample(i)
            out[sid] = (decoded.token_ids[rows], decoded.positions[rows], decoded.hooks[hook][rows])
    return out


def expected_contexts(samples: dict, size: int) -> list[tuple[bytes, bytes]]:
    """(token ids, values) of every run of `size` tokens starting at a multiple of `size`
    within one forward window (positions restart at 0 in each window), sorted."""
    found = []
    for token_ids, positions, values in samples.values():
        for start in np.flatnonzero(positions % size == 0):
            stop = start + size
            if stop <= len(positions) and np.array_equal(positions[start:stop], positions[start] + np.arange(size)):
                found.append((token_ids[start:stop].astype(np.int32).tobytes(), values[start:stop].astype(np.float32).tobytes()))
    return sorted(found)


def test_cli_export_and_gc(engine_run, tmp_path):
    import gzip
    import pickle

    from datasets import Array2D, load_from_disk

    runner = CliRunner()
    result = runner.invoke(app, ["export", engine_run, str(tmp_path / "sae"), "--to", "saelens",
                                 "--hook", "hook_embed", "--context-size", "16"])
    assert result.exit_code == 0, result.output
    # The export holds exactly the stored 16-token contexts of hook_embed, values and ids,
    # under the name SAELens hooks it by in the transformers model (the embedding module).
    ds = load_from_disk(str(tmp_path / "sae"))
    width = open_run(engine_run).hooks["hook_embed"]
    assert ds.features["model.embed_tokens"] == Array2D(shape=(16, width), dtype="float32")
    ds.set_format("numpy")
    exported = sorted(
        (ids.astype(np.int32).tobytes(), acts.astype(np.float32).tobytes())
        for ids, acts in zip(ds[:]["token_ids"], ds[:]["model.embed_tokens"], strict=True)
    )
    expected = expected_contexts(stored_samples(engine_run, "hook_embed"), 16)
    assert len(expected) >= 5 and exported == expected

    hook = "blocks.0.hook_resid_mid"
    result = runner.invoke(app, ["export", engine_run, str(tmp_path / "legacy"), "--to", "legacy-pickle", "--hook", hook])
    assert result.exit_code == 0, result.output
    entries = []
    for path in sorted((tmp_path / "legacy").glob("shard_*.pkl.gz")):
        with gzip.open(path) as f:
            shard = pickle.load(f)
        assert set(shard) == {0}  # blocks.0.* -> legacy layer 0
        entries += shard[0]
    stored = stored_samples(engine_run, hook)
    assert sorted(e["sample_idx"] for e in entries) == sorted(stored)
    for entry in entries:
        values = stored[entry["sample_idx"]][2]
        assert entry["shape"] == values.shape
        np.testing.assert_array_equal(entry["activation"], values)
    result = runner.invoke(app, ["export", engine_run, str(tmp_path / "x"), "--to", "saelens", "--hook", "nope"])
    assert result.exit_code == 2 and "no hook 'nope'" in result.output
    # An output folder that holds something already is the user's to change: exit 2, not 1.
    for to, out in (("saelens", "sae"), ("legacy-pickle", "legacy")):
        result = runner.invoke(app, ["export", engine_run, str(tmp_path / out), "--to", to, "--hook", "hook_embed"])
        assert result.exit_code == 2 and f"{tmp_path / out}: " in result.output, result.output
    result = runner.invoke(app, ["gc", engine_run, "--dry-run"])
    assert result.exit_code == 0 and "would delete 0 orphaned attempt(s) and 0 stale temp file(s); kept 3 committed" \
        in result.output


def test_verify_fails_on_nan_in_stored_values(tmp_path, monkeypatch):
    # A NaN is the most common corruption of all (overflow, a bad kernel): it must fail
    # verify, not vanish in a max(). The reference is the clean stored data itself.
    import actex.reader.verify as verify_module
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


def _outlier_run(root, *, leak: bool, monkeypatch) -> str:
    """A run of a tiny model whose first token carries a Qwen-like massive activation.

    Every text row starts with the same word; that token's embedding row is scaled by 1e4,
    so position 0 of every sample holds values ~1e4 times the rest. With `leak`, extraction
    runs with an attention that ignores segment ids: in a packed row each sample also sees
    the samples before it, the kind of bug per-sample verification exists to catch.
    """
    from safetensors.numpy import load_file, save_file

    from actex.data import build_tokenizer
    from actex.engine.worker import extract
    from actex.engine.prepare import prepare_run
    from actex.engine.work import StaticChunks
    from actex.model import attention as kernels
    from actex.model.random_checkpoint import tiny_hf_config, write_random_checkpoint

    model = root / "model"
    if not model.exists():
        tokenizer = build_tokenizer(model, vocab_size=300)
        write_random_checkpoint(model, tiny_hf_config(vocab_size=len(tokenizer), hidden_size=32,
                                                      intermediate_size=48, num_hidden_layers=2), seed=0)
        first = tokenizer("Hello", add_special_tokens=False)["input_ids"][0]
        tensors = load_file(model / "model.safetensors")
        tensors["model.embed_tokens.weight"][first] *= 1e4
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
        rows = [{"text": "Hello " + "the quick brown fox jumps " * (i % 3 + 1) + f"row {i}"} for i in range(6)]
        (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if leak:
        # The engine's CPU kernel is attention.attention (make_attention's "blockwise").
        honest = kernels.attention
        monkeypatch.setattr(kernels, "attention", lambda q, k, v, seg, **features: honest(
            q, k, v, (seg > 0).astype(seg.dtype), **features))
    fields = {
        "model": str(model), "hooks": ["blocks.1.hook_resid_post"], "dtype": "float32", "chunk_size": 6,
        "output": str(root / "out"), "run_name": "leak" if leak else "clean",
        "data": {"dataset": str(root / "data.jsonl"), "format": "text", "max_seq_len": 256},
    }
    run = prepare_run(fields)
    extract(run, StaticChunks(run.plan.num_chunks), worker="w0")
    return run.config.run_url


def test_verify_catches_a_segment_leak_behind_a_first_token_outlier(tmp_path, monkeypatch):
    from actex.reader.verify import load_reference, reference_activations

    clean_url = _outlier_run(tmp_path, leak=False, monkeypatch=monkeypatch)
    leak_url = _outlier_run(tmp_path, leak=True, monkeypatch=monkeypatch)
    reference = load_reference(str(tmp_path / "model"))
    assert verify(open_run(clean_url), 6, reference=reference).ok

    run = open_run(leak_url)
    hook = "blocks.1.hook_resid_post"
    part = run.parts()[0]
    stored = run.read_part(part, hook)
    assert (stored.positions == 0).sum() == 6  # six samples...
    assert len(np.unique(stored.positions)) < len(stored.positions)  # ...packed, sharing rows
    # The old metric, max |delta| / max |reference| over all tokens, sees nothing: the
    # first tokens' outliers dwarf every leaked value.
    ids, offsets = run.read_index(part)
    ref = np.concatenate([reference_activations(reference, [hook], stored.token_ids[lo:hi],
                                                stored.positions[lo:hi])[hook]
                          for lo, hi in zip(offsets[:-1], offsets[1:])])
    assert np.abs(ref[stored.positions == 0]).max() > 1e3 * np.abs(ref[stored.positions > 0]).max()
    old_error = np.abs(stored.activations - ref).max() / np.abs(ref).max()
    assert old_error < TOLERANCE["float32"]

    report = verify(run, 6, reference=reference)
    (check,) = report.checks
    assert not check.ok and check.error > 0.1 and check.cosine < 0.99
    # The worst token is named: its sample, its index in the sample and its position there.
    assert check.worst_sample in ids.tolist() and check.worst_position > 0
    lo = int(offsets[ids.tolist().index(check.worst_sample)])
    assert stored.positions[lo + check.worst_index] == check.worst_position


def test_pick_samples_reads_the_indices_of_the_drawn_chunks_only(tmp_path):
    from reader_fixtures import write_run

    from actex import open_run
    from actex.reader.verify import pick_samples

    lengths = [[[5, 9], [7]], [[12, 0, 8]], [[30]], [[4]], [[6, 2]], [[0]]]  # chunk 5: no tokens
    run = open_run(write_run(str(tmp_path / "run"), lengths=lengths).url)
    indexed = []
    honest = run.read_index
    run.read_index = lambda part: indexed.append(part.chunk) or honest(part)
    two = pick_samples(run, 2, seed=3)
    assert len(two) == 2 and len({p.chunk for p, *_ in two}) == 2
    assert len(set(indexed)) <= 3  # the two drawn chunks, and chunk 5 if drawn first
    everything = pick_samples(run, 100, seed=3)  # more than there are: every sample with tokens, once
    assert sorted((p.chunk, sid) for p, sid, *_ in everything) == sorted(
        (p.chunk, sid) for p in run.parts() for sid, lo, hi in zip(honest(p)[0].tolist(), honest(p)[1][:-1].tolist(), honest(p)[1][1:].tolist()) if hi > lo)
    assert len(everything) == 9


def test_verify_refuses_a_negative_tolerance(tmp_path):
    # Every hook would fail it (exit 1, as for a bad model): the user's mistake is exit 2.
    result = CliRunner().invoke(app, ["verify", str(tmp_path), "--tolerance", "-1"])
    assert result.exit_code == 2 and "--tolerance" in result.output


def test_verify_cli_words_the_int8_error_as_its_own_figure(tmp_path):
    """The int8 figure (stats: every token of the chunks read vs float32) and the error vs
    transformers (the sampled tokens) are separate worst cases: the first can exceed the
    second, so the line must not read it as a part of it ("of which int8")."""
    import subprocess
    import sys
    from pathlib import Path

    from actex.data import build_tokenizer
    from actex.engine.prepare import prepare_run
    from actex.engine.work import StaticChunks
    from actex.engine.worker import extract
    from actex.model.random_checkpoint import tiny_hf_config, write_random_checkpoint

    model = tmp_path / "model"
    tokenizer = build_tokenizer(model, vocab_size=300)
    write_random_checkpoint(model, tiny_hf_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                                  num_hidden_layers=2), seed=0)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": f"row {i} jumps"}) + "\n" for i in range(3)))
    run = prepare_run({"model": str(model), "hooks": ["blocks.0.hook_resid_mid"], "dtype": "int8",
                       "output": str(tmp_path / "out"), "chunk_size": 4,
                       "data": {"dataset": str(tmp_path / "data.jsonl"), "format": "text", "max_seq_len": 32}})
    extract(run, StaticChunks(run.plan.num_chunks), worker="w0")
    actex = str(Path(sys.executable).parent / "actex")
    result = subprocess.run([actex, "verify", run.config.run_url, "--samples", "2"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if "blocks.0.hook_resid_mid" in line)
    assert "of which" not in line
    assert "error vs reference " in line and " (int8 rounding alone " in line, line
