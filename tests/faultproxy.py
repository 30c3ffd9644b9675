"""A small HTTP proxy on 127.0.0.1 that breaks a seeded fraction of requests.

It sits between a storage client (gcsfs, google-cloud-storage, s3fs) and an emulator
(fake-gcs-server, moto) and makes the network behave like a bad day on a real cloud: some
requests answer 503, some have their TCP connection reset, some are delayed. The fault for the n-th request is drawn
from a `random.Random(seed)`, so a failing run can be replayed with the same seed.

Two kinds of reset matter and are counted apart:
* `reset`: the connection dies before the request reaches the server (nothing happened);
* `reset_after`: the server did the work but the client never sees the answer. This is the
  case that catches a store whose retried conditional create misreads its own success as
  "someone else got there first".

Every injected fault is recorded with the request's method, path and precondition
(`proxy.injected`), so a test can check which operations a fault really hit.

Usage: `with FaultProxy(upstream_url, FaultPlan(seed=1, rate=0.2)) as proxy: ... proxy.url`.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import random
import socket
import struct
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass

FAULT_KINDS = ("503", "reset", "reset_after", "delay")

# Hop-by-hop headers describe one connection, not the message: never forwarded.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}


PRECONDITIONS = ("create", "swap")


def precondition(path: str, headers) -> str | None:
    """What a request makes conditional: "create" (GCS `ifGenerationMatch=0`, S3
    `If-None-Match: *`), "swap" (GCS `ifGenerationMatch=<generation>`, S3 `If-Match`), or None."""
    generation = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).get("ifGenerationMatch")
    if generation:
        return "create" if generation[0] == "0" else "swap"
    if headers.get("If-None-Match", "").strip() == "*":
        return "create"
    if headers.get("If-Match"):
        return "swap"
    return None


@dataclass(frozen=True)
class FaultPlan:
    """Which fraction of requests fail, and how.

    rate: probability that a request gets a fault at all; the kind is then drawn uniformly
    from `kinds`. `delay_s` is how long a delayed request waits before being forwarded.
    `targeted`: (precondition, kind) pairs: the first request carrying that precondition
    (see `precondition`) gets that fault, whatever the draw says, so a test can make sure a
    lost answer hits a conditional create and a compare-and-swap.
    """

    seed: int = 0
    rate: float = 0.1
    kinds: tuple[str, ...] = ("503", "reset", "delay")
    delay_s: float = 0.5
    targeted: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        unknown = (set(self.kinds) | {kind for _, kind in self.targeted}) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; expected some of {FAULT_KINDS}")
        if not {condition for condition, _ in self.targeted} <= set(PRECONDITIONS):
            raise ValueError(f"targeted faults need a precondition among {PRECONDITIONS}, got {self.targeted}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate must be in [0, 1], got {self.rate}")


@dataclass(frozen=True)
class Injected:
    """One injected fault: what it was and which request it hit."""

    kind: str
    method: str
    path: str  # path and query, as the client sent them
    precondition: str | None  # see `precondition`


class _Faults:
    """Thread-safe draw of the next request's fault, and the record of what was injected."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._rng = random.Random(plan.seed)
        self._lock = threading.Lock()
        self._targeted = dict(plan.targeted)
        self.enabled = True
        self.requests = 0
        self.injected: list[Injected] = []

    def draw(self, method: str, path: str, headers) -> str | None:
        condition = precondition(path, headers)
        with self._lock:
            self.requests += 1
            if not self.enabled:
                return None
            kind = self._targeted.pop(condition, None) if condition else None
            # The seeded draw happens for every request, so targeting does not shift it.
            drawn = self._rng.random() < self.plan.rate
            chosen = self._rng.choice(self.plan.kinds) if drawn else None
            kind = kind or chosen
            if kind is not None:
                self.injected.append(Injected(kind, method, path, condition))
            return kind


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN, like a dropped middlebox."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _read_request_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                # Trailer section ends with an empty line.
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(body)
            body += handler.rfile.read(size)
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _make_handler(upstream: urllib.parse.SplitResult, faults: _Faults):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real clients use it

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
            pass  # the tests read counts, not a log

        def _proxy(self) -> None:
            body = _read_request_body(self)
            fault = faults.draw(self.command, self.path, self.headers)
            if fault == "reset":
                self.close_connection = True
                _reset(self.connection)
                return
            if fault == "503":
                payload = b'{"error": {"code": 503, "message": "injected by faultproxy"}}'
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            if fault == "delay":
                time.sleep(faults.plan.delay_s)

            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Host"] = upstream.netloc
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                status, reason, upstream_headers = response.status, response.reason, response.getheaders()
            finally:
                conn.close()

            if fault == "reset_after":
                self.close_connection = True
                _reset(self.connection)
                return
            self.send_response(status, reason)
            for key, value in upstream_headers:
                if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(payload)))
            elif (length := dict((k.lower(), v) for k, v in upstream_headers).get("content-length")) is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _proxy

    return Handler


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that went away mid-answer (a killed worker) is expected here, not news.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FaultProxy:
    """Forwards 127.0.0.1:<port> to `upstream_url`, injecting faults as `plan` says."""

    def __init__(self, upstream_url: str, plan: FaultPlan) -> None:
        self._faults = _Faults(plan)
        upstream = urllib.parse.urlsplit(upstream_url)
        self._server = _QuietServer(("127.0.0.1", 0), _make_handler(upstream, self._faults))
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> int:
        return self._faults.requests

    @property
    def counts(self) -> dict[str, int]:
        """Injected faults by kind so far."""
        return dict(collections.Counter(i.kind for i in self.injected))

    @property
    def injected(self) -> list[Injected]:
        """Every injected fault so far, in order, with the request it hit."""
        with self._faults._lock:
            return list(self._faults.injected)

    def set_enabled(self, enabled: bool) -> None:
        """Pause or resume injection (setup and verification run through a healthy proxy)."""
        self._faults.enabled = enabled

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
