"""Zero-setup, pinned worker bootstrap: the startup script a fleet VM runs at every boot.

Trust: the deployer is trusted; workers, and anyone else who can write the bucket, are not.
So nothing executable or configuring is read back from the bucket unchecked: a deploy writes
content-addressed files next to the run (never inside it), under a prefix workers cannot
write (docs/tpu-fleet.md, "Permissions"):

    <output>/<run_name>-fleet/configs/<sha256>/run.yaml          the run's config, as the deployer resolved it
    <output>/<run_name>-fleet/wheels/<sha256>/actex-<v>-....whl  the deployer's own actex (unless an image is used)
    <output>/<run_name>-fleet/locks/<sha256>/tpu-gcs.lock       every dependency of that wheel, with its sha256s

and the startup script, generated from the deployer's own `DeployRecord` (kept on the
deployer's machine, never fetched from the bucket), carries their sha256s. At boot it installs
exactly that wheel and the lock's packages (`pip install --require-hashes`: a package whose
bytes are not the locked ones fails the install; `make lock` writes the lock) into a venv,
marked installed only once the install succeeded (a half install is redone), retrying with
backoff; or runs the given container image (pinned by digest). At every (re)launch it fetches run.yaml and starts no worker
unless its sha256 is the deployed one. It supervises `actex extract --claim` on the run:
restarted after a crash (exit 1) or a pre-emption stop (75) after a pause that grows with each
failure (with jitter), stopped for good on exit 0 (the run is complete) or 2 (bad config).
When the `actex-launch` metadata key changes (how the monitor relaunches a hung worker, and a
redeploy delivers new pins, without ssh) it stops the worker and runs the VM's current
`startup-script` metadata again. Logs go to $ACTEX_HOME/worker.log; the heartbeat goes to the
store, under the worker id `<node name>-<pid>` (ACTEX_WORKER_HOST).

For tests (and VMs prepared by hand) `ACTEX_VENV=<venv holding actex>` skips the install.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import yaml

import actex
from actex.fleet.tpu import NODE_KEY

LAUNCH_KEY = "actex-launch"  # bumping it relaunches the worker (see the supervisor loop)
SCRIPT_KEY = "startup-script"  # GCE runs this metadata value at every boot
CONFIG_FILE = "run.yaml"


def deploy_dir(run_url: str) -> str:
    """Where a fleet's config and wheel live: beside the run, so gc and deletes of the
    fleet never touch the run itself."""
    return f"{run_url.rstrip('/')}-fleet"


@dataclass(frozen=True)
class Payload:
    """What the VMs install: a wheel in the store with the hash lock of its dependencies
    (each with its sha256), or an image reference pinned by digest."""

    wheel_url: str | None = None
    wheel_sha256: str | None = None
    image: str | None = None
    lock_url: str | None = None
    lock_sha256: str | None = None

    def __post_init__(self) -> None:
        if (self.wheel_url is None) == (self.image is None):
            raise ValueError("a fleet installs either a wheel or an image, exactly one")
        if self.wheel_url is not None and not (self.wheel_sha256 and self.lock_url and self.lock_sha256):
            raise ValueError("a wheel is installed with its sha256 and a hash lock of its dependencies (lock_url, lock_sha256): "
                             "run actex deploy again")


def actex_version() -> str:
    return metadata.version("actex")


VM_LOCK = Path("requirements") / "tpu-gcs.lock"  # in the source tree: what a TPU VM installs beside the wheel


def source_root(wanted: str) -> Path:
    """The source checkout of the actex this process runs. ValueError if it is not one,
    naming the fleet file field (`wanted`) to give instead."""
    root = Path(actex.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists():
        raise ValueError(f"actex at {root} is not a source checkout: give the fleet file {wanted}")
    return root


def default_lock() -> Path:
    """requirements/tpu-gcs.lock of this actex's source tree (`make lock` writes it).
    ValueError (one line) when there is none."""
    lock = source_root("a `lock:` path") / VM_LOCK
    if not lock.exists():
        raise ValueError(f"{lock} does not exist: run `make lock`, or give the fleet file a `lock:` path")
    return lock


def check_lock(path: Path) -> bytes:
    """A hash lock's bytes; ValueError naming the file when a requirement in it has no
    sha256 (pip --require-hashes would refuse it on every VM, after the deploy)."""
    data = path.read_bytes()
    requirements = [r for r in data.decode(errors="replace").replace("\\\n", " ").splitlines() if r.strip() and not r.lstrip().startswith("#")]
    unhashed = [r.split()[0] for r in requirements if "--hash=sha256:" not in r]
    if not requirements or unhashed:
        raise ValueError(f"{path}: not a hash lock ({'no requirement' if not requirements else f'no --hash for {unhashed[0]}'}): run `make lock`")
    return data


def build_wheel(out_dir: Path) -> Path:
    """Build the wheel of the actex this process runs (its source tree), for a pinned deploy.

    ValueError if this actex is not a source checkout (then give `wheel:` or `image:`)."""
    root = source_root("a `wheel:` path or an `image:`")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out_dir), str(root)],
                   check=True, stdout=subprocess.DEVNULL)
    wheels = sorted(out_dir.glob("actex-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip wheel wrote no actex wheel into {out_dir}")
    return wheels[-1]


def put_addressed(store, folder: str, name: str, data: bytes) -> tuple[str, str]:
    """Write `data` as <folder>/<its sha256>/<name> under the deploy dir `store` (a redeploy
    never overwrites what running VMs are pinned to); returns (url, sha256)."""
    sha = hashlib.sha256(data).hexdigest()
    store.write_bytes(f"{folder}/{sha}/{name}", data)
    return f"{store.url.rstrip('/')}/{folder}/{sha}/{name}", sha


def upload(store, config: dict, wheel: Path | None) -> tuple[str, str, str | None, str | None]:
    """Write run.yaml (and the wheel) under the deploy dir `store`, each named by its sha256;
    returns (config url, config sha256, wheel url, wheel sha256), the wheel's None without one."""
    config_url, config_sha = put_addressed(store, "configs", CONFIG_FILE, yaml.safe_dump(config, sort_keys=True).encode())
    if wheel is None:
        return config_url, config_sha, None, None
    return (config_url, config_sha, *put_addressed(store, "wheels", wheel.name, wheel.read_bytes()))


@dataclass(frozen=True)
class DeployRecord:
    """What a deploy pinned: the deployer keeps it (a file beside the fleet file) and every
    startup script, the monitor's included, is generated from it, never read from the bucket."""

    config_url: str
    config_sha256: str
    payload: Payload
    extract_args: tuple[str, ...] = ()
    hf_token_secret: str | None = None

    def script(self) -> str:
        return startup_script(self.config_url, self.config_sha256, self.payload, extract_args=self.extract_args,
                              hf_token_secret=self.hf_token_secret)

    def to_json(self) -> dict:
        return {"config_url": self.config_url, "config_sha256": self.config_sha256, "payload": asdict(self.payload),
                "extract_args": list(self.extract_args), "hf_token_secret": self.hf_token_secret}

    @classmethod
    def from_json(cls, data: dict) -> DeployRecord:
        """ValueError (one line) when `data` is not a record this version wrote."""
        try:
            return cls(str(data["config_url"]), str(data["config_sha256"]), Payload(**data["payload"]),
                       tuple(str(a) for a in data.get("extract_args", ())), data.get("hf_token_secret"))
        except (KeyError, TypeError) as error:
            # A record of an older actex (a wheel pinned without its hash lock) lands here too.
            raise ValueError(f"not a deploy record of this actex ({type(error).__name__}: {error}): run actex deploy again") from None


# Fetches run.yaml and writes it only if its sha256 is the deployed one (argv: url, sha256).
_FETCH_CONFIG = (
    "import hashlib, sys, fsspec\n"
    "with fsspec.open(sys.argv[1], \"rb\") as f:\n"
    "    data = f.read()\n"
    "if hashlib.sha256(data).hexdigest() != sys.argv[2]:\n"
    "    sys.exit(sys.argv[1] + \": sha256 is not the deployed one: no worker starts with it\")\n"
    f"open(\"{CONFIG_FILE}\", \"wb\").write(data)\n"
)


def startup_script(config_url: str, config_sha256: str, payload: Payload, *, extract_args: tuple[str, ...] = (),
                   hf_token_secret: str | None = None, poll_s: float = 15.0, restart_backoff_s: float = 10.0,
                   max_backoff_s: float = 600.0) -> str:
    """The bash startup script (a few KB; GCE metadata values may be 256 KB). Every value
    from outside this module reaches the shell through shlex.quote.

    hf_token_secret: a Secret Manager secret version read (with the VM's service account)
    into HF_TOKEN at every launch: a token never sits in metadata or run.yaml."""
    q = shlex.quote
    token = "" if not hf_token_secret else f"""
  if ! HF_TOKEN="$(gcloud secrets versions access {q(hf_token_secret)})"; then
    echo {q(f"cannot read the secret {hf_token_secret}")}; fails=$((fails + 1)); pause "$fails"; continue
  fi
  export HF_TOKEN"""
    install = _install_image(payload) if payload.image else _install_wheel(payload)
    args = " ".join(q(a) for a in ("--claim", "--preempted-exit-code", "75", "--log-json", *extract_args))
    return f"""#!/bin/bash
# actex worker bootstrap, written by actex {actex_version()}: runs at every boot of this VM.
set -uo pipefail
MD="${{ACTEX_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1/instance/attributes}}"
md() {{ curl -sf -H 'Metadata-Flavor: Google' "$MD/$1"; }}
# The pause before retry $1: doubling from the base up to a cap, times a random 0.5-1.5, so
# a fleet's VMs that failed together do not all retry together.
pause() {{ sleep "$(awk -v n="$1" -v r="$RANDOM" 'BEGIN {{ d = {restart_backoff_s:g} * 2 ^ (n - 1); if (d > {max_backoff_s:g}) d = {max_backoff_s:g}; print d * (0.5 + r / 32768) }}')"; }}
ACTEX_HOME="${{ACTEX_HOME:-/var/lib/actex}}"
WORK="$ACTEX_HOME/work"
mkdir -p "$WORK" && cd "$WORK" || exit 1
exec >>"$ACTEX_HOME/bootstrap.log" 2>&1
echo "$(date -u +%FT%TZ) boot"
export ACTEX_WORKER_HOST="$(md {NODE_KEY} || hostname)"
{install}
fails=0
while :; do
  # Fetched and checked at every (re)launch: only the deployed config ever reaches a worker.
  if ! "${{PY[@]}}" -c {q(_FETCH_CONFIG)} {q(config_url)} {q(config_sha256)}; then
    echo {q(f"cannot read {config_url} (or not the deployed one)")}; fails=$((fails + 1)); pause "$fails"; continue
  fi{token}
  launch="$(md {LAUNCH_KEY} || echo 0)"
  started=$SECONDS
  "${{ACTEX[@]}}" extract --config {CONFIG_FILE} {args} >>"$ACTEX_HOME/worker.log" 2>&1 &
  pid=$!
  relaunch=0
  waited=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1; waited=$((waited + 1))
    if [ $((waited % {max(1, round(poll_s))})) = 0 ] && [ "$(md {LAUNCH_KEY} || echo "$launch")" != "$launch" ]; then
      echo "$(date -u +%FT%TZ) relaunch asked: stopping worker $pid"
      relaunch=1; kill -TERM "$pid"
    fi
  done
  wait "$pid"; rc=$?
  echo "$(date -u +%FT%TZ) worker $pid exited $rc"
  if [ "$relaunch" = 1 ]; then
    # The VM's startup script as it is now (a redeploy may have pinned a new config or wheel).
    md {SCRIPT_KEY} >"$ACTEX_HOME/startup-script.sh" && exec bash "$ACTEX_HOME/startup-script.sh"
    continue
  fi
  case "$rc" in
    0) echo "run complete"; exit 0 ;;
    2) echo "bad config: not restarting"; exit 2 ;;
  esac
  # A worker that ran a while had a transient failure: start the backoff over.
  [ $((SECONDS - started)) -ge 600 ] && fails=0
  fails=$((fails + 1)); pause "$fails"
done
"""


INSTALLED_MARKER = ".actex-installed"  # in the venv: the wheel's sha256, written once the install succeeded


def _install_wheel(payload: Payload) -> str:
    q = shlex.quote
    wheel = payload.wheel_url.rsplit("/", 1)[-1]
    lock = payload.lock_url.rsplit("/", 1)[-1]
    sha = q(payload.wheel_sha256)
    # The wheel joins the lock as one more hashed requirement: pip --require-hashes then
    # refuses any package (the wheel's own dependencies included) not locked with its bytes.
    wheel_requirement = f"./{wheel}[gcs] --hash=sha256:{payload.wheel_sha256}"
    return f"""install() {{
  rm -rf "$ACTEX_VENV" {q(wheel)} {q(lock)} &&
    gcloud storage cp {q(payload.wheel_url)} {q(wheel)} &&
    gcloud storage cp {q(payload.lock_url)} {q(lock)} &&
    {{ printf '%s\\n' {q(f"{payload.wheel_sha256}  {wheel}")} {q(f"{payload.lock_sha256}  {lock}")} | sha256sum -c - ||
       {{ echo "wheel or lock checksum mismatch"; false; }}; }} &&
    echo {q(wheel_requirement)} >actex.req &&
    python3 -m venv "$ACTEX_VENV" &&
    "$ACTEX_VENV/bin/pip" install -q --require-hashes --only-binary=:all: -r {q(lock)} -r actex.req &&
    echo {sha} >"$ACTEX_VENV/{INSTALLED_MARKER}"
}}
if [ -z "${{ACTEX_VENV:-}}" ]; then
  ACTEX_VENV="$ACTEX_HOME/venv"
  tries=0
  # Installed means the marker holds this wheel's sha256: a half install (pre-empted, pip
  # failed) has none and is done again.
  until [ "$(cat "$ACTEX_VENV/{INSTALLED_MARKER}" 2>/dev/null)" = {sha} ]; do
    [ "$tries" -gt 0 ] && {{ echo "install failed (try $tries)"; pause "$tries"; }}
    tries=$((tries + 1)); install
  done
fi
ACTEX=("$ACTEX_VENV/bin/actex"); PY=("$ACTEX_VENV/bin/python")"""


def _install_image(payload: Payload) -> str:
    image = shlex.quote(payload.image)
    return f"""if [ -n "${{ACTEX_VENV:-}}" ]; then
  ACTEX=("$ACTEX_VENV/bin/actex"); PY=("$ACTEX_VENV/bin/python")
else
  tries=0
  until docker pull {image}; do tries=$((tries + 1)); echo "docker pull failed (try $tries)"; pause "$tries"; done
  # The image's user (not root) writes run.yaml into the work dir.
  chown "$(docker image inspect -f '{{{{.Config.User}}}}' {image})" "$WORK" 2>/dev/null || chmod 1777 "$WORK"
  # The TPU chips, not --privileged: /dev/accel* (v4 and older) or /dev/vfio/* (v5e and newer).
  DEVICES=()
  for dev in /dev/accel* /dev/vfio/*; do [ -e "$dev" ] && DEVICES+=(--device "$dev:$dev"); done
  # Host network: the metadata server and the bucket as the VM reaches them; nothing listens.
  RUN=(docker run --rm --net=host "${{DEVICES[@]}}" -v "$WORK:$WORK" -w "$WORK" -e ACTEX_WORKER_HOST -e HF_TOKEN)
  ACTEX=("${{RUN[@]}}" {image}); PY=("${{RUN[@]}}" --entrypoint python {image})
fi"""
