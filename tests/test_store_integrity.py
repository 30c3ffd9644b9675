"""Integrity (issue 11): every byte a reader returns is checked; bad parts are one line naming them.

Also: v1 runs stay readable, the reader opens lazily, failed writes leave no temp file, gc
removes stale ones, and only stores with a proven conditional create are accepted.
"""

from __future__ import annotations

import errno
import os
import struct
import threading

import numpy as np
import pytest
from reader_fixtures import HOOKS, stored_reference, write_run
from typer.testing import CliRunner

import actex.reader.verify as verify_module
from actex import open_run
from actex.cli import app
from actex.reader.run import Run
from actex.store import Store, StoreError, layout, open_store
from actex.store.backends import TEMP_PREFIX, local, s3
from actex.store.gc import collect_garbage
from actex.store.integrity import CorruptPartError

HOOK, OTHER = "blocks.1.mlp.hook_post", "blocks.0.hook_resid_post"
LENGTHS = [[[5, 9], [7]], [[12, 3]], [[4, 4]]]


def first_part(url: str):
    run = open_run(url)
    part = run.parts([0])[0]
    return run, part, os.path.join(url, part.path)


def flip_byte_of(path: str, offset: int) -> None:
    """Same size, one bit different: what a bad disk or a bad copy does."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def corrupt_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip().startswith("FAIL")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_same_size_corruption_is_named_by_reader_and_verify(tmp_path, monkeypatch):
    expected = write_run(str(tmp_path / "run"), lengths=LENGTHS, dtype="float32")
    run, part, path = first_part(expected.url)
    spec = run.header(part)
    flip_byte_of(path, spec[HOOK].start + 7 * spec[HOOK].row_bytes + 3)  # a value of row 7 of HOOK

    with pytest.raises(CorruptPartError) as err:
        list(open_run(expected.url).iter_batches(HOOK, 8, shuffle=False))
    message = str(err.value)
    assert "\n" not in message and part.path in message and f"tensor {HOOK}" in message
    assert "crc32c expected" in message and "actual" in message
    # The check is per tensor: the other hook of the same part reads back intact.
    other = np.concatenate([b.activations for b in open_run(expected.url).iter_batches(OTHER, 8, shuffle=False)])
    np.testing.assert_array_equal(other, expected.hooks[OTHER])

    result = CliRunner().invoke(app, ["verify", expected.url, "--integrity-only"])
    assert result.exit_code == 1
    line = corrupt_line(result)
    assert part.path in line and f"tensor {HOOK}" in line and "expected" in line

    # verify proper: the corrupt part is reported and its samples are not compared.
    monkeypatch.setattr(verify_module, "reference_activations", stored_reference(expected))
    report = verify_module.verify(open_run(expected.url), 100, reference=object())
    assert not report.ok and len(report.corrupt) == 1 and f"tensor {HOOK}" in report.corrupt[0]
    assert all(c.ok for c in report.checks) and 0 < len(report.sample_ids) < len(np.unique(expected.sample_ids))


@pytest.mark.parametrize("version", [1, 2])
def test_absurd_header_length_is_one_line(tmp_path, version):
    expected = write_run(str(tmp_path / "run"), lengths=LENGTHS, format_version=version)
    _, part, path = first_part(expected.url)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 2**60))  # same size; the length field now claims an exabyte

    with pytest.raises(CorruptPartError) as err:
        list(open_run(expected.url).iter_batches(HOOK, 8, shuffle=False))
    message = str(err.value)
    assert "\n" not in message and part.path in message
    # v2 trusts no header its commit record's CRC does not match; v1 sees the length is impossible.
    assert ("header crc32c expected" if version == 2 else "header length 1152921504606846976 is impossible") in message
    result = CliRunner().invoke(app, ["verify", expected.url, "--integrity-only"])
    assert result.exit_code == 1 and part.path in corrupt_line(result)


@pytest.mark.parametrize("version", [1, 2])
def test_truncated_part_is_one_line(tmp_path, version):
    expected = write_run(str(tmp_path / "run"), lengths=LENGTHS, format_version=version)
    _, part, path = first_part(expected.url)
    os.truncate(path, part.bytes - 40)

    with pytest.raises(CorruptPartError) as err:
        list(open_run(expected.url).iter_batches(HOOK, 8, shuffle=False))
    message = str(err.value)
    assert "\n" not in message and part.path in message and "truncated" in message
    result = CliRunner().invoke(app, ["verify", expected.url, "--integrity-only"])
    assert result.exit_code == 1 and "truncated" in corrupt_line(result)


def test_v1_runs_stay_readable(tmp_path):
    expected = write_run(str(tmp_path / "run"), lengths=LENGTHS, format_version=1)
    run = open_run(expected.url)
    assert run.manifest.format_version == 1 and run.record(0).format_version == 1
    assert run.record(0).parts[0].header_bytes is None and run.record(0).stats  # what v1 wrote
    batches = list(run.iter_batches(HOOK, 5, shuffle=False))
    np.testing.assert_array_equal(np.concatenate([b.activations for b in batches]), expected.hooks[HOOK])
    values = expected.hooks[HOOK].astype(np.float64)
    np.testing.assert_allclose(run.stats(HOOK).mean, values.mean(0), rtol=1e-6, atol=1e-6)
    result = CliRunner().invoke(app, ["verify", expected.url, "--integrity-only"])
    assert result.exit_code == 0 and "4 part(s)" in result.output and "0 corrupt" in result.output


def test_a_range_past_the_end_is_a_short_read_on_every_backend(store_url):
    """So a truncated part reads as truncated (one line), not as a backend's HTTP 416."""
    url, options = store_url
    store = open_store(url, **options)
    store.write_bytes("part", bytes(range(100)))
    assert store.read_range("part", 90, 150) == bytes(range(90, 100))
    assert store.read_range("part", 120, 150) == b""


class RecordCounter(Store):
    """Counts the commit records a reader fetches."""

    def __init__(self, inner: Store):
        super().__init__(inner.fs, inner.root, inner.url, inner.retry)
        self.records = 0
        self._lock = threading.Lock()

    def read_many(self, rels):
        with self._lock:
            self.records += sum(rel.startswith(layout.COMMITS_DIR) for rel in rels)
        return super().read_many(rels)


def test_open_and_first_batch_read_few_records(tmp_path):
    """Opening lists commits/ once; the first batch needs the records of the first chunks only
    (with shuffle: those that fill the shuffle buffer, here 8 rows)."""
    expected = write_run(str(tmp_path / "run"), lengths=[[[3, 2]]] * 40)
    store = RecordCounter(open_store(expected.url))
    run = Run(store)
    assert len(run.chunks) == 40 and store.records == 0
    next(run.iter_batches(HOOK, 4, prefetch=2, threads=2, shuffle_bytes=8 * HOOKS[HOOK] * 2))
    # 2 chunks fill the buffer; records, headers and blocks each run at most prefetch + 1 ahead.
    assert store.records <= 2 + 3 * 3, store.records
    assert run.num_tokens == len(expected.token_ids) and store.records == 40  # each record read once


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("op", ["write_bytes", "create_exclusive"])
def test_failed_write_removes_its_temp_file_and_names_the_path(tmp_path, monkeypatch, op):
    store = open_store(tmp_path / "run")
    store.write_bytes("chunks/000000/a/keep", b"x")  # the directory exists; only the write fails
    monkeypatch.setattr(local.os, "fsync", enospc)  # the disk fills up as the data is flushed
    with pytest.raises(StoreError) as err:
        getattr(store, op)("chunks/000000/a/part-00000.safetensors", b"y" * 1000)
    assert err.value.errno == errno.ENOSPC
    assert str(tmp_path / "run" / "chunks/000000/a/part-00000.safetensors") in str(err.value)
    assert sorted(os.listdir(tmp_path / "run/chunks/000000/a")) == ["keep"]


def test_gc_removes_stale_temp_files(tmp_path):
    expected = write_run(str(tmp_path / "run"), lengths=LENGTHS)
    stale = tmp_path / "run" / "commits" / f"{TEMP_PREFIX}dead"
    fresh = tmp_path / "run" / "chunks" / "000000" / f"{TEMP_PREFIX}live"
    for temp in (stale, fresh):
        temp.write_bytes(b"half a record")
    old = os.stat(stale).st_mtime - 2 * 3600
    os.utime(stale, (old, old))

    dry = collect_garbage(open_store(expected.url), grace_s=3600, dry_run=True)
    assert dry.temp_files == (f"commits/{stale.name}",) and stale.exists()
    result = CliRunner().invoke(app, ["gc", expected.url, "--grace-hours", "1"])
    assert result.exit_code == 0 and "1 stale temp file(s)" in result.output
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize("url", ["az://container/run", "hdfs://namenode/run"])
def test_stores_without_a_proven_conditional_create_are_refused(url):
    with pytest.raises(ValueError, match="has no conditional create actex can prove"):
        open_store(url)
    result = CliRunner().invoke(app, ["gc", url])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"actex: error: {url}: {url.split(':')[0]}:// has no conditional create actex can prove, and exactly-once "
        "commits need one; use a local path, memory://, gs:// or s3://"]


@pytest.fixture
def lax_s3(s3_emulator):
    """moto behind a front that drops If-None-Match, as some S3-compatible stores do."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    moto = DomainDispatcherApplication(create_backend_app)

    def ignore_if_none_match(environ, start_response):
        environ.pop("HTTP_IF_NONE_MATCH", None)
        return moto(environ, start_response)

    server = make_server("127.0.0.1", 0, ignore_if_none_match, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {**s3_emulator.storage_options, "endpoint_url": f"http://127.0.0.1:{server.server_address[1]}"}
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def test_s3_store_must_enforce_if_none_match(s3_emulator, s3_bucket, lax_s3, monkeypatch):
    # The real emulator enforces it: the probe passes and leaves nothing behind.
    strict = open_store(f"{s3_bucket}/run", **s3_emulator.storage_options)
    assert strict.create_exclusive("run.json", b"{}") and not strict.create_exclusive("run.json", b"[]")
    assert strict.list() == ["run.json"] and strict.list_temp() == {}

    lax = open_store(f"{s3_bucket}/other", **lax_s3)
    with pytest.raises(ValueError, match="ignores If-None-Match") as err:
        lax.create_exclusive("run.json", b"{}")
    assert s3.UNSAFE_S3_ENV in str(err.value) and "\n" not in str(err.value)
    assert lax.list() == [] and lax.list_temp() == {}
    monkeypatch.setenv(s3.UNSAFE_S3_ENV, "1")  # the documented, unsafe override
    assert lax.create_exclusive("run.json", b"{}")
