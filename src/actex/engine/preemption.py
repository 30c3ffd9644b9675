"""Graceful pre-emption: turn SIGTERM, SIGINT or GCE's pre-emption notice into a clean stop.

A pre-emptible VM gets about 30 s between the notice and the power going off. What we do
with them, in order:

1. The first signal (or the metadata server saying `TRUE`) sets the engine's stop event:
   no new chunk is taken, the in-flight chunk keeps going so its work is not lost.
2. A deadline timer starts (default 25 s, inside GCE's 30 s). If the in-flight chunk has
   not committed by then it is abandoned: `on_abandon` runs (flush the heartbeat, say which
   chunk was dropped) and the process exits 75 at once. Abandoning is always safe because a
   chunk exists only once its commit record does; its half-written attempt is garbage.
3. A second signal exits at once (128 + signal number: 130 for a second Ctrl-C): the user means it.

The deadline runs on its own thread, so it fires even while the main thread sits in a
long XLA call or a blocked upload. The metadata poll also runs on its own daemon thread
and gives up silently off GCE, so nothing here ever blocks the hot path.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DEADLINE_S = 25.0

# GCE's metadata endpoint; GCE_METADATA_HOST is the variable Google's own client libraries
# honour to point it elsewhere (we use it in tests, users behind a proxy may too).
METADATA_HOST_ENV = "GCE_METADATA_HOST"
DEFAULT_METADATA_HOST = "metadata.google.internal"
PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
_DMI_PRODUCT = Path("/sys/class/dmi/id/product_name")


class PreemptionGuard:
    """Owns the process's stop signals for one extraction run.

    `stop` is the engine's event: set means "take no new chunk". `reason` says what set it
    (`"SIGTERM"`, `"SIGINT"`, `"GCE pre-emption notice"`), or is None while running.
    `on_abandon` runs on the deadline thread just before the process exits; keep it short
    (it gets no deadline of its own beyond the process's remaining life).
    """

    def __init__(
        self,
        stop: threading.Event,
        *,
        deadline_s: float = DEFAULT_DEADLINE_S,
        on_abandon: Callable[[], None] | None = None,
        exit_code: int = 75,
        exit: Callable[[int], None] = os._exit,
        signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
        on_request: Callable[[str], None] | None = None,
    ) -> None:
        if deadline_s <= 0:
            raise ValueError(f"pre-emption deadline must be > 0 seconds, got {deadline_s}")
        self.stop = stop
        self.deadline_s = deadline_s
        self.on_abandon = on_abandon
        # The code a worker stopped before finishing exits with: 75 (EX_TEMPFAIL), so that
        # `actex extract ... && actex export ...` never exports a partial run.
        self.exit_code = exit_code
        self.reason: str | None = None
        self.signals = signals
        # Runs once, with the reason, after the first request (a pod slice tells its other
        # processes through the coordination service: engine/distributed.py).
        self.on_request = on_request
        # os._exit, not sys.exit: the deadline fires on a helper thread, where SystemExit
        # would end only that thread; in tests it is replaced to observe the exit code.
        self._exit = exit
        # Re-entrant: a signal handler runs on the main thread, possibly inside close()'s
        # critical section, and request_stop takes the lock again.
        self._lock = threading.RLock()
        self._deadline: threading.Timer | None = None
        self._previous: dict[int, object] = {}

    # -- stop requests ---------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """First request: stop taking work and arm the deadline. Safe from any thread."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            self.stop.set()
            self._deadline = threading.Timer(self.deadline_s, self._abandon)
            self._deadline.daemon = True
            self._deadline.start()
        log.warning("%s: taking no new chunk; finishing the in-flight one (deadline %.0f s)", reason, self.deadline_s)
        if self.on_request is not None:
            self.on_request(reason)

    def _abandon(self) -> None:
        log.warning("%s: in-flight chunk not committed after %.0f s; abandoning it", self.reason, self.deadline_s)
        if self.on_abandon is not None:
            try:
                self.on_abandon()
            except Exception as err:  # exiting anyway; say why the flush failed
                log.error("while abandoning after %s: %s", self.reason, err)
        print(
            f"actex: stopped by {self.reason}; the in-flight chunk was abandoned after "
            f"{self.deadline_s:.0f} s (not committed, it will be redone); exit {self.exit_code}",
            flush=True,
        )
        self._exit(self.exit_code)

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is None:
            self.request_stop(name)
            return
        print(f"actex: second signal ({name}) after {self.reason}; exiting now", flush=True)
        self._exit(128 + signum)

    # -- lifecycle -------------------------------------------------------------------

    def install(self, signals: tuple[int, ...] | None = None) -> "PreemptionGuard":
        """Install the signal handlers (main thread only, as Python requires)."""
        for signum in self.signals if signals is None else signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def close(self) -> None:
        """Restore previous handlers and disarm the deadline (the run ended on its own)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        with self._lock:
            if self._deadline is not None:
                self._deadline.cancel()

    def __enter__(self) -> "PreemptionGuard":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.close()

    def exit_line(self, committed: int, exit_code: int | None = None) -> str:
        """The one line printed when a stop request ended the run cleanly; `exit_code` is
        this guard's unless the caller found the worker's share complete anyway (0)."""
        code = self.exit_code if exit_code is None else exit_code
        return (
            f"actex: stopped by {self.reason} after finishing the in-flight chunk; "
            f"{committed} chunk(s) committed by this worker; nothing left half-committed; exit {code}"
        )


# -- GCE pre-emption notice ----------------------------------------------------------


def metadata_host() -> str | None:
    """The metadata server to ask, or None when this is clearly not a GCE/TPU VM.

    Off GCE we must not even try DNS for metadata.google.internal (it can take seconds to
    fail), so without an explicit GCE_METADATA_HOST we first look at the DMI product name,
    which Google's VMs (TPU VMs included) set to "Google Compute Engine".
    """
    if host := os.environ.get(METADATA_HOST_ENV):
        return host
    try:
        product = _DMI_PRODUCT.read_text().strip()
    except OSError:
        return None
    return DEFAULT_METADATA_HOST if product.startswith("Google") else None


def _ask_preempted(host: str, *, wait: bool, timeout_s: float) -> bool:
    """One request to the metadata server; `wait` long-polls until the value changes."""
    query = "?wait_for_change=true&timeout_sec=60" if wait else ""
    request = urllib.request.Request(f"http://{host}{PREEMPTED_PATH}{query}", headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.read().decode().strip().upper() == "TRUE"


def watch_gce_preemption(
    guard: PreemptionGuard, *, host: str | None = None, retry_s: float = 5.0
) -> threading.Thread | None:
    """Start a daemon thread that turns the GCE pre-emption notice into `guard.request_stop`.

    Returns None, silently, when not on GCE or when the first quick probe fails (no
    metadata server here); otherwise the thread, which exits once the stop event is set.
    """
    host = host or metadata_host()
    if host is None:
        return None
    try:
        if _ask_preempted(host, wait=False, timeout_s=1.0):
            guard.request_stop("GCE pre-emption notice")
            return None
    except (OSError, urllib.error.URLError, ValueError):
        return None

    def poll() -> None:
        while not guard.stop.is_set():
            try:
                if _ask_preempted(host, wait=True, timeout_s=70.0):
                    guard.request_stop("GCE pre-emption notice")
                    return
            except (OSError, urllib.error.URLError, ValueError):
                # The server was there a moment ago: a blip, not a verdict. Try again.
                guard.stop.wait(retry_s)

    thread = threading.Thread(target=poll, name="gce-preemption-watch", daemon=True)
    thread.start()
    return thread
