"""`actex fleet --executor ray` on a real local Ray cluster (2 CPUs, one per module).

A worker actor SIGKILLed mid-run is restarted by Ray, a worker process stopped by SIGTERM
has its task retried by Ray, and the run completes, every chunk once, equal to one worker's
output; a worker that exits 2 is not restarted and the fleet exits 2. The run has 96
one-sample chunks so that work is left when the restarts happen on a warm compile cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
from engine_fixtures import jax_cache, tiny_model_dir  # noqa: F401 (fixtures)
from fleet_fixtures import WORKER_ENV, check_run, fleet_case, write_config

from actex.fleet.local import actex_command
from actex.fleet.monitor import run_complete
from actex.store.commits import read_heartbeats
from actex.store.folder import open_store

ray = pytest.importorskip("ray")

CHUNKS = 96


@pytest.fixture(scope="module")
def ray_address(jax_cache):  # noqa: F811
    """A local 2-CPU cluster; actors inherit this environment (compile cache, one XLA thread)."""
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    # Servers other modules started (session fixtures) are not Ray's: only what appears from here on is.
    already = {p.pid for p in psutil.Process().children(recursive=True)}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ours = [p for p in psutil.Process().children(recursive=True) if p.pid not in already]
        ray.shutdown()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        gone, alive = psutil.wait_procs(ours, timeout=20)
        assert not alive, f"left behind: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def case(tiny_model_dir, tmp_path_factory):  # noqa: F811
    return fleet_case(tiny_model_dir, tmp_path_factory.mktemp("ray"), CHUNKS)


def fleet(address: str, workers: int, config, *extract_args: str, max_restarts: int = 5) -> subprocess.Popen:
    argv = [*actex_command(), "fleet", "--executor", "ray", "--address", address, "--workers", str(workers),
            "--worker-resources", '{"CPU": 0.5}', "--max-restarts", str(max_restarts),
            "--", "--config", str(config), "--lease-seconds", "4", "--log-json", *extract_args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAY_DEDUP_LOGS": "0"})


def finish(process: subprocess.Popen, timeout_s: float) -> str:
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"fleet not done after {timeout_s:.0f} s:\n{output[-4000:]}") from None
    return output


def actor_processes() -> dict[int, psutil.Process]:
    """This machine's ExtractWorker actor processes (Ray titles them ray::ExtractWorker...)."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        if "ray::ExtractWorker" in " ".join(process.info["cmdline"] or []):
            found[process.pid] = process
    return found


def busy_workers(store) -> list[psutil.Process]:
    """Live worker processes that committed a chunk (a heartbeat's name ends in its pid)."""
    if not store.exists("run.json"):
        return []
    found = []
    for name, beat in read_heartbeats(store).items():
        pid = int(name.rsplit("-", 1)[1])
        if beat.get("chunks_done", 0) >= 1 and psutil.pid_exists(pid):
            found.append(psutil.Process(pid))
    return found


def wait_for(condition, process: subprocess.Popen, deadline: float):
    """condition()'s first true value, polled while the fleet runs; None if it never came."""
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if value := condition():
                return value
        except psutil.NoSuchProcess:  # a worker exited between listing and asking: poll again
            pass
        time.sleep(0.05)
    return None


def test_killed_actor_is_restarted_by_ray_and_the_run_completes_once(ray_address, case, tmp_path):
    fields, reference = case
    output = str(tmp_path / "out")
    url = f"{output}/{fields['run_name']}"
    process = fleet(ray_address, 3, write_config(tmp_path / "run.yaml", {**fields, "output": output}))
    store = open_store(url)
    deadline = time.monotonic() + 240  # a loaded machine: the whole run has taken 119 s

    # SIGKILL the actor (not its worker process) of the first worker to commit a chunk.
    first = wait_for(lambda: busy_workers(store), process, deadline)
    assert first, "no worker committed a chunk in time"
    before = actor_processes()
    killed = first[0].ppid()
    assert killed in before, (killed, before)
    os.kill(killed, signal.SIGKILL)
    # SIGTERM another worker process, as a pre-emption notice would: it exits 75, and Ray
    # retries its actor's task, which starts a new worker in the same actor.
    other = wait_for(lambda: [w for w in busy_workers(store) if w.ppid() != killed and w.ppid() in before], process, deadline)
    assert other, "no second busy worker"
    stopped, its_actor = other[0].pid, before[other[0].ppid()]
    other[0].send_signal(signal.SIGTERM)

    # Ray restarts the killed actor in a new process and retries its `run`: a new worker.
    # (A new actor process is the evidence: it lives until the fleet ends, whereas its worker
    # may already be gone when the other workers finished the run meanwhile.)
    restarted = wait_for(lambda: [p for pid, p in actor_processes().items() if pid not in before], process, deadline)
    retried = wait_for(lambda: [c for c in its_actor.children() if c.pid != stopped], process, deadline)
    log = finish(process, 150)
    assert restarted, log[-4000:]
    assert retried, log[-4000:]
    assert process.returncode == 0, log[-4000:]
    assert "run complete" in log
    assert check_run(url, {}, reference).chunks == CHUNKS  # every chunk once, equal to one worker
    assert run_complete(store)


def test_worker_exiting_2_is_not_restarted_and_the_fleet_exits_2(ray_address, case, tmp_path):
    fields, _ = case
    config = write_config(tmp_path / "run.yaml", {**fields, "output": str(tmp_path / "out")})
    started = time.monotonic()
    # A bad value fails in every worker the same way: retrying would only loop. Were exit 2
    # retried like 1 or 75, the fleet would give up after 3 retries and exit 1.
    process = fleet(ray_address, 1, config, "--chunk-size", "many", max_restarts=3)
    log = finish(process, 90)
    assert process.returncode == 2, log[-4000:]
    assert "exited with 2 (bad arguments or config); not restarting" in log
    assert not (tmp_path / "out").exists()
    assert time.monotonic() - started < 90
