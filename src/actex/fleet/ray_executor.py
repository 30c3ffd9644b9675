"""`actex fleet --executor ray`: `actex extract --claim` workers as Ray actors, kept alive by Ray.

The store's leases make chunks exactly-once, so this executor only starts identical workers
and leaves their restarts to Ray's own machinery:

* a worker is an actor whose `run` method runs one `actex extract --claim` process and
  returns or raises according to its exit code;
* the actor's process dies (SIGKILL, OOM, its node gone): Ray restarts the actor
  (`max_restarts`), on another node when the node is gone, and retries the interrupted
  `run` (`max_task_retries`);
* the worker exits 1 (store failing after retries), 75 (pre-empted) or any other non-zero
  code but 2: `run` raises WorkerExited, which Ray retries (`retry_exceptions`);
* the worker exits 2 (bad flags or a config that disagrees with the run): `run` raises
  BadConfigExit, which Ray does not retry; the fleet stops and the command exits 2;
* the worker exits 0: a `--claim` worker does that only once every chunk has its commit
  record, so the run is complete and the other workers are stopped.

A multi-host TPU slice is one gang: its hosts' actors are placed together in one
`ray.util.tpu.SlicePlacementGroup` (Ray reserves the slice's head resource, then one bundle
per host), so they start together; each runs the same command, as `gcloud ... --worker=all`
would. Ray is an optional extra (`pip install actex[ray]`); only this module imports it.
Progress is the store's: `actex status RUN_URL`.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actex.fleet.local import actex_command

BAD_CONFIG_EXIT = 2  # `actex extract`: bad input; a restart would fail the same way
# Variables forwarded from the driver to every worker (they may run on other machines).
FORWARDED_PREFIXES = ("ACTEX_",)

_PR_SET_PDEATHSIG = 1


class WorkerExited(Exception):
    """The worker exited with a code worth a restart (1, 75, a signal, ...): Ray retries."""

    def __init__(self, code: int, node: str) -> None:
        super().__init__(f"worker on {node} exited with {code}")
        self.code, self.node = code, node

    def __reduce__(self):  # Ray pickles exceptions raised in actors
        return (type(self), (self.code, self.node))


class BadConfigExit(Exception):
    """The worker exited 2 (bad flags, a config that disagrees with the run): not retried."""

    def __reduce__(self):
        return (type(self), self.args)


class RayFleetError(RuntimeError):
    """The fleet gave up; `exit_code` is what `actex fleet` exits with (2 or 1)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the actor's process dies, so a killed actor
    leaves no worker behind (SIGTERM, not SIGKILL: the worker hands its leases back)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def retry_pause(failures: int, base_s: float, max_s: float) -> float:
    """Seconds to wait before the run that follows `failures` failed runs in a row: doubling
    from `base_s` up to `max_s`, times a random 0.5-1.5, so workers that failed together (a
    store outage) neither burn their retries in seconds nor all come back at once."""
    if failures <= 0:
        return 0.0
    return min(max_s, base_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.5)


# A run that lasted this long was working: its failure starts the backoff over.
_HEALTHY_RUN_S = 600.0


class ExtractWorker:
    """One worker slot: runs `actex ARGS` to completion per `run` call (Ray retries a failed
    call on the same actor, which pauses first: `retry_pause`). Two threads: `stop` must get
    through while `run` waits for its process."""

    def __init__(self, args: Sequence[str], backoff_s: float = 2.0, max_backoff_s: float = 120.0) -> None:
        self.args = list(args)
        self.process: subprocess.Popen | None = None
        self.stopping = False
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.failures = 0  # failed runs in a row on this actor

    def run(self) -> int:
        """0 once the run is complete; raises WorkerExited / BadConfigExit otherwise."""
        time.sleep(retry_pause(self.failures, self.backoff_s, self.max_backoff_s))
        node = ray.util.get_node_ip_address()
        # `actex` as installed on this node, which need not be the driver's machine.
        argv = [*actex_command(), *self.args]
        # start_new_session: a Ctrl-C meant for the raylet's terminal is not the worker's.
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                        start_new_session=True)
        # Ray prefixes an actor's output with "(ExtractWorker pid=<actor pid>)" in the driver's
        # log, so these two lines show each restart and retry there.
        print(f"actex fleet: worker process {self.process.pid} started on {node}", flush=True)
        started = time.monotonic()
        code = self.process.wait()
        print(f"actex fleet: worker process {self.process.pid} exited with {code}", flush=True)
        if code == 0 or self.stopping:
            return code
        self.failures = 1 if time.monotonic() - started > _HEALTHY_RUN_S else self.failures + 1
        if code == BAD_CONFIG_EXIT:
            raise BadConfigExit(f"worker on {node} exited with 2 (bad arguments or config)")
        raise WorkerExited(code, node)

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM the worker (it finishes its in-flight chunk), SIGKILL it after `grace_s`."""
        self.stopping = True
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@dataclass(frozen=True)
class TpuSlice:
    """A multi-host TPU slice per worker: e.g. topology "4x4", version "v6e"."""

    topology: str
    version: str


@dataclass
class RayFleetResult:
    seconds: float = 0.0
    workers: int = 0  # actors started (gang members included)
    exit_codes: list[int] = field(default_factory=list)


def forwarded_env(environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES)}


def parse_resources(resources: dict[str, float]) -> dict:
    """{"CPU": 2, "GPU": 1, "TPU": 4, "custom": 1} -> actor options (num_cpus, num_gpus, resources)."""
    resources = dict(resources)
    options: dict = {"num_cpus": resources.pop("CPU", 1)}
    if "GPU" in resources:
        options["num_gpus"] = resources.pop("GPU")
    if resources:
        options["resources"] = resources
    return options


class RayFleet:
    """`workers` slots (or slice gangs) on a Ray cluster, each running `actex ARGS` until the
    run is complete. `address`: None starts a local cluster; "auto", "HOST:PORT" or
    "ray://HOST:PORT" joins one."""

    def __init__(self, args: Sequence[str], workers: int, *, address: str | None = None,
                 resources: dict[str, float] | None = None, tpu_slice: TpuSlice | None = None,
                 max_restarts: int = 50, env: dict[str, str] | None = None, stop_grace_s: float = 30.0) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.args = list(args)
        self.workers = workers
        self.address = address
        self.resources = resources or {"CPU": 1}
        self.tpu_slice = tpu_slice
        self.max_restarts = max_restarts
        self.env = forwarded_env(dict(os.environ)) if env is None else env
        self.stop_grace_s = stop_grace_s
        self.actors: list = []
        self.slices: list = []
        self.result = RayFleetResult()

    def _actor_class(self):
        return ray.remote(ExtractWorker).options(
            max_restarts=self.max_restarts,
            max_task_retries=self.max_restarts,
            max_concurrency=2,
            runtime_env={"env_vars": self.env} if self.env else None,
            **parse_resources(self.resources),
        )

    def _start(self) -> None:
        worker_class = self._actor_class()
        for _ in range(self.workers):
            if self.tpu_slice is None:
                self.actors.append(worker_class.remote(self.args))
                continue
            from ray.util.tpu import slice_placement_group

            gang = slice_placement_group(self.tpu_slice.topology, self.tpu_slice.version)
            self.slices.append(gang)
            ray.get(gang.placement_group.ready())
            chips = gang.chips_per_host
            for host in range(gang.num_hosts):
                strategy = PlacementGroupSchedulingStrategy(gang.placement_group, placement_group_bundle_index=host)
                self.actors.append(worker_class.options(resources={"TPU": chips}, scheduling_strategy=strategy).remote(self.args))
        self.result.workers = len(self.actors)

    def run(self, timeout_s: float | None = None) -> RayFleetResult:
        """Start the workers and wait until one reports the run complete; RayFleetError otherwise."""
        started = time.monotonic()
        ray.init(address=self.address, log_to_driver=True)
        try:
            self._start()
            pending = {actor.run.options(retry_exceptions=[WorkerExited]).remote(): actor for actor in self.actors}
            while pending:
                left = None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - started))
                done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
                if not done:
                    raise RayFleetError(f"run not complete after {timeout_s:.0f} s", 1)
                pending.pop(done[0])
                code = self._outcome(done[0])
                self.result.exit_codes.append(code)
                if code == 0:
                    break
        finally:
            self.stop()
            ray.shutdown()
        self.result.seconds = time.monotonic() - started
        return self.result

    def _outcome(self, ref) -> int:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            cause = error.cause
            if isinstance(cause, BadConfigExit):
                raise RayFleetError(f"{cause}; not restarting", BAD_CONFIG_EXIT) from None
            if isinstance(cause, WorkerExited):
                raise RayFleetError(f"gave up after {self.max_restarts} retries: {cause}", 1) from None
            raise
        except ray.exceptions.ActorDiedError as error:
            raise RayFleetError(f"gave up: a worker actor died more than {self.max_restarts} times ({error})", 1) from None

    def stop(self) -> None:
        """Stop every worker gracefully, then the actors and any slice reservations."""
        stops = []
        for actor in self.actors:
            try:
                stops.append(actor.stop.remote(self.stop_grace_s))
            except ray.exceptions.RayActorError:
                continue
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=self.stop_grace_s + 5)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        for gang in self.slices:
            gang.shutdown()
        self.actors, self.slices = [], []
