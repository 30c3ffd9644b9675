"""Pre-emption: signals and GCE's notice become a clean stop, a deadline, or an immediate exit."""

from __future__ import annotations

import http.server
import logging
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from actex.engine import preemption
from actex.engine.preemption import PreemptionGuard, watch_gce_preemption


class Exits:
    """Stands in for os._exit: records codes instead of ending the test process."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.called = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.called.set()


def test_first_stop_sets_event_and_closing_in_time_disarms_the_deadline():
    stop, exits = threading.Event(), Exits()
    guard = PreemptionGuard(stop, deadline_s=60, exit=exits)
    before = set(threading.enumerate())
    guard.request_stop("SIGTERM")
    armed = set(threading.enumerate()) - before  # the deadline's timer
    guard.request_stop("SIGINT")  # a later request neither renames nor re-arms
    assert stop.is_set() and guard.reason == "SIGTERM"
    assert len(armed) == 1 and set(threading.enumerate()) - before == armed
    guard.close()  # the in-flight chunk committed: the run ends normally
    # Disarmed, not merely not yet due: the 60 s timer's thread ends at once.
    for timer in armed:
        timer.join(timeout=5)
        assert not timer.is_alive()
    assert exits.codes == []
    assert "SIGTERM" in guard.exit_line(committed=3) and "exit 75" in guard.exit_line(committed=3)


def test_deadline_abandons_in_flight_chunk_and_exits_75(capsys):
    stop, exits, flushed = threading.Event(), Exits(), []
    guard = PreemptionGuard(stop, deadline_s=0.1, on_abandon=lambda: flushed.append(True), exit=exits)
    guard.request_stop("GCE pre-emption notice")
    assert exits.called.wait(2)
    assert exits.codes == [75] and flushed == [True]
    assert "abandoned" in capsys.readouterr().out


def test_worker_exits_with_the_code_it_was_asked_for(capsys):
    """--preempted-exit-code overrides the default 75 (a stopped worker is never taken for
    one that found its share complete, exit 0)."""
    stop, exits = threading.Event(), Exits()
    guard = PreemptionGuard(stop, deadline_s=0.1, exit_code=76, exit=exits)
    guard.request_stop("SIGTERM")
    assert exits.called.wait(2)
    assert exits.codes == [76] and "exit 76" in capsys.readouterr().out
    assert guard.exit_line(3).endswith("exit 76")


def test_second_signal_exits_at_once_with_128_plus_signum():
    stop, exits = threading.Event(), Exits()
    with PreemptionGuard(stop, deadline_s=30, exit=exits):
        signal.raise_signal(signal.SIGTERM)
        assert stop.is_set() and exits.codes == []
        signal.raise_signal(signal.SIGINT)
        assert exits.codes == [128 + signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_signal_landing_while_the_guard_holds_its_lock_does_not_deadlock():
    """A signal handler runs on the main thread between two bytecodes, possibly inside
    close()'s critical section (the fleet SIGTERMs workers as they finish)."""
    stop, exits = threading.Event(), Exits()
    guard = PreemptionGuard(stop, deadline_s=60, exit=exits)

    def signal_inside_close() -> None:
        with guard._lock:
            guard._on_signal(signal.SIGTERM, None)

    thread = threading.Thread(target=signal_inside_close, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive() and stop.is_set()
    guard.close()
    assert exits.codes == []


def test_rejects_non_positive_deadline():
    with pytest.raises(ValueError, match="deadline"):
        PreemptionGuard(threading.Event(), deadline_s=0)


# A worker whose chunk never finishes: the deadline must end it even while the main
# thread is stuck in a blocking call, and a second SIGTERM must end it immediately.
_STUCK_WORKER = textwrap.dedent(
    """
    import threading, time
    from actex.engine.preemption import PreemptionGuard
    stop = threading.Event()
    with PreemptionGuard(stop, deadline_s={deadline}):
        print("ready", flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("second_signal", [False, True])
def test_real_process_deadline_and_second_signal(second_signal):
    deadline = 30 if second_signal else 0.5
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK_WORKER.format(deadline=deadline)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        if second_signal:
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - started
    if second_signal:
        assert proc.returncode == 128 + signal.SIGTERM and elapsed < 5
        assert "second signal" in out
    else:
        assert proc.returncode == 75 and 0.4 < elapsed < 5
        assert out.count("\n") == 1 and "abandoned" in out, out
        assert "SIGTERM" in err  # the warning when the signal arrived


class _FakeMetadata(http.server.BaseHTTPRequestHandler):
    """GCE metadata server: `preempted` is FALSE until the test flips it."""

    preempted = threading.Event()
    requests: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        if self.headers.get("Metadata-Flavor") != "Google" or not self.path.startswith(preemption.PREEMPTED_PATH):
            self.send_error(403)
            return
        if "wait_for_change=true" in self.path:
            self.preempted.wait(5)  # long poll: answer when the value changes
        body = b"TRUE" if self.preempted.is_set() else b"FALSE"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def metadata_server():
    _FakeMetadata.preempted.clear()
    _FakeMetadata.requests.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeMetadata)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    _FakeMetadata.preempted.set()  # release any long poll
    server.shutdown()
    server.server_close()


def test_gce_notice_requests_stop(metadata_server):
    stop, exits = threading.Event(), Exits()
    guard = PreemptionGuard(stop, deadline_s=30, exit=exits)
    watcher = watch_gce_preemption(guard, host=metadata_server)
    assert watcher is not None and not stop.is_set()
    _FakeMetadata.preempted.set()
    assert stop.wait(5) and guard.reason == "GCE pre-emption notice"
    watcher.join(5)
    assert not watcher.is_alive()
    guard.close()
    assert any("wait_for_change=true" in path for path in _FakeMetadata.requests)


def test_no_metadata_server_gives_up_quickly_and_silently(monkeypatch, caplog):
    guard = PreemptionGuard(threading.Event(), deadline_s=30, exit=Exits())
    # A port that accepts connections (the kernel's backlog) and never answers, as a
    # firewalled or hung metadata address does: only the probe's 1 s timeout ends it.
    with socket.socket() as silent, caplog.at_level(logging.DEBUG):
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        assert watch_gce_preemption(guard, host="%s:%d" % silent.getsockname()) is None
        waited = time.monotonic() - started
    assert 0.9 <= waited < 2.5, waited
    assert caplog.records == [] and not guard.stop.is_set()
    monkeypatch.delenv(preemption.METADATA_HOST_ENV, raising=False)
    monkeypatch.setattr(preemption, "_DMI_PRODUCT", preemption.Path("/nonexistent/product_name"))
    assert preemption.metadata_host() is None
    monkeypatch.setenv(preemption.METADATA_HOST_ENV, "10.0.0.1:80")
    assert preemption.metadata_host() == "10.0.0.1:80"
