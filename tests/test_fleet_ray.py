"""`actex fleet --executor ray` on a real local Ray cluster (2 CPUs, one per module).

A worker actor SIGKILLed mid-run is restarted by Ray, a worker process stopped by SIGTERM
has its task retried by Ray (both read from the fleet's log afterwards, so no poll can miss
them), and the run completes, every chunk once, equal to one worker's output; a worker that
exits 2 is not restarted and the fleet exits 2. The run has 400 one-sample chunks: enough
that work is left when Ray retries, and that its log lines reach the driver, on an idle machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from engine_fixtures import jax_cache, tiny_model_dir  # noqa: F401 (fixtures)
from fleet_fixtures import WORKER_ENV, check_run, fleet_case, write_config

from actex.fleet.local import actex_command
from actex.fleet.monitor import run_complete
from actex.store.commits import read_commits
from actex.store.folder import open_store

ray = pytest.importorskip("ray")

CHUNKS = 400


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
    """`actex fleet --executor ray`, its output in a file next to the config: a pipe nobody
    reads while the test polls would fill (64 KiB) and block the fleet mid-run."""
    argv = [*actex_command(), "fleet", "--executor", "ray", "--address", address, "--workers", str(workers),
            "--worker-resources", '{"CPU": 0.5}', "--max-restarts", str(max_restarts),
            "--", "--config", str(config), "--lease-seconds", "4", "--log-json", *extract_args]
    with open(Path(config).with_suffix(".log"), "w") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "RAY_DEDUP_LOGS": "0"})


def finish(process: subprocess.Popen, timeout_s: float) -> str:
    """The fleet's output once it has exited."""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"fleet not done after {timeout_s:.0f} s:\n{_output(process)[-4000:]}") from None
    return _output(process)


def _output(process: subprocess.Popen) -> str:
    config = Path(process.args[process.args.index("--config") + 1])
    return config.with_suffix(".log").read_text(errors="replace")


def actor_processes() -> dict[int, psutil.Process]:
    """This machine's ExtractWorker actor processes (Ray titles them ray::ExtractWorker...)."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        if "ray::ExtractWorker" in " ".join(process.info["cmdline"] or []):
            found[process.pid] = process
    return found


def actors_with_a_worker(count: int) -> dict[int, psutil.Process] | None:
    """The actor processes once there are `count` of them, each with its worker started."""
    found = actor_processes()
    if len(found) == count and all(actor.children() for actor in found.values()):
        return found
    return None


def busy_workers(store) -> list[psutil.Process]:
    """Live worker processes that committed a chunk, from the commit records (a record's
    worker is '<host>-<pid>'): at once, where a heartbeat may come 10 s later, when a fast
    machine has finished the run."""
    if not store.exists("run.json"):
        return []
    pids = {int(record.worker.rsplit("-", 1)[1]) for record in read_commits(store).values()}
    return [psutil.Process(pid) for pid in sorted(pids) if psutil.pid_exists(pid)]


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


# "(ExtractWorker pid=ACTOR) actex fleet: worker process WORKER started on NODE" in the fleet's
# log (Ray prefixes an actor's output with its pid, in colour on some versions).
STARTED = re.compile(r"ExtractWorker pid=(\d+)\)\S*\s+actex fleet: worker process (\d+) started")


def workers_started(log: str) -> list[tuple[int, int]]:
    """(actor pid, worker pid) of every `actex extract` process the actors started."""
    return [(int(actor), int(worker)) for actor, worker in STARTED.findall(log)]


def test_killed_actor_is_restarted_by_ray_and_the_run_completes_once(ray_address, case, tmp_path):
    fields, reference = case
    output = str(tmp_path / "out")
    url = f"{output}/{fields['run_name']}"
    # Two workers, both taken down below: the run can only complete through Ray's restart of
    # the one and its retry of the other, whatever the machine's speed.
    process = fleet(ray_address, 2, write_config(tmp_path / "run.yaml", {**fields, "output": output}))
    store = open_store(url)
    deadline = time.monotonic() + 200  # a loaded machine

    # SIGKILL one actor (not its worker process) as soon as both have started their worker,
    # so that the other is left with nearly all the work.
    before = wait_for(lambda: actors_with_a_worker(2), process, deadline)
    assert before, "the two actors did not start their workers in time"
    killed, its_actor = sorted(before)
    os.kill(killed, signal.SIGKILL)
    # SIGTERM the other's worker once it has committed a chunk, as a pre-emption notice would:
    # it finishes that chunk, exits 75 with work left, and Ray retries its actor's task,
    # which starts a new worker in the same actor.
    other = wait_for(lambda: [w for w in busy_workers(store) if w.ppid() == its_actor], process, deadline)
    assert other, "the second actor's worker committed no chunk"
    stopped = other[0].pid
    other[0].send_signal(signal.SIGTERM)

    log = finish(process, max(30.0, deadline - time.monotonic()))
    assert process.returncode == 0, log[-4000:]
    assert "run complete" in log
    started = workers_started(log)
    # Ray restarted the killed actor in a new process and retried its `run`: a new worker.
    assert [actor for actor, _ in started if actor not in before], (started, sorted(before), log[-4000:])
    # Ray retried the stopped worker's task in the same actor: a second worker there.
    assert [worker for actor, worker in started if actor == its_actor and worker != stopped], (started, its_actor, log[-4000:])
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


def test_retries_pause_longer_each_time_with_jitter_up_to_a_cap():
    from actex.fleet.ray_executor import retry_pause

    assert retry_pause(0, 2.0, 120.0) == 0.0  # a first run starts at once
    pauses = [[retry_pause(n, 2.0, 120.0) for _ in range(200)] for n in (1, 2, 3, 10)]
    for n, got in zip((1, 2, 3), pauses):
        assert 0.5 * 2.0 * 2 ** (n - 1) <= min(got) and max(got) <= 1.5 * 2.0 * 2 ** (n - 1)
    assert max(pauses[3]) <= 1.5 * 120.0 and len(set(pauses[0])) > 100  # capped; jittered
