"""The startup script's supervisor, run for real by a fake VM: it fetches run.yaml from the
store, names the worker after the node, restarts a worker that failed, relaunches it when
`actex-launch` changes, and stops for good when the worker exits 0. The worker is a stand-in
`actex` (a shell script) whose exit codes the test scripts; everything else is real.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml
from engine_fixtures import jax_cache, tiny_model_dir  # noqa: F401 (fixtures)
from fake_tpu_server import FakeTpu

from actex.fleet.bootstrap import Payload, put_addressed, startup_script, upload
from actex.fleet.deploy import load_fleet
from actex.fleet.tpu_api import NodeSpec, TpuApi
from actex.store.folder import open_store

ZONE, NODE = "us-central1-a", "tpu-us-central1-a-0"

# One line per run: "<ACTEX_WORKER_HOST> <args...>"; exit with the next code of codes.txt
# ("hang": wait to be stopped, and say so).
FAKE_ACTEX = """#!/bin/bash
echo "$ACTEX_WORKER_HOST $*" >> "$CALLS"
code=$(head -n1 "$CODES"); sed -i 1d "$CODES"
if [ "$code" = hang ]; then trap 'echo stopped >> "$CALLS"; exit 75' TERM; while :; do sleep 0.1; done; fi
exit "$code"
"""


@pytest.fixture
def venv(tmp_path):
    """A venv stand-in: the real python (the script reads run.yaml with it), a fake actex."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "actex").write_text(FAKE_ACTEX)
    for tool in ("python", "actex"):
        (bin_dir / tool).chmod(0o755)
    return tmp_path / "venv"


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(what)


def test_supervisor_restarts_relaunches_and_stops_when_done(venv, tmp_path):
    calls, codes = tmp_path / "calls.txt", tmp_path / "codes.txt"
    codes.write_text("1\nhang\n0\n")  # crash, then hang until relaunched, then finish
    config_url, config_sha, _, _ = upload(open_store(str(tmp_path / "runs" / "r-fleet")), {"run_name": "r"}, None)
    script = startup_script(config_url, config_sha, Payload(image="example/actex:1"), extract_args=("--lease-seconds", "9"),
                            poll_s=1, restart_backoff_s=0.1)
    fake = FakeTpu(vm_env=lambda node: {"ACTEX_VENV": str(venv), "CALLS": str(calls), "CODES": str(codes)},
                   workdir=tmp_path / "vms", create_s=0.1)
    try:
        api = TpuApi("p", api_endpoint=fake.endpoint, poll_initial_s=0.05)
        api.create(ZONE, NODE, NodeSpec("v4-8", "rt", metadata={"startup-script": script, "actex-launch": "0", "actex-node": NODE}))
        _wait(lambda: calls.exists() and len(calls.read_text().splitlines()) == 2, 20, "a restart after exit 1")
        api.set_metadata(ZONE, NODE, {**api.get(ZONE, NODE).metadata, "actex-launch": "1"})
        process = fake.node(ZONE, NODE).process
        process.wait(timeout=20)
    finally:
        fake.close()
    runs = calls.read_text().splitlines()
    expected = f"{NODE} extract --config run.yaml --claim --preempted-exit-code 75 --log-json --lease-seconds 9"
    assert runs == [expected, expected, "stopped", expected]
    assert process.returncode == 0  # the worker said the run is complete: no restart
    home = tmp_path / "vms" / f"{ZONE}-{NODE}-1"
    assert (home / "work" / "run.yaml").read_text() == "run_name: r\n"
    assert "relaunch asked" in (home / "bootstrap.log").read_text()


def test_bad_config_exit_is_not_restarted(venv, tmp_path):
    calls, codes = tmp_path / "calls.txt", tmp_path / "codes.txt"
    codes.write_text("2\n0\n")
    config_url, config_sha, _, _ = upload(open_store(str(tmp_path / "d")), {}, None)
    script = startup_script(config_url, config_sha, Payload(wheel_url="gs://b/w/actex-0.1.0-py3-none-any.whl", wheel_sha256="0" * 64,
                                                                      lock_url="gs://b/l/tpu-gcs.lock", lock_sha256="1" * 64),
                            poll_s=1, restart_backoff_s=0.1)
    fake = FakeTpu(vm_env=lambda node: {"ACTEX_VENV": str(venv), "CALLS": str(calls), "CODES": str(codes)}, workdir=tmp_path / "vms", create_s=0.1)
    try:
        TpuApi("p", api_endpoint=fake.endpoint, poll_initial_s=0.05).create(ZONE, NODE, NodeSpec("v4-8", "rt", metadata={"startup-script": script}))
        process = fake.node(ZONE, NODE).process
        process.wait(timeout=20)
    finally:
        fake.close()
    assert process.returncode == 2 and len(calls.read_text().splitlines()) == 1


def test_wheel_install_is_pinned_by_checksum_and_hash_lock():
    script = startup_script("gs://b/r-fleet/configs/0/run.yaml", "0" * 64, Payload(wheel_url="gs://b/r-fleet/wheels/actex-0.1.0-py3-none-any.whl",
                                                             wheel_sha256="ab" * 32, lock_url="gs://b/r-fleet/locks/cd/tpu-gcs.lock",
                                                             lock_sha256="cd" * 32))
    assert "gcloud storage cp gs://b/r-fleet/wheels/actex-0.1.0-py3-none-any.whl actex-0.1.0-py3-none-any.whl" in script
    assert "gcloud storage cp gs://b/r-fleet/locks/cd/tpu-gcs.lock tpu-gcs.lock" in script
    assert f"printf '%s\\n' '{'ab' * 32}  actex-0.1.0-py3-none-any.whl' '{'cd' * 32}  tpu-gcs.lock' | sha256sum -c -" in script
    # jax[tpu] and every other dependency come from the lock, each checked by its sha256.
    assert f"echo './actex-0.1.0-py3-none-any.whl[gcs] --hash=sha256:{'ab' * 32}' >actex.req" in script
    assert "pip\" install -q --require-hashes --only-binary=:all: -r tpu-gcs.lock -r actex.req" in script
    assert "jax-releases" not in script and "jax[tpu]" not in script
    assert not re.search(r"\|\s*(ba)?sh\b", script) and "github" not in script  # no script piped from a branch


@pytest.mark.parametrize("change, message", [
    ({"zones": []}, "fleet.yaml: zones: List should have at least 1 item"),
    ({"zones": ["central"]}, "fleet.yaml: zones: zone 'central' is not a GCP zone name"),
    ({"capacity": "cheap"}, "fleet.yaml: capacity: Input should be 'spot', 'preemptible', 'reserved' or 'on-demand'"),
    ({"workers": 3}, "fleet.yaml: workers: Extra inputs are not permitted"),
    ({"extract": {"output": "gs://b/runs"}}, "fleet.yaml: extract: a fleet's run needs a fixed `run_name`"),
    ({"image": "Example/Actex:latest"}, "fleet.yaml: image: 'Example/Actex:latest' is not an image reference"),
])
def test_fleet_file_errors_name_file_and_field(tmp_path, change, message):
    from typer.testing import CliRunner

    from actex.cli import app

    fleet = {"project": "p", "zones": ["us-central1-a"], "accelerator_type": "v4-8", "runtime_version": "rt",
             "extract": {"output": "gs://b/runs", "run_name": "r"}}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({**fleet, **change}))
    with pytest.raises(ValueError) as error:
        load_fleet(path)
    assert str(error.value).replace(str(tmp_path) + os.sep, "").startswith(message)
    result = CliRunner().invoke(app, ["deploy", str(path), "--api-endpoint", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("actex: error: "), shlex.quote(result.stderr)


# Names a shell would read as code (or that end a quoted string), and a line break.
HOSTILE_RUN_NAMES = ["x$(touch pwned)", "x`touch pwned`", 'x"y', "x'y", "x\ny", "x\n", "x;id", "-x"]


@pytest.mark.parametrize("command", ["extract", "generate"])
def test_run_names_a_shell_would_read_are_refused_by_extract_and_generate(command, tiny_model_dir, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from actex.cli import app

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a b c"}\n')
    for name in HOSTILE_RUN_NAMES:
        result = CliRunner().invoke(app, [command, "--model", str(tiny_model_dir), "--dataset", str(data), "--format", "text",
                                          "--output", str(tmp_path / "runs"), "--run-name", name, "--hooks", "blocks.0.hook_resid_post"])
        assert result.exit_code == 2, (name, result.output)
        assert result.stderr.count("\n") == 1 and "must be one directory name" in result.stderr, shlex.quote(result.stderr)
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("**/pwned"))


def test_run_names_a_shell_would_read_are_refused_by_deploy_before_anything_is_written(tmp_path):
    from typer.testing import CliRunner

    from actex.cli import app

    for name in HOSTILE_RUN_NAMES:
        path = tmp_path / "fleet.yaml"
        path.write_text(yaml.safe_dump({"project": "p", "zones": ["us-central1-a"], "accelerator_type": "v4-8", "runtime_version": "rt",
                                        "extract": {"output": str(tmp_path / "runs"), "run_name": name}}))
        result = CliRunner().invoke(app, ["deploy", str(path), "--create", "--api-endpoint", "http://127.0.0.1:9"])
        assert result.exit_code == 2, (name, result.output)
        assert result.stderr.count("\n") == 1 and "extract: run_name: " in result.stderr, shlex.quote(result.stderr)
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("**/pwned"))


def test_a_url_that_a_shell_would_expand_is_only_ever_text_in_the_script(venv, tmp_path):
    """The config fetch fails (no such file): the line saying so must not run the URL."""
    url = f"{tmp_path}/x$(touch pwned)`touch pwned2`\"/run.yaml"
    script = startup_script(url, "0" * 64, Payload(image="example/actex:1"), restart_backoff_s=0.1)
    home = tmp_path / "home"
    env = {**os.environ, "ACTEX_VENV": str(venv), "ACTEX_HOME": str(home), "ACTEX_METADATA_URL": "http://127.0.0.1:9"}
    process = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, start_new_session=True)
    try:
        _wait(lambda: (home / "bootstrap.log").exists() and "cannot read" in (home / "bootstrap.log").read_text(), 20, "a failed fetch")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not list(tmp_path.glob("**/pwned*")), (home / "bootstrap.log").read_text()
    assert f"cannot read {url}" in (home / "bootstrap.log").read_text()


def test_a_tampered_bucket_reaches_neither_a_recreated_vm_nor_its_worker(venv, tmp_path, gcs_emulator):
    """Anyone who can write the bucket rewrites every run.yaml and startup script in the
    deploy dir; a VM then pre-empted is recreated by the monitor with the deployer's script,
    and its worker is not started with the rewritten config."""
    from typer.testing import CliRunner

    from actex.cli import app
    from actex.fleet.deploy import load_record
    from actex.fleet.local import actex_command
    from servers import create_gcs_bucket

    calls, codes = tmp_path / "calls.txt", tmp_path / "codes.txt"
    codes.write_text("hang\n" * 5)
    bucket = create_gcs_bucket(gcs_emulator)
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump({
        "project": "p", "zones": [ZONE], "accelerator_type": "v4-8", "runtime_version": "rt",
        "image": "example/actex@sha256:" + "0" * 64, "extract": {"output": bucket, "run_name": "r", "model": "m"}}))
    env = {**gcs_emulator.env, "ACTEX_VENV": str(venv), "CALLS": str(calls), "CODES": str(codes)}
    fake = FakeTpu(vm_env=lambda node: env, workdir=tmp_path / "vms", create_s=0.1)
    monitor = None
    try:
        deployed = CliRunner().invoke(app, ["deploy", str(fleet_file), "--create", "--api-endpoint", fake.endpoint])
        assert deployed.exit_code == 0, deployed.output
        _wait(lambda: calls.exists() and calls.read_text().count("\n") == 1, 20, "the deployed worker's start")
        deploy_dir = open_store(f"{bucket}/r-fleet")
        for rel in deploy_dir.list():
            if rel.endswith("run.yaml"):
                deploy_dir.write_bytes(rel, b"run_name: r\nmodel: /etc\n")
        deploy_dir.write_bytes("startup-script.sh", b'#!/bin/bash\ntouch "$ACTEX_HOME/pwned"\n')
        fake.preempt(ZONE, NODE)
        monitor = subprocess.Popen([*actex_command(), "monitor", str(fleet_file), "--interval", "0.2", "--api-endpoint", fake.endpoint],
                                   env={**os.environ, **gcs_emulator.env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        home = tmp_path / "vms" / f"{ZONE}-{NODE}-2"
        log = home / "bootstrap.log"
        _wait(lambda: (home / "pwned").exists() or (log.exists() and "not the deployed one" in log.read_text()), 60, "the recreated VM's boot")
        monitor.send_signal(signal.SIGINT)
        monitor.communicate(timeout=30)
        script = fake.node(ZONE, NODE).body["metadata"]["startup-script"]
    finally:
        if monitor is not None and monitor.poll() is None:
            monitor.kill()
            monitor.wait()
        fake.close()
    assert not (home / "pwned").exists()
    assert script == load_record(load_fleet(fleet_file)).script()
    assert calls.read_text().count("\n") == 1 and not (home / "work" / "run.yaml").exists()  # the rewritten config never ran


# Stand-ins for a TPU VM's tools: `gcloud storage cp` copies a local file, `gcloud secrets`
# prints a token; `python3 -m venv` makes a venv whose pip fails its first install ("$FAILS"
# holds how many installs fail) and then puts a stand-in actex in place.
STUB_GCLOUD = """#!/bin/bash
case "$1" in
  storage) cp "$3" "$4" ;;
  secrets) echo "hf_from_secret_manager" ;;
esac
"""
STUB_PYTHON3 = r"""#!/bin/bash
[ "$1 $2" = "-m venv" ] || exit 9
mkdir -p "$3/bin"
cat > "$3/bin/pip" <<PIP
#!/bin/bash
echo "\$*" >> "$INSTALLS"
fails=\$(cat "$FAILS"); [ "\$fails" -gt 0 ] && { echo \$((fails - 1)) > "$FAILS"; exit 1; }
printf '#!/bin/bash\necho "token=\$HF_TOKEN \$*" >> "$CALLS"\n' > "$3/bin/actex"
printf '#!/bin/sh\nexec "$REAL_PYTHON" "\$@"\n' > "$3/bin/python"
chmod +x "$3/bin/actex" "$3/bin/python"
PIP
chmod +x "$3/bin/pip"
"""


def test_a_half_installed_venv_is_installed_again_retrying_a_failed_install(tmp_path):
    """A pre-emption mid-install left a venv with bin/actex but no install marker: the boot
    installs again (a pip failure is retried) and the worker gets its token from the secret."""
    from actex.fleet.bootstrap import INSTALLED_MARKER

    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("gcloud", STUB_GCLOUD), ("python3", STUB_PYTHON3)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    wheel = tmp_path / "actex-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"a wheel")
    deploy = open_store(str(tmp_path / "deploy"))
    config_url, config_sha, wheel_url, wheel_sha = upload(deploy, {"run_name": "r"}, wheel)
    lock_url, lock_sha = put_addressed(deploy, "locks", "tpu-gcs.lock", b"jax==0.10.2 --hash=sha256:" + b"0" * 64 + b"\n")
    payload = Payload(wheel_url=wheel_url, wheel_sha256=wheel_sha, lock_url=lock_url, lock_sha256=lock_sha)
    script = startup_script(config_url, config_sha, payload, restart_backoff_s=0.05,
                            hf_token_secret="projects/p/secrets/hf/versions/latest")
    home = tmp_path / "home"
    (home / "venv" / "bin").mkdir(parents=True)
    (home / "venv" / "bin" / "actex").write_text("#!/bin/bash\nexit 99\n")  # the half install
    (home / "venv" / "bin" / "actex").chmod(0o755)
    calls, installs, fails = tmp_path / "calls.txt", tmp_path / "installs.txt", tmp_path / "fails.txt"
    fails.write_text("1\n")
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "ACTEX_HOME": str(home), "ACTEX_METADATA_URL": "http://127.0.0.1:9",
           "CALLS": str(calls), "INSTALLS": str(installs), "FAILS": str(fails), "REAL_PYTHON": sys.executable}
    env.pop("ACTEX_VENV", None)
    try:
        returncode = subprocess.run(["bash", "-c", script], env=env, timeout=30).returncode
    except subprocess.TimeoutExpired:
        returncode = None
    log = (home / "bootstrap.log").read_text()
    assert returncode == 0, log  # the stand-in worker exits 0: the run is complete
    assert len(installs.read_text().splitlines()) == 2 and "install failed (try 1)" in log, log
    assert all(line.endswith("--require-hashes --only-binary=:all: -r tpu-gcs.lock -r actex.req") for line in installs.read_text().splitlines())
    assert (home / "venv" / INSTALLED_MARKER).read_text().strip() == wheel_sha
    assert calls.read_text().startswith("token=hf_from_secret_manager extract --config run.yaml --claim")
    assert "hf_from_secret_manager" not in script + log
