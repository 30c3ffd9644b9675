"""Zero-setup, pinned worker bootstrap: the startup script a fleet VM runs at every boot.

A deploy writes two things next to the run (never inside it):

    <output>/<run_name>-fleet/run.yaml                       the run's config, as the deployer resolved it
    <output>/<run_name>-fleet/wheels/actex-<v>-py3-none-any.whl   the deployer's own actex (unless an image is used)

and sets each VM's `startup-script` metadata to `startup_script(...)`. On boot the script
installs exactly that wheel (its sha256 is in the script) plus `jax[tpu]` at the deployer's
jax version into a venv, or runs a given container image instead, fetches run.yaml, and
supervises `actex extract --claim` on the run: restarted after a crash (exit 1) or a
pre-emption stop (75), stopped for good on exit 0 (the run is complete) or 2 (bad config),
and restarted at once when the `actex-launch` metadata key changes (how the monitor
relaunches a hung worker without ssh). Logs go to $ACTEX_HOME/worker.log; the heartbeat goes
to the store, under the worker id `<node name>-<pid>` (ACTEX_WORKER_HOST).

For tests (and VMs prepared by hand) `ACTEX_VENV=<venv holding actex>` skips the install.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

from actex.fleet.tpu import NODE_KEY

LAUNCH_KEY = "actex-launch"  # bumping it relaunches the worker (see the supervisor loop)
SCRIPT_KEY = "startup-script"  # GCE runs this metadata value at every boot


def deploy_dir(run_url: str) -> str:
    """Where a fleet's config and wheel live: beside the run, so gc and deletes of the
    fleet never touch the run itself."""
    return f"{run_url.rstrip('/')}-fleet"


@dataclass(frozen=True)
class Payload:
    """What the VMs install: a wheel in the store (with its sha256), or an image reference."""

    wheel_url: str | None = None
    wheel_sha256: str | None = None
    image: str | None = None
    jax_version: str = ""

    def __post_init__(self) -> None:
        if (self.wheel_url is None) == (self.image is None):
            raise ValueError("a fleet installs either a wheel or an image, exactly one")


def actex_version() -> str:
    return metadata.version("actex")


def build_wheel(out_dir: Path) -> Path:
    """Build the wheel of the actex this process runs (its source tree), for a pinned deploy.

    ValueError if this actex is not a source checkout (then give `wheel:` or `image:`)."""
    import actex

    root = Path(actex.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists():
        raise ValueError(f"actex at {root} is not a source checkout: give the fleet file a `wheel:` path or an `image:`")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out_dir), str(root)],
                   check=True, stdout=subprocess.DEVNULL)
    wheels = sorted(out_dir.glob("actex-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip wheel wrote no actex wheel into {out_dir}")
    return wheels[-1]


def upload(store, config: dict, wheel: Path | None) -> tuple[str | None, str | None]:
    """Write run.yaml (and the wheel) under the deploy dir `store`; (wheel url, sha256)."""
    store.write_bytes("run.yaml", yaml.safe_dump(config, sort_keys=True).encode())
    if wheel is None:
        return None, None
    data = wheel.read_bytes()
    rel = f"wheels/{wheel.name}"
    store.write_bytes(rel, data)
    return f"{store.url.rstrip('/')}/{rel}", hashlib.sha256(data).hexdigest()


def startup_script(config_url: str, payload: Payload, *, extract_args: tuple[str, ...] = (), poll_s: float = 15.0,
                   restart_backoff_s: float = 10.0) -> str:
    """The bash startup script (a few KB; GCE metadata values may be 256 KB)."""
    q = shlex.quote
    install = _install_image(payload) if payload.image else _install_wheel(payload)
    args = " ".join(q(a) for a in ("--claim", "--preempted-exit-code", "75", "--log-json", *extract_args))
    return f"""#!/bin/bash
# actex worker bootstrap, written by actex {actex_version()}: runs at every boot of this VM.
set -uo pipefail
MD="${{ACTEX_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1/instance/attributes}}"
md() {{ curl -sf -H 'Metadata-Flavor: Google' "$MD/$1"; }}
ACTEX_HOME="${{ACTEX_HOME:-/var/lib/actex}}"
mkdir -p "$ACTEX_HOME" && cd "$ACTEX_HOME" || exit 1
exec >>"$ACTEX_HOME/bootstrap.log" 2>&1
echo "$(date -u +%FT%TZ) boot"
export ACTEX_WORKER_HOST="$(md {NODE_KEY} || hostname)"
{install}
while :; do
  # Fetched at every (re)launch: a redeploy with a new config relaunches with it.
  "${{PY[@]}}" -c 'import sys, fsspec; open("run.yaml", "wb").write(fsspec.open(sys.argv[1], "rb").open().read())' {q(config_url)} \\
    || {{ echo {q(f"cannot read {config_url}")}; sleep {restart_backoff_s:g}; continue; }}
  launch="$(md {LAUNCH_KEY} || echo 0)"
  "${{ACTEX[@]}}" extract --config run.yaml {args} >>"$ACTEX_HOME/worker.log" 2>&1 &
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
  [ "$relaunch" = 1 ] && continue
  case "$rc" in
    0) echo "run complete"; exit 0 ;;
    2) echo "bad config: not restarting"; exit 2 ;;
  esac
  sleep {restart_backoff_s:g}
done
"""


def _install_wheel(payload: Payload) -> str:
    q = shlex.quote
    wheel = payload.wheel_url.rsplit("/", 1)[-1]
    jax = f"jax[tpu]=={payload.jax_version}" if payload.jax_version else "jax[tpu]"
    return f"""if [ -z "${{ACTEX_VENV:-}}" ]; then
  ACTEX_VENV="$ACTEX_HOME/venv"
  if [ ! -x "$ACTEX_VENV/bin/actex" ]; then
    gcloud storage cp {q(payload.wheel_url)} {q(wheel)} || exit 1
    echo {q(f"{payload.wheel_sha256}  {wheel}")} | sha256sum -c - || {{ echo "wheel checksum mismatch"; exit 1; }}
    python3 -m venv "$ACTEX_VENV" && "$ACTEX_VENV/bin/pip" install -q {q(f"./{wheel}[gcs]")} {q(jax)} \\
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html || exit 1
  fi
fi
ACTEX=("$ACTEX_VENV/bin/actex"); PY=("$ACTEX_VENV/bin/python")"""


def _install_image(payload: Payload) -> str:
    image = shlex.quote(payload.image)
    run = 'docker run --rm --net=host --privileged -v "$ACTEX_HOME:$ACTEX_HOME" -w "$ACTEX_HOME" -e ACTEX_WORKER_HOST'
    return f"""if [ -n "${{ACTEX_VENV:-}}" ]; then
  ACTEX=("$ACTEX_VENV/bin/actex"); PY=("$ACTEX_VENV/bin/python")
else
  docker pull {image} || exit 1
  ACTEX=({run} {image}); PY=({run} --entrypoint python {image})
fi"""

