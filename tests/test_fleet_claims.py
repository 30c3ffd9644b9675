"""Leases for `--claim` mode, on every backend: exactly one winner per race, takeover, release;
and the progress a monitor reads back from commits, claims and heartbeats."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from rich.console import Console

from actex.fleet.monitor import read_progress, run_complete
from actex.store import layout
from actex.store.claims import ClaimedChunks, Lease, read_lease
from actex.store.commits import MAX_CONTROL_BYTES
from actex.store.folder import open_store
from actex.store.manifest import PlanSummary, RunManifest


class Clock:
    """A wall clock the test moves by hand, shared by every worker of one test."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _source(store, owner, clock, num_chunks=4, lease_s=30.0):
    return ClaimedChunks(store, num_chunks, owner, lease_s=lease_s, skew_s=5.0, poll_s=0.05, clock=clock)


def _race(sources, chunk) -> list[bool]:
    """All sources call try_claim(chunk) at the same moment; returns who won."""
    barrier = threading.Barrier(len(sources))

    def attempt(source):
        barrier.wait()
        return source.try_claim(chunk)

    with ThreadPoolExecutor(len(sources)) as pool:
        return list(pool.map(attempt, sources))


def test_race_for_free_and_for_expired_lease_has_exactly_one_winner(store_url):
    url, options = store_url
    store, clock = open_store(url, **options), Clock()
    workers = [_source(open_store(url, **options), f"w{i}", clock) for i in range(3)]

    won = _race(workers, chunk=2)
    assert sum(won) == 1
    first = workers[won.index(True)]
    lease = read_lease(store, 2)
    assert (lease.owner, lease.attempt, lease.chunk) == (first.owner, 1, 2)

    # The holder dies (stops renewing); others wait until expiry + skew, then race again.
    clock.now += 30.0 + 4.0
    assert not any(w.try_claim(2) for w in workers if w is not first)
    clock.now += 2.0
    won = _race([w for w in workers if w is not first], chunk=2)
    assert sum(won) == 1
    lease = read_lease(store, 2)
    assert lease.attempt == 2 and lease.owner != first.owner

    # The old holder's heartbeat now fails its conditional replace: it learns it lost.
    first.renew()
    assert first.lost(2) and first.held == []
    assert read_lease(store, 2).owner == lease.owner


def test_renew_extends_and_release_frees_at_once(store_url):
    url, options = store_url
    store, clock = open_store(url, **options), Clock()
    a, b = _source(store, "a", clock), _source(store, "b", clock)
    assert a.try_claim(0)
    clock.now += 20.0
    a.renew()
    assert read_lease(store, 0).expiry == clock.now + 30.0
    clock.now += 30.0  # past the original expiry, inside the renewed one
    assert not b.try_claim(0)
    a.finished(0)
    assert read_lease(store, 0).expiry == 0.0 and a.held == []
    assert b.try_claim(0) and read_lease(store, 0).attempt == 2


def test_sources_share_the_run_and_stop_when_every_chunk_is_committed(tmp_path):
    store = open_store(tmp_path / "run")
    clock = Clock()
    stop = threading.Event()
    store.create_exclusive(layout.commit_path(1), b"{}")  # done before anyone started
    computed: dict[str, list[int]] = {"a": [], "b": []}

    def work(owner):
        source = _source(open_store(tmp_path / "run"), owner, clock, num_chunks=6)
        for chunk in source.chunks(stop):
            assert read_lease(store, chunk).owner == owner
            computed[owner].append(chunk)
            store.create_exclusive(layout.commit_path(chunk), owner.encode())
            source.finished(chunk)

    threads = [threading.Thread(target=work, args=(owner,)) for owner in computed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    everything = computed["a"] + computed["b"]
    assert sorted(everything) == [0, 2, 3, 4, 5]  # each chunk once, the committed one never


def test_waits_for_live_leases_then_takes_over_a_dead_workers_chunk(tmp_path):
    store, clock, stop = open_store(tmp_path / "run"), Clock(), threading.Event()
    dead = _source(store, "dead", clock, num_chunks=1)
    assert dead.try_claim(0)  # claimed, then the worker vanished: no heartbeat, no release
    survivor = _source(store, "survivor", clock, num_chunks=1)
    got: list[int] = []
    thread = threading.Thread(target=lambda: got.extend(survivor.chunks(stop)))
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and got == []  # the lease is live: wait, do not duplicate work
    clock.now += 40.0
    deadline = threading.Event()
    for _ in range(100):
        if got:
            break
        deadline.wait(0.05)
    assert got == [0] and read_lease(store, 0).owner == "survivor"
    store.create_exclusive(layout.commit_path(0), b"{}")
    survivor.finished(0)
    thread.join(5)
    assert not thread.is_alive()


def test_stop_ends_iteration_and_close_releases_held_leases(tmp_path):
    store, clock, stop = open_store(tmp_path / "run"), Clock(), threading.Event()
    source = _source(store, "w", clock, num_chunks=3)
    chunks = source.chunks(stop)
    first = next(chunks)
    stop.set()  # pre-empted mid-chunk: no new chunk, but the in-flight one keeps its lease
    assert list(chunks) == []
    assert read_lease(store, first).owner == "w" and source.held == [first]
    source.close()  # the engine gave up on (or finished) the chunk: hand the lease back
    assert read_lease(store, first).expiry == 0.0
    assert _source(store, "next", clock).try_claim(first)


def test_a_chunk_given_up_here_is_not_taken_again_by_this_worker(tmp_path):
    store, clock, stop = open_store(tmp_path / "run"), Clock(), threading.Event()
    source = _source(store, "w", clock, num_chunks=2)
    seen = []
    for chunk in source.chunks(stop):
        seen.append(chunk)
        source.finished(chunk)  # e.g. its writes failed for good: not committed
    assert sorted(seen) == [0, 1] and source.held == []
    assert _source(store, "other", clock).try_claim(0)  # free for another worker


def test_a_garbage_claim_reads_as_expired_and_is_taken_over(tmp_path, caplog):
    """Not a claim, an oversized one, another chunk's: each is named in a warning and read as
    a lease long expired, so a worker takes it over instead of crashing on it."""
    store = open_store(tmp_path / "run")
    store.write_bytes(layout.claim_path(0), b'{"owner": "x"}')
    store.write_bytes(layout.claim_path(1), b" " * (MAX_CONTROL_BYTES + 1))
    store.write_bytes(layout.claim_path(2), Lease(3, "x", 9e12, 1).to_json())
    assert [read_lease(store, chunk).expiry for chunk in range(3)] == [0.0] * 3
    for message in ("claims/000000.json: not a claim record", "claims/000001.json: 65,537 bytes", "claims/000002.json: says chunk 3"):
        assert message in caplog.text
    source = _source(store, "w", Clock(), num_chunks=3)
    try:
        assert [source.try_claim(chunk) for chunk in range(3)] == [True] * 3
    finally:
        source.close()
    assert {read_lease(store, chunk).owner for chunk in range(3)} == {"w"}
    lease = Lease(3, "x", 5.0, 1)
    assert Lease.from_json(lease.to_json(), None, "here") == lease


def test_garbage_heartbeats_are_skipped_by_status_and_monitor_and_none_is_printed_raw(tmp_path, caplog):
    """A non-JSON heartbeat, an oversized one, one with a non-number counter, one under a name
    no worker writes, and one whose state carries an OSC escape: status and the dashboard
    go on, naming what they skipped, and print no control character."""
    from typer.testing import CliRunner

    from actex.cli import app
    from actex.fleet.dashboard import render
    from actex.fleet.recovery import FleetSnapshot, VmView
    from actex.store.commits import Heartbeat, read_heartbeats

    store = open_store(tmp_path / "run")
    manifest = RunManifest({}, "hash", "model", "tokenizer", (), PlanSummary(4, 1, 4, "plan"))
    store.create_exclusive(layout.MANIFEST, manifest.to_json())
    Heartbeat(store, "good-1").beat(force=True)
    osc = "\x1b]0;pwned\x07"
    beat = json.loads(store.read_bytes("workers/good-1.json"))
    store.write_bytes("workers/osc-2.json", json.dumps({**beat, "worker": "osc-2", "state": f"running{osc}"}).encode())
    store.write_bytes("workers/bad-3.json", b"not json")
    store.write_bytes("workers/big-4.json", b" " * (MAX_CONTROL_BYTES + 1))
    store.write_bytes("workers/nan-5.json", json.dumps({**beat, "chunks_done": "many"}).encode())
    store.write_bytes(f"workers/x{osc}.json", json.dumps(beat).encode())
    assert sorted(read_heartbeats(store)) == ["good-1", "osc-2"]

    result = CliRunner().invoke(app, ["status", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "good-1" in result.stdout and "osc-2" in result.stdout and "running?]0;pwned?" in result.stdout
    assert "\x1b" not in result.output and "\x07" not in result.output
    for skipped in ("bad-3.json: not JSON", "big-4.json: 65,537 bytes", "nan-5.json: chunks_done not a number", "not a worker id"):
        assert skipped in caplog.text
    snapshot = FleetSnapshot("f", "r", 0.0, 4, 0, 0, 0, 0, 0.0, None, False,
                             (VmView(f"vm{osc}", "z", f"READY{osc}", None, None, 0, 0, 0, 0.0, 0, ""),), (f"store: {osc}",))
    console = Console(width=120, record=True, color_system=None, file=io.StringIO())
    console.print(render(snapshot))
    text = console.export_text()
    assert "\x1b" not in text and "vm?]0;pwned?" in text and "store: ?]0;pwned?" in text


def test_progress_reports_commits_live_leases_and_silent_workers(tmp_path):
    store, clock = open_store(tmp_path / "run"), Clock(now=time.time())
    assert not run_complete(store)  # no run.json yet
    manifest = RunManifest({}, "hash", "model", "tokenizer", (), PlanSummary(9, 3, 3, "plan"))
    store.create_exclusive(layout.MANIFEST, manifest.to_json())
    store.create_exclusive(layout.commit_path(0), b"{}")
    assert _source(store, "alive", clock, num_chunks=3).try_claim(1)
    _source(store, "gone", clock, num_chunks=3).try_claim(2)
    store.write_bytes(layout.claim_path(2), Lease(2, "gone", clock.now - 100, 1).to_json())  # expired
    for worker, age in (("alive", 2.0), ("gone", 600.0)):
        beat = {"state": "running", "updated_at": clock.now - age, "chunks_done": 1, "tokens_per_s": 5.0}
        store.write_bytes(layout.worker_path(worker), json.dumps(beat).encode())
    # A worker of this host SIGKILLed a moment ago: its last beat is fresh, its pid is gone.
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    beat = {"state": "running", "updated_at": clock.now - 1.0, "host": "here", "pid": killed.pid}
    store.write_bytes(layout.worker_path("killed"), json.dumps(beat).encode())
    progress = read_progress(store, silent_after_s=60, now=clock.now, host="here")
    assert (progress.total, progress.committed, progress.leased) == (3, 1, {1: "alive"})
    assert [(w.worker, w.silent, w.gone) for w in progress.workers] == [
        ("alive", False, False), ("gone", True, False), ("killed", False, True)]
    elsewhere = read_progress(store, silent_after_s=60, now=clock.now, host="another-vm")  # its pid says nothing there
    assert not any(w.gone for w in elsewhere.workers)
    assert not progress.complete and not run_complete(store)
