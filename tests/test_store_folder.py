"""Store primitives on every backend: local, memory, gs (fake-gcs-server), s3 (moto)."""

import json
import os
import subprocess
import sys
import threading

import pytest

from actex.store import RetryPolicy, StoreError, open_store
from actex.store.backends import TEMP_PREFIX
from actex.store.backends.local import LocalBackend
from actex.store.retry import client_retries, is_transient

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.005)


@pytest.fixture
def store(store_url):
    url, options = store_url
    return open_store(url, retry=FAST_RETRY, **options)


def test_read_write_list_delete(store):
    assert store.list() == []
    store.write_bytes("a/one.bin", b"0123456789")
    store.write_bytes("a/b/two.bin", b"xy")
    store.write_bytes("a/one.bin", b"abcdefghij")  # overwrite
    assert store.read_bytes("a/one.bin") == b"abcdefghij"
    assert store.size("a/one.bin") == 10
    assert store.exists("a/b/two.bin") and not store.exists("a/missing")
    assert store.list() == ["a/b/two.bin", "a/one.bin"]
    assert store.list("a/b") == ["a/b/two.bin"]
    assert store.list("nothing/here") == []
    assert store.read_many(["a/one.bin", "a/b/two.bin"]) == {"a/one.bin": b"abcdefghij", "a/b/two.bin": b"xy"}
    store.delete("a/one.bin")
    store.delete("a/one.bin")  # missing is fine
    assert store.list() == ["a/b/two.bin"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/one.bin")


def test_ranged_reads(store):
    data = bytes(range(256)) * 8
    store.write_bytes("blob", data)
    assert store.read_range("blob", 0, 8) == data[:8]
    assert store.read_range("blob", 1000, 1500) == data[1000:1500]
    assert store.read_range("blob", 2040, 2048) == data[2040:]
    assert store.read_range("blob", 5, 5) == b""
    with pytest.raises(ValueError):
        store.read_range("blob", 10, 5)


def test_create_exclusive(store):
    assert store.create_exclusive("commits/000001.json", b'{"attempt": "a"}')
    assert not store.create_exclusive("commits/000001.json", b'{"attempt": "b"}')
    assert store.read_bytes("commits/000001.json") == b'{"attempt": "a"}'
    # A retried create whose first try landed finds its own bytes: it won.
    assert store.create_exclusive("commits/000001.json", b'{"attempt": "a"}')
    assert store.list("commits") == ["commits/000001.json"]  # no temp files left visible


def race(racers, fn):
    """Run fn(0..racers-1) in threads released together by a barrier; their results."""
    barrier = threading.Barrier(racers)
    results = [None] * racers

    def run(i):
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_create_exclusive_thread_race(store):
    results = race(8, lambda i: store.create_exclusive("claims/000007.json", f"worker-{i}".encode()))
    assert results.count(True) == 1
    winner = results.index(True)
    assert store.read_bytes("claims/000007.json") == f"worker-{winner}".encode()


RACER = """
import json, sys
from actex.store import open_store
url, options, name = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
store = open_store(url, **options)
store.exists("warm-up")  # imports done, connections open: ready at the start line
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps(store.create_exclusive("commits/000003.json", name.encode())), flush=True)
"""


def test_create_exclusive_process_race(store_url, gcs_emulator, s3_emulator):
    url, options = store_url
    if url.startswith("memory://"):
        pytest.skip("memory:// lives in one process")
    env = {**os.environ, **gcs_emulator.env, **s3_emulator.env}
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, url, json.dumps(options), f"p{i}"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        for i in range(4)
    ]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 4, [p.stderr.read()[-500:] for p in procs]
        for p in procs:  # release them together
            p.stdin.write("go\n")
            p.stdin.flush()
        won = [json.loads(p.stdout.readline()) for p in procs]
        assert [p.wait(timeout=60) for p in procs] == [0] * 4
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert won.count(True) == 1, won
    assert open_store(url, **options).read_bytes("commits/000003.json") == f"p{won.index(True)}".encode()


def test_replace_if_version(store):
    with pytest.raises(FileNotFoundError):
        store.read_versioned("claims/000001.json")
    store.create_exclusive("claims/000001.json", b"lease-1")
    data, v1 = store.read_versioned("claims/000001.json")
    assert data == b"lease-1"
    assert store.replace_if_version("claims/000001.json", b"lease-2", v1)
    data, v2 = store.read_versioned("claims/000001.json")
    assert data == b"lease-2" and v2 != v1
    assert not store.replace_if_version("claims/000001.json", b"stale", v1)
    assert store.read_bytes("claims/000001.json") == b"lease-2"
    store.delete("claims/000001.json")
    assert not store.replace_if_version("claims/000001.json", b"gone", v2)
    assert not store.exists("claims/000001.json")


def test_replace_if_version_race(store):
    store.create_exclusive("claims/000002.json", b"expired")
    _, version = store.read_versioned("claims/000002.json")
    results = race(6, lambda i: store.replace_if_version("claims/000002.json", f"taker-{i}".encode(), version))
    assert results.count(True) == 1
    assert store.read_bytes("claims/000002.json") == f"taker-{results.index(True)}".encode()


def test_a_plain_write_moves_the_version_on(store):
    """write_bytes (gcsfs on gs://) and the compare-and-swap (google-cloud-storage there)
    see one object version: a swap holding the version from before the write loses."""
    store.create_exclusive("claims/000003.json", b"lease-1")
    _, before = store.read_versioned("claims/000003.json")
    store.write_bytes("claims/000003.json", b"overwritten")
    assert not store.replace_if_version("claims/000003.json", b"stale", before)
    data, after = store.read_versioned("claims/000003.json")
    assert data == b"overwritten" and after != before
    assert store.replace_if_version("claims/000003.json", b"lease-2", after)


def _flaky(real, failures, error=ConnectionResetError("connection reset by peer")):
    """Wrap `real`: the first `failures` calls raise `error`, then delegate."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) <= failures:
            raise error
        return real(*args, **kwargs)

    return wrapper, calls


def test_transient_errors_are_retried(store, monkeypatch):
    store.write_bytes("x.bin", b"payload")
    flaky, calls = _flaky(store.fs.cat_file, failures=2)
    monkeypatch.setattr(store.fs, "cat_file", flaky)
    assert store.read_bytes("x.bin") == b"payload"
    assert len(calls) == 3


def test_retries_are_bounded_and_name_the_object(store, monkeypatch):
    flaky, calls = _flaky(store.fs.cat_file, failures=100, error=ConnectionResetError("connection reset"))
    monkeypatch.setattr(store.fs, "cat_file", flaky)
    with pytest.raises(StoreError, match=r"read .*x\.bin failed after 4 attempts: ConnectionResetError: connection reset"):
        store.read_bytes("x.bin")
    assert len(calls) == FAST_RETRY.attempts


def test_errors_the_client_retried_are_not_retried_again(store, monkeypatch):
    """s3fs retries socket timeouts itself (S3_RETRYABLE_ERRORS): one more layer of retries
    would multiply the attempts. Other clients leave timeouts to us."""
    flaky, calls = _flaky(store.fs.cat_file, failures=100, error=TimeoutError("read timed out"))
    monkeypatch.setattr(store.fs, "cat_file", flaky)
    with pytest.raises(StoreError, match=r"read .*x\.bin failed after \d+ attempts?.*: TimeoutError: read timed out"):
        store.read_bytes("x.bin")
    assert len(calls) == (1 if store.url.startswith("s3://") else FAST_RETRY.attempts)


def test_google_cloud_storage_errors_are_retried_once_over(gcs_emulator):
    """gs:// conditional writes go through google-cloud-storage, which retries 5xx and
    resets itself and raises RetryError when it gives up: that is not retried again (six
    tries of its own tries), while a 503 it raised without retrying is."""
    from google.api_core.exceptions import PreconditionFailed, RetryError, ServiceUnavailable

    fs = open_store("gs://bucket/run", **gcs_emulator.storage_options).fs
    already_retried = client_retries(fs)
    try:
        raise RetryError("Timeout of 120.0s exceeded", None) from ServiceUnavailable("backend down")
    except RetryError as gave_up:
        assert is_transient(gave_up) and already_retried(gave_up)
    assert is_transient(ServiceUnavailable("backend down")) and not already_retried(ServiceUnavailable("down"))
    assert not is_transient(PreconditionFailed("generation moved on"))


def test_permanent_errors_are_not_retried(store, monkeypatch):
    flaky, calls = _flaky(store.fs.cat_file, failures=100, error=PermissionError("403 forbidden"))
    monkeypatch.setattr(store.fs, "cat_file", flaky)
    with pytest.raises(PermissionError):
        store.read_bytes("x.bin")
    assert len(calls) == 1


def test_create_whose_response_was_lost_still_wins(store, monkeypatch):
    # The request lands but the connection drops before the answer: the retry sees the
    # object exists and must recognise it as its own, not report a lost race.
    backend = store._backend
    real = backend.create_exclusive
    calls = []

    def lands_then_resets(path, data):
        calls.append(path)
        ok = real(path, data)
        if len(calls) == 1:
            raise ConnectionResetError("reset after the write")
        return ok

    monkeypatch.setattr(backend, "create_exclusive", lands_then_resets)
    assert store.create_exclusive("commits/000009.json", b"mine")
    assert len(calls) == 2
    monkeypatch.undo()
    assert not store.create_exclusive("commits/000009.json", b"someone else")


@pytest.mark.parametrize("op, publish", [("write_bytes", "replace"), ("create_exclusive", "link")])
def test_local_write_never_exposes_partial_file(tmp_path, monkeypatch, op, publish):
    """Bytes go to a hidden temp name, fully written and fsynced, and appear under the final
    name only by one rename/link: when that step fails, the final name never appears."""
    final = tmp_path / "run" / "p" / "part.bin"
    data = b"a" * 100_000
    seen = []

    def failing(src, dst, *args, **kwargs):
        # What a reader could see at the instant of publishing: the temp holds every byte,
        # the final name does not exist yet.
        seen.append((os.path.basename(src), open(src, "rb").read() == data, os.path.exists(dst)))
        raise OSError(5, "injected: publish failed")

    monkeypatch.setattr(os, publish, failing)
    store = open_store(tmp_path / "run", retry=FAST_RETRY)
    with pytest.raises(OSError, match="injected"):
        getattr(store, op)("p/part.bin", data)
    assert len(seen) == 1
    temp_name, complete, final_existed = seen[0]
    assert temp_name.startswith(TEMP_PREFIX) and complete and not final_existed
    assert not final.exists()
    assert os.listdir(final.parent) == []  # the temp file is cleaned up too
    monkeypatch.undo()
    getattr(store, op)("p/part.bin", data)
    assert os.listdir(final.parent) == ["part.bin"] and final.read_bytes() == data


def test_bad_relative_paths_are_refused(tmp_path):
    store = open_store(tmp_path / "run")
    with pytest.raises(ValueError, match="bad relative path"):
        store.write_bytes("../escape", b"")


@pytest.mark.parametrize("op", ["write_bytes", "create_exclusive"])
def test_local_writes_fsync_every_directory_they_create(tmp_path, monkeypatch, op):
    """A commit record must not survive a power cut that loses the directories its parts
    sit in: each new directory's entry is made durable in its parent, up to the first
    directory that already existed."""
    synced = []
    fsync_dir = LocalBackend._fsync_dir
    monkeypatch.setattr(LocalBackend, "_fsync_dir", staticmethod(lambda d: (synced.append(d), fsync_dir(d))))
    store = open_store(tmp_path / "run")
    getattr(store, op)("chunks/000001/attempt/part-00000.safetensors", b"x")
    run = tmp_path / "run"
    expected = {tmp_path, run, run / "chunks", run / "chunks/000001", run / "chunks/000001/attempt"}
    assert {os.path.realpath(d) for d in synced} >= {os.path.realpath(d) for d in expected}
