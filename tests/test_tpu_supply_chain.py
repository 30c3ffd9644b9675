"""What a fleet's VMs install is pinned before the deploy writes anything: an image tag is
resolved to its digest once (a fake OCI registry on 127.0.0.1, asking for a bearer token as
Docker Hub and ghcr.io do) and only the digest reaches the VMs; a wheel deploy ships the
source tree's hash lock, content-addressed, and a lock without hashes is refused. And
`actex tpu recreate` of a deployed fleet boots its VMs with the deploy record's script, or
refuses in one line."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading

import pytest
import yaml
from fake_tpu_server import fake_tpu  # noqa: F401 (fixture)
from typer.testing import CliRunner

from actex.cli import app
from actex.fleet.deploy import load_fleet, load_record
from actex.fleet.registry import parse_image, resolve_digest
from actex.fleet.tpu_api import TpuApi

ZONE = "us-central1-a"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}).encode()
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


class _Registry(http.server.BaseHTTPRequestHandler):
    """/v2/actex/manifests/v1 exists; manifests need the token that /token hands out."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/token?"):
            return self._answer(200, json.dumps({"token": "pull-token"}).encode())
        if self.headers.get("Authorization") != "Bearer pull-token":
            realm = f"http://127.0.0.1:{self.server.server_port}/token"
            return self._answer(401, b"{}", {"WWW-Authenticate": f'Bearer realm="{realm}",service="fake",scope="repository:actex:pull"'})
        if self.path == "/v2/actex/manifests/v1":
            return self._answer(200, MANIFEST, {"Docker-Content-Digest": DIGEST})
        return self._answer(404, b'{"errors": [{"code": "MANIFEST_UNKNOWN"}]}')

    def _answer(self, code: int, body: bytes, headers: dict | None = None):
        self.send_response(code)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def registry():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _fleet_file(tmp_path, **fields):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"project": "p", "zones": [ZONE], "accelerator_type": "v4-8", "runtime_version": "rt",
                                    "service_account": "w@p.iam.gserviceaccount.com",
                                    "extract": {"output": str(tmp_path / "runs"), "run_name": "r"}, **fields}))
    return path


def _deploy(path, endpoint, *args):
    return CliRunner().invoke(app, ["deploy", str(path), "--create", "--api-endpoint", endpoint, *args])


def test_image_references_are_read_as_docker_reads_them():
    hub = parse_image("ubuntu")
    assert (hub.host, hub.repository, hub.tag, hub.digest) == ("registry-1.docker.io", "library/ubuntu", "latest", None)
    assert parse_image("you/actex:v1").repository == "you/actex"
    local = parse_image("127.0.0.1:5000/team/actex:v1")
    assert (local.name, local.host, local.repository, local.tag) == ("127.0.0.1:5000/team/actex", "127.0.0.1:5000", "team/actex", "v1")
    pinned = f"ghcr.io/you/actex@{DIGEST}"
    assert resolve_digest(pinned) == pinned  # a digest is asked of no registry
    for bad in ("Ghcr.io/You/Actex:V1 x", "you/Actex:v1", "actex:-v1", "actex@sha256:12"):
        with pytest.raises(ValueError, match="is not an image reference"):
            parse_image(bad)


def test_a_tag_is_resolved_once_and_only_its_digest_reaches_the_vms(fake_tpu, registry, tmp_path):  # noqa: F811
    image = f"127.0.0.1:{registry.server_port}/actex"
    path = _fleet_file(tmp_path, image=f"{image}:v1")
    result = _deploy(path, fake_tpu.endpoint)
    assert result.exit_code == 0, result.output
    assert f"image {image}:v1 resolved to {image}@{DIGEST}" in result.stderr
    script = fake_tpu.node(ZONE, "tpu-us-central1-a-0").body["metadata"]["startup-script"]
    assert f"docker pull {image}@{DIGEST}" in script and ":v1" not in script
    assert load_record(load_fleet(path)).payload.image == f"{image}@{DIGEST}"
    manifests = [auth for where, auth in registry.seen if where.startswith("/v2/")]
    assert manifests == [None, "Bearer pull-token"]  # asked once (after the token), by no other command
    assert "pull-token" not in result.output + path.with_name("fleet.yaml.deploy.json").read_text()


def test_an_unresolvable_tag_is_refused_in_one_line_before_anything_is_written(fake_tpu, registry, tmp_path):  # noqa: F811
    path = _fleet_file(tmp_path, image=f"127.0.0.1:{registry.server_port}/actex:no-such-tag")
    result = _deploy(path, fake_tpu.endpoint)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "cannot resolve its tag to a digest (no such tag)" in result.stderr, result.stderr
    gone = _fleet_file(tmp_path, image="127.0.0.1:9/actex:v1")  # nothing listens there
    result = _deploy(gone, fake_tpu.endpoint)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "cannot resolve its tag" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists() and not path.with_name("fleet.yaml.deploy.json").exists()
    assert TpuApi("p", api_endpoint=fake_tpu.endpoint).list(ZONE) == []


def test_a_wheel_deploy_ships_the_hash_lock_and_refuses_one_without_hashes(fake_tpu, tmp_path):  # noqa: F811
    wheel = tmp_path / "actex-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"a wheel")
    unhashed = tmp_path / "loose.lock"
    unhashed.write_text("jax==0.10.2\n")
    refused = _deploy(_fleet_file(tmp_path, wheel=wheel.name, lock=unhashed.name), fake_tpu.endpoint)
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.output
    assert "loose.lock: not a hash lock (no --hash for jax==0.10.2): run `make lock`" in refused.stderr
    assert not (tmp_path / "runs").exists()

    path = _fleet_file(tmp_path, wheel=wheel.name)  # the source tree's requirements/tpu-gcs.lock
    result = _deploy(path, fake_tpu.endpoint)
    assert result.exit_code == 0, result.output
    payload = load_record(load_fleet(path)).payload
    shipped = (tmp_path / "runs" / "r-fleet" / "locks" / payload.lock_sha256 / "tpu-gcs.lock").read_bytes()
    assert hashlib.sha256(shipped).hexdigest() == payload.lock_sha256 and b"libtpu==" in shipped
    script = fake_tpu.node(ZONE, "tpu-us-central1-a-0").body["metadata"]["startup-script"]
    assert payload.lock_url in script and "--require-hashes" in script


def test_recreate_of_a_deployed_fleet_uses_its_record_or_refuses_in_one_line(fake_tpu, tmp_path):  # noqa: F811
    path = _fleet_file(tmp_path, image=f"example/actex@{DIGEST}", workers_per_zone=2)
    assert _deploy(path, fake_tpu.endpoint).exit_code == 0
    api = TpuApi("p", api_endpoint=fake_tpu.endpoint, poll_initial_s=0.05)
    script = load_record(load_fleet(path)).script()
    api.delete(ZONE, "tpu-us-central1-a-1")  # NOT_FOUND: no metadata of its own to keep
    runner = CliRunner(env={"ACTEX_TPU_API_ENDPOINT": fake_tpu.endpoint})
    recreated = runner.invoke(app, ["tpu", "recreate", "--fleet", str(path)])
    assert recreated.exit_code == 0, recreated.output
    assert api.get(ZONE, "tpu-us-central1-a-1").metadata["startup-script"] == script

    # Elsewhere (no record beside the fleet file) with no VM left to take a script from.
    path.with_name("fleet.yaml.deploy.json").unlink()
    for name in ("tpu-us-central1-a-0", "tpu-us-central1-a-1"):
        api.delete(ZONE, name)
    refused = runner.invoke(app, ["tpu", "recreate", "--fleet", str(path)])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.output
    assert "no startup script to recreate it with (no deploy record" in refused.stderr and "actex deploy" in refused.stderr
    assert api.list(ZONE) == []  # nothing created


def test_a_record_pinning_a_wheel_without_its_lock_is_refused_naming_the_fix(tmp_path):
    """A deploy record of an older actex (wheel + jax version, no lock) would install unlocked."""
    path = _fleet_file(tmp_path)
    record = {"config_url": f"{tmp_path}/runs/r-fleet/configs/0/run.yaml", "config_sha256": "0" * 64,
              "payload": {"wheel_url": "gs://b/w.whl", "wheel_sha256": "1" * 64, "image": None, "jax_version": "0.10.2"}}
    path.with_name("fleet.yaml.deploy.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="fleet.yaml.deploy.json: not a deploy record of this actex .*: run actex deploy again"):
        load_record(load_fleet(path))
    record["payload"] = {"wheel_url": "gs://b/w.whl", "wheel_sha256": "1" * 64}
    path.with_name("fleet.yaml.deploy.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="hash lock of its dependencies .*: run actex deploy again"):
        load_record(load_fleet(path))
