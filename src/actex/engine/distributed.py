"""One run across every host of a pod slice: jax.distributed, agreed config, named stragglers.

The same `actex extract ...` runs on every host (`gcloud ... ssh --worker=all`). Each
process initialises jax.distributed (auto-detected on Cloud TPU / GKE, explicit elsewhere),
then uses the coordination service that came with it for everything the hosts must agree
on. Its key-value store replaces any barrier server or shared /tmp file:

    actex/host/<i>               process i's host name (published at start)
    actex/x/<name>/<i>           process i's value in exchange <name> (config, commit, ...)
    actex/b/<name>               process 0's broadcast <name> (committed set, attempt id, step)
    actex/b/<name>/read/<i>      process i read it (process 0 then deletes both)
    actex/stop                   the first stop request of any process (SIGTERM, Ctrl-C, GCE)

An exchange is a barrier that carries a value: every process writes its own arrival key
and waits for the others' keys one by one, so on timeout it knows exactly who is missing
and says so by process id and host name, instead of "barrier timed out".

Failures JAX handles itself, and how to read them (docs/pod-slices.md):
* a process that dies (SIGKILL, OOM, a lost VM) stops heart-beating; within
  `heartbeat_timeout_s` the coordination service aborts every other process (SIGABRT,
  exit code 134). A supervisor reads 134 as "a peer was lost": rerun the whole slice.
* SIGTERM (or Ctrl-C, or GCE's pre-emption notice) on any host: actex's PreemptionGuard
  catches it there and sets `actex/stop`; process 0 reads that key before each step and
  broadcasts "stop" instead of a chunk, so every host finishes the chunk in flight and
  stops before the same step. (JAX's own pre-emption notifier and
  `reached_preemption_sync_point` would do the same, but a Python SIGTERM handler
  installed after `initialize` shadows the notifier, and in actex's process it never fired
  in our tests; the key is one read per step, and it also carries Ctrl-C and the GCE notice.)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actex.config import ConfigError, WorkerOptions
from actex.engine.work import ProcessRole
from actex.store.records import differing_fields

log = logging.getLogger(__name__)

# JAX reads JAX_COORDINATOR_ADDRESS itself; the other two are the names launchers use for
# the same purpose, read here so one set of variables configures a process completely.
COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# Set on the hosts of a multi-host Cloud TPU slice (TPU VMs and GKE TPU node pools alike).
TPU_HOSTS_ENV = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")

_PREFIX = "actex"


# The options are fields of WorkerOptions (actex.config): coordinator, num_processes,
# process_id, init_timeout_s, heartbeat_timeout_s, barrier_timeout_s (and worker_host,
# the host name this process reports).
def explicit_settings(options: WorkerOptions, environ: dict[str, str] | None = None) -> tuple[str | None, int | None, int | None]:
    """(coordinator, num_processes, process_id) from the options, else JAX's variables.
    Raises ConfigError for a variable that is not an integer."""
    environ = os.environ if environ is None else environ

    def number(name: str) -> int | None:
        value = environ.get(name, "").strip()
        if not value:
            return None
        if not value.isdigit():
            raise ConfigError(f"{name}={value!r} is not an integer")
        return int(value)

    return (
        options.coordinator or environ.get(COORDINATOR_ENV) or None,
        options.num_processes if options.num_processes is not None else number(NUM_PROCESSES_ENV),
        options.process_id if options.process_id is not None else number(PROCESS_ID_ENV),
    )


def tpu_slice_hosts(environ: dict[str, str] | None = None) -> list[str]:
    """The hosts of this Cloud TPU slice as its environment lists them ([] elsewhere)."""
    environ = os.environ if environ is None else environ
    for name in TPU_HOSTS_ENV:
        hosts = [h for h in environ.get(name, "").split(",") if h.strip()]
        if hosts:
            return hosts
    return []


def wanted(options: WorkerOptions, environ: dict[str, str] | None = None) -> bool:
    """Whether this process is one of several: explicit settings, or a multi-host TPU slice."""
    coordinator, num_processes, _ = explicit_settings(options, environ)
    if num_processes is not None:
        return num_processes > 1
    return coordinator is not None or len(tpu_slice_hosts(environ)) > 1


def check_explicit(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Explicit settings must be complete and consistent (off Cloud TPU / GKE nothing fills gaps)."""
    if coordinator is not None and ":" not in coordinator:
        raise ConfigError(f"--coordinator {coordinator!r}: expected HOST:PORT (process 0's host)")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ConfigError(f"--process-id {process_id} out of range for --num-processes {num_processes}")


# --------------------------------------------------------------------------- the slice


class BarrierTimeout(RuntimeError):
    """Some processes did not reach a barrier in time; the message names them and their hosts."""


@dataclass
class Slice:
    """This process's view of the slice: its index, everyone's host, the key-value client.

    `client` is jax's DistributedRuntimeClient (key_value_set / blocking_key_value_get /
    key_value_try_get); tests may pass any object with those three methods.
    """

    index: int
    count: int
    client: Any
    barrier_timeout_s: float
    hosts: list[str] = field(default_factory=list)
    coordinator: str | None = None
    published: list[str] = field(default_factory=list, repr=False)  # own allgather keys, oldest first
    broadcasts: list[str] = field(default_factory=list, repr=False)  # process 0's broadcast keys not yet deleted, oldest first

    @property
    def primary(self) -> bool:
        return self.index == 0

    def host(self, process: int) -> str:
        return self.hosts[process] if process < len(self.hosts) else "?"

    def _wait(self, key: str, timeout_s: float) -> str | None:
        try:
            return self.client.blocking_key_value_get(key, max(1, int(timeout_s * 1000)))
        except Exception as error:  # jax raises its runtime error with DEADLINE_EXCEEDED inside
            if "DEADLINE_EXCEEDED" in str(error) or "timed out" in str(error).lower():
                return None
            raise

    def _try(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception as error:  # NOT_FOUND: not there (yet)
            if "NOT_FOUND" in str(error) or "not found" in str(error).lower():
                return None
            raise

    def exchange(self, name: str, value: str, *, to: int | None = None, timeout_s: float | None = None) -> list[str] | None:
        """Publish `value` as this process's and wait for every other process's.

        Returns the values by process index; with `to=p`, only process p waits and gets them
        (the others return None at once). Raises BarrierTimeout naming the processes (and
        hosts) whose value did not arrive within `timeout_s` (default: barrier_timeout_s).
        """
        timeout_s = self.barrier_timeout_s if timeout_s is None else timeout_s
        prefix = f"{_PREFIX}/x/{name}"
        self.client.key_value_set(f"{prefix}/{self.index}", value)
        if to is not None and to != self.index:
            return None
        deadline = time.monotonic() + timeout_s
        values: list[str | None] = [None] * self.count
        values[self.index] = value
        for process in range(self.count):
            if values[process] is None:
                values[process] = self._wait(f"{prefix}/{process}", deadline - time.monotonic())
            if values[process] is None:
                # Out of time: look (without waiting) who else is missing, to name them all.
                missing = [p for p in range(process, self.count)
                           if values[p] is None and self._try(f"{prefix}/{p}") is None]
                raise BarrierTimeout(self.missing_message(name, missing, timeout_s))
        if to is not None:
            # Only this process reads a gather's keys: drop them, or a long run would keep
            # one key per process and chunk in the coordination service's memory.
            self.client.key_value_delete(prefix)
        return values  # type: ignore[return-value]

    def missing_message(self, name: str, missing: list[int], timeout_s: float) -> str:
        who = ", ".join(f"process {p} (host {self.host(p)})" for p in missing)
        return (f"barrier {name!r} timed out after {timeout_s:.0f} s on process {self.index}: "
                f"{who} did not arrive; the others did")

    def barrier(self, name: str, timeout_s: float | None = None) -> None:
        """Return once every process reached `name`; BarrierTimeout names who did not."""
        self.exchange(f"barrier/{name}", self.host(self.index), timeout_s=timeout_s)

    def broadcast(self, name: str, make: Callable[[], Any], timeout_s: float | None = None) -> Any:
        """Process 0's `make()` (JSON-serialisable), on every process.

        Every other process marks its read (`actex/b/<name>/read/<i>`); at each later
        broadcast process 0 deletes the earlier ones every process has read, so a long run
        keeps one or two broadcasts in the coordination service's memory, not one per step.
        """
        key = f"{_PREFIX}/b/{name}"
        if self.primary:
            self._delete_read_broadcasts()
            value = make()
            self.client.key_value_set(key, json.dumps(value))
            self.broadcasts.append(key)
            return value
        timeout_s = self.barrier_timeout_s if timeout_s is None else timeout_s
        data = self._wait(key, timeout_s)
        if data is None:
            raise BarrierTimeout(self.missing_message(f"broadcast {name}", [0], timeout_s))
        self.client.key_value_set(f"{key}/read/{self.index}", "1")
        return json.loads(data)

    def _delete_read_broadcasts(self) -> None:
        """Delete (with their read marks) the oldest broadcasts that every process has read.
        Processes read broadcasts in order, so the first one not read by all ends the sweep."""
        while self.broadcasts and all(self._try(f"{self.broadcasts[0]}/read/{p}") is not None for p in range(1, self.count)):
            self.client.key_value_delete(self.broadcasts.pop(0))  # the key and everything under it

    def allgather(self, name: str, value: str, timeout_s: float | None = None) -> list[str]:
        """Every process's `value` (by index) on every process.

        Called in the same order on every process (once per chunk, say). Each process
        deletes its own key of two calls back: it has read every value of the last call, so
        every process had published the last call's, so every process had finished reading
        the call before that one.
        """
        values = self.exchange(f"ag/{name}", value, timeout_s=timeout_s)
        self.published.append(f"{_PREFIX}/x/ag/{name}/{self.index}")
        if len(self.published) > 2:
            self.client.key_value_delete(self.published.pop(0))
        return values  # type: ignore[return-value]

    def request_stop(self, reason: str) -> None:
        """Ask the whole slice to stop after the step in flight (safe from a signal handler's
        thread; the first request wins, later ones are dropped)."""
        try:
            self.client.key_value_set(f"{_PREFIX}/stop", f"{reason} on process {self.index} (host {self.host(self.index)})")
        except Exception as error:  # ALREADY_EXISTS: someone asked first
            if "ALREADY_EXISTS" not in str(error) and "already exists" not in str(error).lower():
                raise

    def stop_reason(self) -> str | None:
        """The first stop request of any process, or None."""
        return self._try(f"{_PREFIX}/stop")

    def role(self) -> ProcessRole:
        """The engine's ProcessRole for this process."""
        return ProcessRole(index=self.index, count=self.count, barrier=self.barrier,
                           gather=self._gather_to_primary, share=self.broadcast, allgather=self.allgather)

    def _gather_to_primary(self, name: str, value: str) -> list[str] | None:
        return self.exchange(name, value, to=0)


# --------------------------------------------------------------------------- config agreement


def agreement_error(payloads: list[dict], hosts: list[str]) -> str | None:
    """The one line every process prints when the processes' configs disagree, else None.

    payloads[i]: {"config": canonical dict} or {"error": message} (process i failed first).
    Each process computes the same line from the same payloads, so all say the same thing.
    """
    host = lambda p: hosts[p] if p < len(hosts) else "?"  # noqa: E731
    failed = [(p, x["error"]) for p, x in enumerate(payloads) if "error" in x]
    if failed:
        p, message = failed[0]
        others = f" (and {len(failed) - 1} other process(es))" if len(failed) > 1 else ""
        return f"process {p} (host {host(p)}) could not resolve the config{others}: {message}"
    reference = payloads[0]["config"]
    differing: dict[str, list[tuple[int, Any, Any]]] = {}  # field -> [(process, its value, process 0's)]
    for p, x in enumerate(payloads[1:], start=1):
        for name, mine, theirs in differing_fields(x["config"], reference):
            differing.setdefault(name, []).append((p, mine, theirs))
    if not differing:
        return None
    parts = []
    for name, seen in list(differing.items())[:5]:
        _, mine, reference_value = seen[0]
        parts.append(f"{name} on process(es) {', '.join(str(p) for p, _, _ in seen)} "
                     f"({mine!r} vs process 0's {reference_value!r})")
    more = f" (and {len(differing) - 5} more field(s))" if len(differing) > 5 else ""
    return "the processes of the slice disagree on the config: " + "; ".join(parts) + more


def agree(slice_: Slice, config: dict | None, error: str | None = None) -> None:
    """Every process publishes its canonical config (or the error it hit resolving it) and
    compares all of them with process 0's. Raises ConfigError (exit 2) on every process if
    any differs, naming the fields and processes. No file is involved."""
    payload = {"error": error} if error is not None else {"config": config}
    values = slice_.exchange("config", json.dumps(payload, sort_keys=True))
    problem = agreement_error([json.loads(v) for v in values], slice_.hosts)
    if problem is not None:
        raise ConfigError(problem)


# --------------------------------------------------------------------------- start


def initialize(options: WorkerOptions, *, environ: dict[str, str] | None = None) -> Slice:
    """Join the slice (jax.distributed.initialize) and publish this host's name.

    Call before anything touches a JAX device. On Cloud TPU / GKE missing settings are
    auto-detected by JAX; elsewhere --coordinator/--num-processes/--process-id (or JAX_*
    variables) must say them. Prints the one start line of this process.
    """
    import jax
    from jax._src import distributed as jax_distributed

    coordinator, num_processes, process_id = explicit_settings(options, environ)
    check_explicit(coordinator, num_processes, process_id)
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=int(options.init_timeout_s),
        heartbeat_timeout_seconds=max(1, int(options.heartbeat_timeout_s)),
    )
    client = jax_distributed.global_state.client
    slice_ = Slice(jax.process_index(), jax.process_count(), client, options.barrier_timeout_s,
                   coordinator=jax_distributed.global_state.coordinator_address)
    host = options.worker_host or socket.gethostname()
    slice_.hosts = [host] * slice_.count  # until everyone's name is known
    names = slice_.exchange("host", host, timeout_s=options.init_timeout_s)
    slice_.hosts = list(names)
    print(start_line(slice_, [str(d) for d in jax.local_devices()]), flush=True)
    return slice_


def start_line(slice_: Slice, devices: list[str]) -> str:
    """'actex: process 1 of 4 on host h1: 4 local devices (TPU_0, ...); coordinator h0:8476'"""
    shown = ", ".join(devices[:4]) + (", ..." if len(devices) > 4 else "")
    return (f"actex: process {slice_.index} of {slice_.count} on host {slice_.host(slice_.index)}: "
            f"{len(devices)} local device(s) ({shown}); coordinator {slice_.coordinator}")




# --------------------------------------------------------------------------- the chunk sequence


class SliceChunks:
    """The slice's chunks, one per step, the same on every process (a ChunkSource).

    Process 0 draws chunks from its own source (static split or `--claim` leases: the slice
    is one worker among any others on the run) and broadcasts each; the others follow.
    A stop requested on ANY process (SIGTERM, Ctrl-C, GCE notice: `Slice.request_stop`)
    is seen by process 0 before it draws the next chunk, and broadcast instead of it, so
    every process stops after the same step; `on_stop(step, reason)` runs there first.
    """

    def __init__(self, slice_: Slice, inner=None, *, on_stop: Callable[[int, str], None] | None = None):
        if slice_.primary and inner is None:
            raise ValueError("process 0 of a slice needs the run's chunk source")
        self.slice = slice_
        self.inner = inner
        self.on_stop = on_stop

    def chunks(self, stop) -> Any:
        drawn = self.inner.chunks(stop) if self.slice.primary else None
        step = 0
        while True:
            def draw() -> dict:
                reason = self.slice.stop_reason() or ("stop requested on process 0" if stop.is_set() else None)
                return {"stop": reason} if reason else {"chunk": next(drawn, None)}

            message = self.slice.broadcast(f"step/{step}", draw)
            if "stop" in message:
                if self.on_stop is not None:
                    self.on_stop(step, message["stop"])
                stop.set()
                return
            if message["chunk"] is None:
                return
            yield message["chunk"]
            step += 1

    def finished(self, chunk: int) -> None:
        if self.inner is not None:
            self.inner.finished(chunk)
