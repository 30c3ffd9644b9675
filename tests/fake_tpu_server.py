"""A fake Cloud TPU API v2 on 127.0.0.1: the REST subset actex uses, with time and faults.

    fake = FakeTpu(boot=...)            # or the `fake_tpu` fixture
    TpuApi("p", api_endpoint=fake.endpoint)   # the real google-cloud-tpu client, REST transport

Served: nodes create (POST ...nodes?nodeId=), get, list, delete, patch (updateMask=metadata),
queued resources (one node each) create, get, list, delete, and operations get. States move with time: a created node is CREATING for `create_s`, then
READY (its create operation completes then, as on GCP); a deleted one is DELETING for
`delete_s`, then gone. A node that turns READY "boots": its `startup-script` metadata runs
under bash as a local process group, with the environment `vm_env(node)` returns (the test
points ACTEX_VENV at an already installed actex instead of a wheel download) and the
node's metadata served at $ACTEX_METADATA_URL/<key>, as GCE's metadata server would.

Faults, set from the test's thread:
    preempt(zone, name)        kill the VM's processes (SIGKILL) and mark it PREEMPTED
    stockout(zone)             creates there fail with RESOURCE_EXHAUSTED (code 8) in the operation;
                               queued resources there wait (WAITING_FOR_RESOURCES)
    stick_creating(n)          the next n creates stay CREATING forever (operation never done)
    fail_next(n, status)       the next n API requests answer HTTP `status` (5xx)
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

NODE_TYPE = "type.googleapis.com/google.cloud.tpu.v2.Node"
EMPTY_TYPE = "type.googleapis.com/google.protobuf.Empty"
QUEUED_TYPE = "type.googleapis.com/google.cloud.tpu.v2.QueuedResource"
_NODES = re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/nodes$")
_NODE = re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/nodes/([^/:]+)$")
_OPERATION = re.compile(r"^/v2/(projects/[^/]+/locations/[^/]+/operations/[^/]+)$")
_QUEUED_ALL = re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/queuedResources$")
_QUEUED = re.compile(r"^/v2/projects/([^/]+)/locations/([^/]+)/queuedResources/([^/:]+)$")
_METADATA = re.compile(r"^/fake-metadata/([^/]+)/([^/]+)/([^/]+)$")


@dataclass
class FakeNode:
    path: str  # projects/P/locations/Z/nodes/N
    zone: str
    name: str
    body: dict  # the Node as JSON (state excluded)
    state: str = "CREATING"
    created_at: float = field(default_factory=time.time)
    ready_at: float | None = None  # None: stuck in CREATING
    gone_at: float | None = None
    process: subprocess.Popen | None = None

    def to_json(self) -> dict:
        created = datetime.fromtimestamp(self.created_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {**self.body, "name": self.path, "state": self.state, "createTime": created, "health": "HEALTHY"}


@dataclass
class FakeQueued:
    """A queued resource for one node: ACCEPTED, WAITING_FOR_RESOURCES while its zone is
    stocked out, then ACTIVE once its node is created; SUSPENDED when that node is pre-empted."""

    path: str  # projects/P/locations/Z/queuedResources/N
    zone: str
    node_id: str
    body: dict
    state: str = "ACCEPTED"
    created_at: float = field(default_factory=time.time)
    gone_at: float | None = None

    def to_json(self) -> dict:
        created = datetime.fromtimestamp(self.created_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {**self.body, "name": self.path, "state": {"state": self.state}, "createTime": created}


@dataclass
class FakeOperation:
    name: str
    done_when: Callable[[], bool]
    response: Callable[[], dict] | None = None
    error: dict | None = None

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "done": False}
        if self.done_when():
            out["done"] = True
            if self.error is not None:
                out["error"] = self.error
            elif self.response is not None:
                out["response"] = self.response()
        return out


class FakeTpu:
    def __init__(self, *, vm_env: Callable[[FakeNode], dict] | None = None, workdir: Path | None = None,
                 create_s: float = 0.3, delete_s: float = 0.2, stockout_s: float = 0.2):
        self.vm_env = vm_env
        self.workdir = workdir
        self.create_s, self.delete_s, self.stockout_s = create_s, delete_s, stockout_s
        self.nodes: dict[str, FakeNode] = {}
        self.operations: dict[str, FakeOperation] = {}
        self.queued: dict[str, FakeQueued] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.stocked_out: set[str] = set()
        self.boots: collections.Counter = collections.Counter()  # (zone, name) -> VMs of that name booted
        self._stuck = 0
        self._failures: list[int] = []
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._threads = [threading.Thread(target=self.server.serve_forever, daemon=True),
                         threading.Thread(target=self._tick_forever, daemon=True)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ faults

    def preempt(self, zone: str, name: str) -> None:
        with self._lock:
            node = self._node(zone, name)
            self._kill(node)
            node.state = "PREEMPTED"
            if node.body.get("queuedResource") in self.queued:
                self.queued[node.body["queuedResource"]].state = "SUSPENDED"

    def stockout(self, zone: str, on: bool = True) -> None:
        with self._lock:
            (self.stocked_out.add if on else self.stocked_out.discard)(zone)

    def stick_creating(self, n: int = 1) -> None:
        with self._lock:
            self._stuck += n

    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._failures += [status] * n

    # ------------------------------------------------------------------ inspection

    def node(self, zone: str, name: str) -> FakeNode | None:
        with self._lock:
            return next((n for n in self.nodes.values() if n.zone == zone and n.name == name), None)

    def states(self) -> dict[str, str]:
        with self._lock:
            return {f"{n.zone}/{n.name}": n.state for n in self.nodes.values()}

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            for node in self.nodes.values():
                self._kill(node)

    # ------------------------------------------------------------------ time

    def _tick_forever(self) -> None:
        while not self._stop.wait(0.05):
            now = time.time()
            with self._lock:
                for path, node in list(self.nodes.items()):
                    if node.state == "CREATING" and node.ready_at is not None and now >= node.ready_at:
                        node.state = "READY"
                        self._boot(node)
                    elif node.state == "DELETING" and now >= node.gone_at:
                        del self.nodes[path]
                for path, queued in list(self.queued.items()):
                    self._advance(queued, now)

    def _advance(self, queued: FakeQueued, now: float) -> None:
        if queued.state == "DELETING" and now >= queued.gone_at:
            del self.queued[queued.path]
        elif queued.state in ("ACCEPTED", "WAITING_FOR_RESOURCES"):
            if queued.zone in self.stocked_out:
                queued.state = "WAITING_FOR_RESOURCES"  # a queue waits for capacity; it does not fail
            elif now >= queued.created_at + self.create_s:
                spec = queued.body["tpu"]["nodeSpec"][0]
                node_body = {**spec["node"], "queuedResource": queued.path}
                if "spot" in queued.body:
                    node_body["schedulingConfig"] = {"spot": True}
                self._create(spec["parent"], queued.zone, spec["nodeId"], node_body)
                queued.state = "ACTIVE"

    def _boot(self, node: FakeNode) -> None:
        script = node.body.get("metadata", {}).get("startup-script")
        if not script or self.vm_env is None:
            return
        self.boots[(node.zone, node.name)] += 1
        home = self.workdir / f"{node.zone}-{node.name}-{self.boots[(node.zone, node.name)]}"
        home.mkdir(parents=True, exist_ok=True)
        (home / "startup-script.sh").write_text(script)
        env = {**os.environ, **self.vm_env(node), "ACTEX_HOME": str(home),
               "ACTEX_METADATA_URL": f"{self.endpoint}/fake-metadata/{node.zone}/{node.name}"}
        with open(home / "console.log", "wb") as out:
            node.process = subprocess.Popen(["bash", str(home / "startup-script.sh")], cwd=home, env=env,
                                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)

    def _kill(self, node: FakeNode) -> None:
        if node.process is not None and node.process.poll() is None:
            try:
                os.killpg(node.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.process.wait()

    # ------------------------------------------------------------------ API

    def _node(self, zone: str, name: str) -> FakeNode:
        node = self.node(zone, name)
        if node is None:
            raise KeyError(f"{zone}/{name}")
        return node

    def _operation(self, parent: str, **kwargs) -> dict:
        op = FakeOperation(f"{parent}/operations/op-{next(self._ids)}", **kwargs)
        self.operations[op.name] = op
        return op.to_json()

    def handle(self, method: str, url: str, body: dict) -> tuple[int, dict | str]:
        parsed = urlparse(url)
        path, query = parsed.path, parse_qs(parsed.query)
        with self._lock:
            if match := _METADATA.match(path):
                node = self.node(match[1], match[2])
                value = None if node is None else node.body.get("metadata", {}).get(match[3])
                return (404, "") if value is None else (200, value)
            if self._failures:
                status = self._failures.pop(0)
                return status, _error(status, "UNAVAILABLE" if status == 503 else "INTERNAL", "injected fault")
            if (match := _NODES.match(path)) and method == "POST":
                return self._create(f"projects/{match[1]}/locations/{match[2]}", match[2], query["nodeId"][0], body)
            if (match := _NODES.match(path)) and method == "GET":
                nodes = [n.to_json() for n in self.nodes.values() if n.zone == match[2]]
                return 200, {"nodes": nodes}
            if match := _NODE.match(path):
                node = self.nodes.get(path[len("/v2/"):])
                if node is None:
                    return 404, _error(404, "NOT_FOUND", f"node {path} not found")
                if method == "GET":
                    return 200, node.to_json()
                if method == "DELETE":
                    return 200, self._delete(node)
                if method == "PATCH":
                    if "metadata" in query.get("updateMask", [""])[0]:
                        node.body["metadata"] = body.get("metadata", {})
                    return 200, self._operation(node.path.rsplit("/nodes/", 1)[0], done_when=lambda: True,
                                                response=lambda: {"@type": NODE_TYPE, **node.to_json()})
            if (match := _QUEUED_ALL.match(path)) and method == "POST":
                return self._create_queued(f"projects/{match[1]}/locations/{match[2]}", match[2], query["queuedResourceId"][0], body)
            if (match := _QUEUED_ALL.match(path)) and method == "GET":
                return 200, {"queuedResources": [q.to_json() for q in self.queued.values() if q.zone == match[2]]}
            if match := _QUEUED.match(path):
                queued = self.queued.get(path[len("/v2/"):])
                if queued is None:
                    return 404, _error(404, "NOT_FOUND", f"queued resource {path} not found")
                if method == "GET":
                    return 200, queued.to_json()
                if method == "DELETE":
                    if any(n.body.get("queuedResource") == queued.path for n in self.nodes.values()):
                        # As on GCP without force: the node must be deleted first.
                        return 400, _error(400, "FAILED_PRECONDITION", f"queued resource {path} still has its node")
                    queued.state, queued.gone_at = "DELETING", time.time() + self.delete_s
                    return 200, self._operation(queued.path.rsplit("/queuedResources/", 1)[0],
                                                done_when=lambda: queued.path not in self.queued, response=lambda: {"@type": EMPTY_TYPE})
            if (match := _OPERATION.match(path)) and method == "GET":
                op = self.operations.get(match[1])
                return (200, op.to_json()) if op else (404, _error(404, "NOT_FOUND", "no such operation"))
        return 404, _error(404, "NOT_FOUND", f"{method} {path} is not served by the fake")

    def _create(self, parent: str, zone: str, name: str, body: dict) -> tuple[int, dict]:
        path = f"{parent}/nodes/{name}"
        if path in self.nodes:
            return 409, _error(409, "ALREADY_EXISTS", f"node {path} already exists")
        if zone in self.stocked_out:
            # As on GCP: the call is accepted, the operation fails with RESOURCE_EXHAUSTED.
            at = time.time() + self.stockout_s
            error = {"code": 8, "message": f'There is no more capacity in the zone "{zone}"; you can try in another zone'}
            return 200, self._operation(parent, done_when=lambda: time.time() >= at, error=error)
        node = FakeNode(path, zone, name, {k: v for k, v in body.items() if k not in ("name", "state")})
        if self._stuck:
            self._stuck -= 1
        else:
            node.ready_at = node.created_at + self.create_s
        self.nodes[path] = node
        return 200, self._operation(parent, done_when=lambda: node.state != "CREATING",
                                    response=lambda: {"@type": NODE_TYPE, **node.to_json()})

    def _create_queued(self, parent: str, zone: str, name: str, body: dict) -> tuple[int, dict]:
        path = f"{parent}/queuedResources/{name}"
        if path in self.queued:
            return 409, _error(409, "ALREADY_EXISTS", f"queued resource {path} already exists")
        queued = FakeQueued(path, zone, name, {k: v for k, v in body.items() if k not in ("name", "state")})
        self.queued[path] = queued
        # The operation is done once the request is queued, not when it is provisioned.
        return 200, self._operation(parent, done_when=lambda: True,
                                    response=lambda: {"@type": QUEUED_TYPE, **queued.to_json()})

    def _delete(self, node: FakeNode) -> dict:
        self._kill(node)
        if node.state != "DELETING":
            node.state = "DELETING"
            node.gone_at = time.time() + self.delete_s
        return self._operation(node.path.rsplit("/nodes/", 1)[0], done_when=lambda: node.path not in self.nodes,
                               response=lambda: {"@type": EMPTY_TYPE})


def _error(code: int, status: str, message: str) -> dict:
    return {"error": {"code": code, "message": message, "status": status}}


def _handler(fake: FakeTpu):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else {}
            status, payload = fake.handle(self.command, self.path, body)
            fake.requests.append((self.command, self.path, status))
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, *args) -> None:  # quiet: the test prints `fake.requests` if needed
            pass

    return Handler


@pytest.fixture
def fake_tpu(tmp_path):
    """A FakeTpu whose VMs boot nothing (tests of the API and of `actex tpu`)."""
    fake = FakeTpu(workdir=tmp_path / "vms")
    try:
        yield fake
    finally:
        fake.close()
