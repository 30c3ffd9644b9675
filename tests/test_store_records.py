"""Store records as models: the bytes on disk are those actex wrote before (tests/golden/,
written by the dataclass code these models replaced), and records are bounded untrusted input."""

from pathlib import Path

import pytest

from actex.store import layout, open_store
from actex.store import commits as commits_module
from actex.store.claims import Lease, read_lease
from actex.store.commits import CommitRecord, Heartbeat, HeartbeatRecord, PartRecord, parse_heartbeat, read_commits
from actex.model.checksums import file_checksum, weight_checksums
from actex.store.manifest import (CheckpointMismatchError, HookSpec, PlanSummary, RunManifest, check_weights,
                                  open_or_create_manifest, read_manifest)
from actex.store.records import MAX_COMMIT_BYTES, MAX_CONTROL_BYTES, MAX_MANIFEST_BYTES, differing_fields

GOLDEN = Path(__file__).parent / "golden"
ATTEMPT = "20250101T120000Z-w3-9f2c1a0b"


def golden_manifest() -> RunManifest:
    return RunManifest(
        config={"model": "/models/tiny", "revision": None, "chunk_size": 4, "dtype": "bfloat16",
                "data": {"dataset": "/d/text.jsonl", "format": "text", "seed": 0, "limit": None},
                "hooks": ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"], "output": "/out", "run_name": "r1"},
        config_hash="a" * 64, model_fingerprint="b" * 64, tokenizer_fingerprint="c" * 64,
        hooks=(HookSpec("blocks.0.hook_resid_post", 64, "bfloat16"), HookSpec("blocks.1.mlp.hook_post", 256, "bfloat16")),
        plan=PlanSummary(num_samples=10, chunk_size=4, num_chunks=3, fingerprint="d" * 64),
        kind="extract", created_at=1735732800.123456, actex_version="0.1.0",
        skipped_rows={"row N has N cells": 2},
        skipped_row_list=({"source": "/d/text.jsonl", "row": 3, "index": 3, "reason": "row 3 has 2 cells"},),
    )


def golden_commit_v2() -> CommitRecord:
    at = f"chunks/000042/{ATTEMPT}"
    return CommitRecord(
        chunk=42, attempt=ATTEMPT,
        parts=(PartRecord(f"{at}/part-00000.safetensors", 123456, "e" * 64, 2504, "93d37d6b"),
               PartRecord(f"{at}/part-00001.safetensors", 2345, "f" * 64, 2504, "0badf00d")),
        samples=64, tokens=581234, worker="w3", timings={"chunk_s": 12.5},
        stats_path=f"{at}/stats.safetensors", stats_crc32c="0c1d2e3f",
        committed_at=1735732800.5, token_slots=589824, overflow={"blocks.0.hook_resid_post": 3})


def golden_commit_v1() -> CommitRecord:
    attempt = "20240101T000000Z-w0-00000000"
    return CommitRecord(
        chunk=7, attempt=attempt, parts=(PartRecord(f"chunks/000007/{attempt}/part-00000.safetensors", 999, "1" * 64),),
        samples=3, tokens=30, worker="w0", timings={"forward_s": 0.1},
        stats={"blocks.0.hook_resid_post": {"count": 30, "mean": [0.5]}}, committed_at=1704067200.0, format_version=1)


def golden_heartbeat_bytes(tmp_path, monkeypatch) -> bytes:
    """What Heartbeat.beat writes, with the host, pid and clock of the golden file."""
    monkeypatch.setattr(commits_module.socket, "gethostname", lambda: "vm-3")
    monkeypatch.setattr(commits_module.os, "getpid", lambda: 77)
    store = open_store(tmp_path / "hb")
    beat = Heartbeat(store, "w-3", interval_s=0, info={"run": "r1"})
    beat.started_at = 1735732800.0
    beat.add(chunks_done=2, batches=5, samples=64, tokens=700, bytes=1000, token_slots=800)
    monkeypatch.setattr(commits_module.time, "time", lambda: 1735732810.0)
    assert beat.beat(force=True)
    return store.read_bytes(layout.worker_path("w-3"))


@pytest.mark.parametrize("name, parse", [
    ("run.json", lambda data: RunManifest.from_json(data).to_json()),
    ("commit-v2.json", lambda data: CommitRecord.from_json(data, "here").to_json()),
    ("commit-v1.json", lambda data: CommitRecord.from_json(data, "here").to_json()),
    ("claim.json", lambda data: Lease.from_json(data, None, "here").to_json()),
    ("heartbeat.json", lambda data: commits_module.record_bytes(parse_heartbeat(data, "here")) + b"\n"),
])
def test_records_written_before_parse_and_write_back_to_the_same_bytes(name, parse):
    data = (GOLDEN / name).read_bytes()
    assert parse(data) == data


def test_new_writes_equal_the_golden_bytes(tmp_path, monkeypatch):
    assert golden_manifest().to_json() == (GOLDEN / "run.json").read_bytes()
    assert golden_commit_v2().to_json() == (GOLDEN / "commit-v2.json").read_bytes()
    assert golden_commit_v1().to_json() == (GOLDEN / "commit-v1.json").read_bytes()
    assert Lease(5, "vm-3-pid-77", 1735732860.25, 2).to_json() == (GOLDEN / "claim.json").read_bytes()
    assert golden_heartbeat_bytes(tmp_path, monkeypatch) == (GOLDEN / "heartbeat.json").read_bytes()


def test_records_are_frozen_and_read_back_equal():
    record = golden_commit_v2()
    with pytest.raises(ValueError):
        record.chunk = 1  # type: ignore[misc]
    assert CommitRecord.from_json(record.to_json(), "here") == record
    assert RunManifest.from_json(golden_manifest().to_json()) == golden_manifest()


def test_a_commit_record_without_format_version_is_v1():
    data = b'{"chunk": 1, "attempt": "a", "parts": [], "samples": 0, "tokens": 0}'
    assert CommitRecord.from_json(data, "here").format_version == 1
    assert CommitRecord(1, "a", (), 0, 0).format_version == layout.FORMAT_VERSION


def test_a_claim_never_takes_its_version_from_the_stored_bytes():
    data = b'{"attempt": 1, "chunk": 0, "expiry": 5.0, "owner": "x", "version": "forged"}'
    assert Lease.from_json(data, 17, "here").version == 17


@pytest.mark.parametrize("path, cap, read", [
    (layout.MANIFEST, MAX_MANIFEST_BYTES, read_manifest),
    (layout.commit_path(0), MAX_COMMIT_BYTES, lambda store: read_commits(store, [0])),
])
def test_an_oversized_record_is_refused_before_parsing_naming_it(tmp_path, path, cap, read):
    store = open_store(tmp_path / "run")
    store.write_bytes(path, b" " * (cap + 1))
    with pytest.raises(ValueError, match=rf"{path}: {cap + 1:,} bytes, over the {cap:,} of a "):
        read(store)


@pytest.mark.parametrize("data, reason", [
    (b"{not json", "not JSON"),
    (b'{"format_version": 2, "config": {}}', "not a run manifest (config_hash: Field required"),
    (b'{"format_version": 2, "config": [], "config_hash": "h"}', "not a run manifest (config:"),
])
def test_a_malformed_run_json_is_one_line_naming_it(tmp_path, data, reason):
    store = open_store(tmp_path / "run")
    store.write_bytes(layout.MANIFEST, data)
    with pytest.raises(ValueError) as error:
        read_manifest(store)
    assert str(error.value).startswith(f"{store.url_of(layout.MANIFEST)}: {reason}")
    assert "\n" not in str(error.value)


def test_malformed_commit_records_claims_and_heartbeats_name_the_object(tmp_path, caplog):
    store = open_store(tmp_path / "run")
    store.write_bytes(layout.commit_path(3), b'{"chunk": 3, "attempt": "a", "parts": "p", "samples": 1, "tokens": 1}')
    with pytest.raises(ValueError, match=r"commits/000003.json: not a commit record \(parts: "):
        read_commits(store, [3])
    store.write_bytes(layout.claim_path(4), b'{"chunk": 4, "owner": "x", "expiry": "soon", "attempt": 1}')
    assert read_lease(store, 4).expiry == 0.0  # read as expired, so another worker takes it over
    assert "claims/000004.json: not a claim record (expiry: " in caplog.text
    with pytest.raises(ValueError, match=f"here: {MAX_CONTROL_BYTES + 1:,} bytes"):
        parse_heartbeat(b" " * (MAX_CONTROL_BYTES + 1), "here")
    with pytest.raises(ValueError, match="here: tokens, bytes not a number"):
        parse_heartbeat(b'{"tokens": true, "bytes": "1"}', "here")
    assert HeartbeatRecord.model_validate_json(b'{"state": "running", "run": "r"}').to_dict() == {"state": "running", "run": "r"}


def test_differing_fields_walks_objects_by_key_and_equal_lists_by_index():
    ours = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "e": [1]}
    theirs = {"a": 1, "b": {"c": [1, 3]}, "e": [1, 2]}
    assert differing_fields(ours, theirs) == [("b.c.1", 2, 3), ("b.d", "x", None), ("e", [1], [1, 2])]
    assert differing_fields(ours, ours) == []


def test_weights_are_checked_apart_from_the_identity_and_only_when_recorded(tmp_path):
    store = open_store(tmp_path / "run")
    stored = golden_manifest().model_copy(update={"weights": {"a.safetensors": "crc32c:00000001"}})
    open_or_create_manifest(store, stored)
    assert open_or_create_manifest(store, stored.model_copy(update={"created_at": 1.0})) == stored
    with pytest.raises(CheckpointMismatchError) as error:
        open_or_create_manifest(store, stored.model_copy(update={"weights": {"a.safetensors": "crc32c:00000002"}}))
    assert str(error.value).startswith("a.safetensors: this checkpoint's file is crc32c:00000002, but ")
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointMismatchError, match="b.safetensors: this checkpoint's file is missing"):
        check_weights("run.json", {"a.safetensors": "x"}, {"a.safetensors": "x", "b.safetensors": "y"})
    check_weights("run.json", {"a.safetensors": "x"}, {})  # a run.json from before the checksums


def test_file_checksum_is_the_crc32c_of_the_bytes(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"123456789")
    assert file_checksum(path) == "crc32c:e3069283"  # the CRC-32C check value
    assert weight_checksums([path]) == {"w.safetensors": "crc32c:e3069283"}


def test_status_skips_an_oversized_or_garbage_commit_record_naming_it(tmp_path, caplog):
    from typer.testing import CliRunner

    from actex.cli import app

    store = open_store(tmp_path / "run")
    store.create_exclusive(layout.MANIFEST, golden_manifest().to_json())
    good = golden_commit_v2().model_copy(update={"chunk": 0})
    store.create_exclusive(layout.commit_path(0), good.to_json())
    store.create_exclusive(layout.commit_path(1), b" " * (MAX_COMMIT_BYTES + 1))
    store.create_exclusive(layout.commit_path(2), b'{"chunk": "two"}')
    with pytest.raises(ValueError, match="commits/000001.json: 16,777,217 bytes"):
        read_commits(store)
    assert list(read_commits(store, skip_bad=True)) == [0]
    result = CliRunner().invoke(app, ["status", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "commits/000001.json: 16,777,217 bytes, over the 16,777,216 of a commit record: skipped" in caplog.text
    assert "commits/000002.json: not a commit record (chunk: " in caplog.text
