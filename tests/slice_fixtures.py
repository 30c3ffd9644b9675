"""Local pod slices for tests: N `actex extract` processes joined by real jax.distributed
(coordinator on 127.0.0.1, gloo collectives over CPU devices), each under a hard timeout.

    procs = launch_slice(2, args, devices=2, heartbeat_s=10)
    codes, logs = wait_slice(procs, timeout_s=120)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ACTEX = str(Path(sys.executable).parent / "actex")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_env(devices: int) -> dict[str, str]:
    """This process's environment with `devices` host-platform CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def launch_slice(n: int, args: list[str], *, devices: int, heartbeat_s: float = 10, barrier_s: float = 60,
                 extra: dict[int, list[str]] | None = None, port: int | None = None) -> list[subprocess.Popen]:
    """Start processes 0..n-1 of one slice; extra[i]: more flags for process i only."""
    port = port or free_port()
    procs = []
    for i in range(n):
        argv = [ACTEX, *args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i),
                "--heartbeat-timeout-s", str(heartbeat_s), "--barrier-timeout-s", str(barrier_s), "--init-timeout-s", "60",
                *(extra or {}).get(i, [])]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=device_env(devices), start_new_session=True))
    return procs


def wait_slice(procs: list[subprocess.Popen], timeout_s: float) -> tuple[list[int], list[str]]:
    """Exit codes and outputs; kills every process still running at the deadline (and fails)."""
    deadline = time.monotonic() + timeout_s
    logs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [p.returncode for p in procs], logs


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
