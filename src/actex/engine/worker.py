"""One worker: which chunks it computes, which are done, and one step per chunk.

    worker = open_worker(fields, options)    # slice joined, run prepared, name, source, guard
    summary = worker.run()                   # skip committed chunks, step the rest

    summary = extract(run, StaticChunks(run.plan.num_chunks), worker="w0")   # as a library

A worker takes chunks from its ChunkSource (its static share, `--claim` leases, or a pod
slice's broadcast of process 0's draws) and skips the ones committed when it started: that
set is read once, by process 0 of a slice, which hands it to the others so every process
skips the same chunks. Each other chunk goes through the step (engine/extract.py
ExtractStep, or generation's): batches in, parts out through the pipeline, whose commit
lane reports every commit back here. Around the loop the worker keeps its liveness
(heartbeat writer and stall watchdog), the pre-emption guard when it runs a command
(signals and GCE's notice stop it between chunks) and the last word of its heartbeat.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from actex.config import ConfigError, WorkerOptions
from actex.engine import distributed
from actex.engine.extract import ExtractStep, row_share
from actex.engine.generate import GenerateStep, write_predictions
from actex.engine.liveness import HEARTBEAT_EVERY_S, Liveness, live_twin, write_heartbeat
from actex.engine.pipeline import Pipeline, PipelineConfig
from actex.engine.preemption import PreemptionGuard, watch_gce_preemption
from actex.engine.prepare import PreparedRun, enable_compilation_cache, prepare_run
from actex.engine.work import SINGLE_PROCESS, ChunkSource, ProcessRole, StaticChunks, check_static_share, worker_index_from_env
from actex.store.claims import ClaimedChunks
from actex.store.commits import CommitRecord, Heartbeat, committed_chunks

log = logging.getLogger(__name__)

# What a process of a slice that failed to prepare its run tells the others before exiting
# (input errors: exit 2 on every process, naming it, instead of 134 on theirs).
_INPUT_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class Summary:
    """What one worker did in one run."""

    committed: int  # chunks this worker committed
    skipped: int  # chunks found already committed
    lost: int  # chunks another worker committed first (our attempt is garbage)
    progress: dict  # the final heartbeat: samples, tokens, bytes, rates
    failed: int = 0  # chunks left uncommitted after their writes failed for good (policy "continue")


class ChunkTally:
    """The chunk counts of one worker's run. `skipped` is counted on the worker's thread,
    the others on the pipeline's commit lane; a lock keeps each update and the final read
    whole."""

    KINDS = ("committed", "skipped", "lost", "failed")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.KINDS, 0)

    def add(self, kind: str) -> int:
        """Count one chunk of `kind`; returns that kind's count so far."""
        with self._lock:
            self._counts[kind] += 1
            return self._counts[kind]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def worker_heartbeat(run: PreparedRun, worker: str) -> Heartbeat:
    """The worker's heartbeat, `workers/<id>.json`: its counters, written by its liveness."""
    return Heartbeat(run.store, worker, interval_s=HEARTBEAT_EVERY_S, info={"run": run.config.name})


def committed_set(run: PreparedRun, role: ProcessRole) -> frozenset[int]:
    """The chunks committed now: process 0 reads them, every process of a slice gets its list."""
    return frozenset(role.share("committed", lambda: sorted(committed_chunks(run.store))))


def step_for(run: PreparedRun, role: ProcessRole) -> ExtractStep:
    """The run's per-chunk step: extraction, or generation then extraction."""
    return GenerateStep(run, role) if run.config.generation is not None else ExtractStep(run, role)


class Worker:
    """Runs a step over every chunk its source hands out that was not committed at start.

    `heartbeat` and `liveness` default to a new heartbeat and a Liveness with the default
    stall timeout; `guard` (a PreemptionGuard over `stop`), when given, is installed for the
    run; `claims` (the `--claim` leases, also inside `source` on a slice) are released when
    it ends. `share`: the chunks this worker is responsible for (default: all). `skip`: the
    committed set (default: read now). `on_write_failure`: "exit" raises the first
    write that failed for good; "continue" logs it, leaves the chunk uncommitted, goes on.
    """

    def __init__(self, run: PreparedRun, source: ChunkSource, *, name: str, stop: threading.Event | None = None,
                 role: ProcessRole = SINGLE_PROCESS, heartbeat: Heartbeat | None = None,
                 liveness: Liveness | None = None, guard: PreemptionGuard | None = None,
                 claims: ClaimedChunks | None = None, share: range | None = None, skip: frozenset[int] | None = None,
                 on_write_failure: str = "exit", pipeline: PipelineConfig | None = None) -> None:
        if on_write_failure not in ("exit", "continue"):
            raise ValueError(f"--on-write-failure must be exit or continue, got {on_write_failure!r}")
        self.prepared = run
        self.source = source
        self.name = name
        self.guard = guard
        self.stop = guard.stop if guard is not None else (stop or threading.Event())
        self.role = role
        self.heartbeat = heartbeat or worker_heartbeat(run, name)
        self.liveness = liveness or Liveness(self.heartbeat)
        self.claims = claims
        self.share = share if share is not None else range(run.plan.num_chunks)
        self.skip = skip if skip is not None else committed_set(run, role)
        self.on_commit: Callable[[CommitRecord, dict], None] | None = None
        self.on_write_failure = on_write_failure
        self.pipeline = pipeline or PipelineConfig()
        self.tally = ChunkTally()
        self.answers: dict | None = None  # a complete ARC generation run's accuracy summary

    @property
    def todo(self) -> int:
        """Chunks of this worker's share without a commit record when it started."""
        return sum(1 for chunk in self.share if chunk not in self.skip)

    @property
    def stop_reason(self) -> str | None:
        """What stopped the worker before its source ran out (a signal, GCE), else None."""
        return self.guard.reason if self.guard is not None else None

    def chunks_left(self) -> int:
        """Chunks of the share without a commit record now. Read again, not taken from the
        start's skip set: after a stop, other workers may have committed chunks too."""
        done = committed_chunks(self.prepared.store)
        return sum(1 for chunk in self.share if chunk not in done)

    def run(self, step: ExtractStep | None = None, *,
            on_commit: Callable[[CommitRecord, dict], None] | None = None) -> Summary:
        """Step every chunk left (default step: the run's, see step_for); the leases are
        released at the end, and a complete ARC generation run's answers scored (`answers`).
        `on_commit(record, progress)` runs on the commit lane after each chunk this worker
        committed; `progress` is the heartbeat's snapshot (counts and rates)."""
        step = step or step_for(self.prepared, self.role)
        self.on_commit = on_commit
        run = self.prepared
        log.info("run %s: %d chunks, %d to do by worker %s", run.config.run_url, run.plan.num_chunks, self.todo,
                 self.name, extra={"data": {"event": "start", "run": run.config.run_url,
                                            "config_hash": run.config.config_hash, "num_chunks": run.plan.num_chunks,
                                            "todo": self.todo, "worker": self.name}})
        # The guard stays installed through the answers and the last log line: a SIGTERM
        # then (a fleet stopping a worker whose work is done) is a stop request, not a death.
        with self._guarded():
            try:
                summary = self._loop(step)
            finally:
                if self.claims is not None:
                    self.claims.close()
            if run.config.generation is not None:
                self.answers = write_predictions(run.store)
            log.info("done", extra={"data": {"event": "done", "committed": summary.committed, "skipped": summary.skipped,
                                             "lost": summary.lost, **summary.progress}})
        return summary

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        if self.guard is None:
            yield
            return
        with self.guard:
            watch_gce_preemption(self.guard)
            yield

    def _loop(self, step: ExtractStep) -> Summary:
        pipe = self._pipeline()
        write_heartbeat(self.heartbeat, force=True)
        self.liveness.start()
        state = "failed"
        try:
            for chunk in self.source.chunks(self.stop):
                self._chunk(step, chunk, pipe)
            state = "stopped" if self.stop.is_set() else "finished"
        finally:
            try:
                pipe.close()
            except BaseException:
                state = "failed"
                raise
            finally:
                self.liveness.close()
                write_heartbeat(self.heartbeat, state=state, force=True)
        counts = self.tally.counts()
        return Summary(counts["committed"], counts["skipped"], counts["lost"], self.heartbeat.snapshot(),
                       counts["failed"])

    def _chunk(self, step: ExtractStep, chunk: int, pipe: Pipeline) -> None:
        """Skip a committed chunk, or step it: its commit then follows on the commit lane."""
        if chunk in self.skip:
            self.tally.add("skipped")
            self.source.finished(chunk)
            return
        self.liveness.took(chunk)
        tokenized = step.tokens(chunk)
        self.liveness.progressed()
        step.compute(chunk, tokenized, pipe)
        pipe.check()

    def _pipeline(self) -> Pipeline:
        run = self.prepared
        return Pipeline(run.store, widths=run.widths, dtype=run.config.dtype, shard_size=run.config.shard_size,
                        worker=self.name, on_commit=self._committed,
                        on_write_failure=self._write_failed if self.on_write_failure == "continue" else None,
                        role=self.role, rows=row_share(run), config=self.pipeline, on_progress=self.liveness.progressed)

    def _committed(self, record: CommitRecord, ours: bool) -> None:
        """On the commit lane, after the record was created (or lost to another worker)."""
        self.source.finished(record.chunk)
        self.liveness.done(record.chunk)
        if not ours:
            if self.tally.add("lost") == 1 and isinstance(self.source, StaticChunks):
                # A static share is this worker's alone: someone else computes it too.
                log.warning("chunk %d was committed by another process first: a second worker runs with "
                            "--worker-index %d; give each worker its own index, or use --claim",
                            record.chunk, self.source.worker_index)
            return
        self.tally.add("committed")
        self.liveness.progressed(chunks_done=1, samples=record.samples, tokens=record.tokens, bytes=record.bytes,
                                 token_slots=record.token_slots)
        write_heartbeat(self.heartbeat)
        if self.on_commit is not None:
            self.on_commit(record, self.heartbeat.snapshot())

    def _write_failed(self, chunk: int, error: Exception) -> None:
        """On the commit lane, `--on-write-failure continue`: the chunk stays uncommitted."""
        # The error names the object and the cause (see store/folder.py RetryPolicy).
        log.error("chunk %d not committed: %s; going on (--on-write-failure continue)", chunk, error)
        self.tally.add("failed")
        self.source.finished(chunk)
        self.liveness.done(chunk)


def extract(run: PreparedRun, source: ChunkSource, *, worker: str,
            on_commit: Callable[[CommitRecord, dict], None] | None = None, **options) -> Summary:
    """Compute and commit every chunk `source` hands out that has no commit record yet, with
    the run's step; `options` are Worker's (stop, role, on_write_failure, pipeline,
    heartbeat, liveness)."""
    return Worker(run, source, name=worker, **options).run(on_commit=on_commit)


# --------------------------------------------------------------------------- opening


def open_worker(fields: dict, options: WorkerOptions, *, storage_options: dict | None = None) -> Worker:
    """This process's worker of the run `fields` describe, ready to run.

    With several processes (--num-processes / --coordinator, JAX_* variables, or a
    multi-host Cloud TPU slice) it first joins the slice (engine/distributed.py) and agrees
    the config with every process. Raises what prepare_run raises (one-line input errors),
    ConfigError for a worker index that is missing or out of range, and BarrierTimeout
    when a process of the slice does not arrive.
    """
    enable_compilation_cache()
    slice_ = distributed.initialize(options) if distributed.wanted(options) else None
    index = worker_index(options, slice_)
    workers = {"claim": options.claim, "num_workers": options.num_workers, "worker_index": index}
    run = prepare_agreed(fields, storage_options, slice_, workers)
    role = slice_.role() if slice_ is not None else SINGLE_PROCESS
    name = worker_name(options, index, slice_)
    # The slice is one worker: process 0's name; the others' heartbeats say which process.
    heartbeat = worker_heartbeat(run, name if role.index == 0 else f"{name}.p{role.index}")
    twin = live_twin(heartbeat)
    if twin is not None:
        log.warning(twin)
    liveness = Liveness(heartbeat, stall_timeout_s=options.stall_timeout)
    claims = None
    if options.claim and (slice_ is None or slice_.primary):
        # A stalled worker stops renewing, so its leases run out and others take over.
        claims = ClaimedChunks(run.store, run.plan.num_chunks, name, lease_s=options.lease_seconds,
                               renew_while=liveness.progressing)
    # In a slice a stop on any host is broadcast by process 0 at a step boundary (see
    # engine/distributed.py SliceChunks), so every host stops after the same chunk.
    guard = PreemptionGuard(threading.Event(), deadline_s=options.preempt_deadline,
                            on_abandon=functools.partial(_abandon, claims, heartbeat),
                            exit_code=options.preempted_exit_code,
                            on_request=slice_.request_stop if slice_ is not None else None)
    static = StaticChunks(run.plan.num_chunks, index, options.num_workers)
    source = claims if options.claim else static
    if slice_ is not None:
        source = distributed.SliceChunks(slice_, source if slice_.primary else None,
                                         on_stop=functools.partial(_announce_slice_stop, guard))
    share = range(run.plan.num_chunks) if options.claim else static.assigned()
    return Worker(run, source, name=name, role=role, heartbeat=heartbeat, liveness=liveness, guard=guard,
                  claims=claims, share=share, skip=committed_set(run, role), on_write_failure=options.on_write_failure)


def worker_index(options: WorkerOptions, slice_: distributed.Slice | None) -> int:
    """--worker-index, else the scheduler's ($TPU_WORKER_ID, ...), else 0; checked against
    --num-workers before anything is opened (a bad index is the user's: ConfigError / ValueError)."""
    index = options.worker_index
    if index is None:
        # On a TPU slice TPU_WORKER_ID is the host's index within the slice, not a worker's.
        index = worker_index_from_env() if slice_ is None else None
        if index is None and options.num_workers > 1 and not options.claim:
            raise ConfigError(
                f"--num-workers {options.num_workers} needs --worker-index (or $TPU_WORKER_ID, $CLOUD_TPU_TASK_ID, "
                "$JOB_COMPLETION_INDEX); without one every worker would do worker 0's share")
        index = index or 0
    check_static_share(index, options.num_workers)
    return index


def worker_name(options: WorkerOptions, index: int, slice_: distributed.Slice | None) -> str:
    """`w<index>` for a static worker, `<host>-<pid>` with --claim; a slice takes process 0's."""
    # A TPU fleet VM's hostname is not its node name: its bootstrap sets ACTEX_WORKER_HOST so
    # `actex monitor` can tell which VM a heartbeat comes from.
    host = options.worker_host or os.uname().nodename
    name = f"w{index}" if not options.claim else f"{host}-{os.getpid()}"
    return slice_.broadcast("worker", lambda: name) if slice_ is not None else name


def prepare_agreed(fields: dict, storage_options: dict | None, slice_: distributed.Slice | None,
                   workers: dict) -> PreparedRun:
    """prepare_run, with the config agreed by every process of a slice (ConfigError on all
    of them if any differs, or if any failed to resolve its config: its error, named, everywhere)."""
    if slice_ is None:
        return prepare_run(fields, storage_options=storage_options)
    agreed = False

    def agree(resolved: dict) -> None:
        nonlocal agreed
        agreed = True
        distributed.agree(slice_, {**resolved, "workers": workers})

    try:
        return prepare_run(fields, storage_options=storage_options, agree=agree)
    except _INPUT_ERRORS as error:
        if agreed:
            raise
        # Tell the others why before exiting, so they exit 2 naming this process, not 134.
        text = str(error).strip()
        distributed.agree(slice_, None, error=text.splitlines()[0] if text else type(error).__name__)
        raise


def _abandon(claims: ClaimedChunks | None, heartbeat: Heartbeat) -> None:
    """Past the pre-emption deadline the in-flight chunk is dropped: hand its lease back so
    another worker starts on it at once, and say so in this worker's heartbeat."""
    if claims is not None:
        claims.close()
    heartbeat.beat(state="abandoned", force=True)


def _announce_slice_stop(guard: PreemptionGuard, step: int, reason: str) -> None:
    """Every process of a slice stops at the same step: say which, and why, then stop."""
    print(f"actex: the slice stops before step {step}: {reason}", flush=True)
    guard.request_stop(reason)
