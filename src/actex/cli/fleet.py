"""`actex status` (a run's live progress, from the store) and `actex fleet` (local workers)."""

from __future__ import annotations

import json
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from actex.cli.extract import EXIT_STOPPED, user_errors


def status_command(
    url: str = typer.Argument(..., help="A run's URL (OUTPUT/RUN_NAME): local, gs://, s3:// or memory://."),
    silent_after: float = typer.Option(60.0, "--silent-after", help="Seconds without a heartbeat after which a running worker is reported silent."),
    as_json: bool = typer.Option(False, "--json", help="Print the progress as JSON."),
) -> None:
    """Chunks committed, chunks leased and to whom, and each worker's last heartbeat."""
    from actex.fleet.monitor import read_progress
    from actex.store.folder import open_store

    with user_errors():
        store = open_store(url)
        try:
            progress = read_progress(store, silent_after_s=silent_after)
        except FileNotFoundError:
            raise FileNotFoundError(f"{store.url}: no run.json here (not an actex run, or no worker started yet)") from None
    if as_json:
        typer.echo(json.dumps({**asdict(progress), "complete": progress.complete}, indent=2))
        return
    typer.echo(
        f"{store.url}: {progress.committed}/{progress.total} chunks committed"
        + (" (complete)" if progress.complete else f", {len(progress.leased)} leased")
    )
    for worker in progress.workers:
        flag = "  SILENT (likely dead)" if worker.silent else ""
        typer.echo(
            f"  {worker.worker:<28} {worker.state:<9} {worker.chunks_done:>6} chunks "
            f"{worker.tokens_per_s:>10,.0f} tok/s  last beat {worker.age_s:,.0f} s ago{flag}"
        )


PREEMPTED_EXIT = EXIT_STOPPED  # stopped before the run was complete; start another


def fleet_command(
    ctx: typer.Context,
    workers: int = typer.Option(..., "--workers", min=1, help="Worker processes to keep running."),
    max_restarts: int = typer.Option(50, "--max-restarts", min=0, help="Give up after this many replacements in total."),
    log_dir: Optional[Path] = typer.Option(None, "--log-dir", help="Write each worker's output to DIR/worker-<slot>-<n>.log."),
) -> None:
    """Run `actex extract --claim` in N local processes until the run is complete.

    Everything after `--` goes to `actex extract`, e.g.
    `actex fleet --workers 4 -- --config run.yaml --output gs://bucket/runs`.
    A worker that dies is replaced. A `--claim` worker exits 0 on its own only once every
    chunk has its commit record, so the first clean exit ends the fleet; a worker stopped
    from outside (SIGTERM, GCE pre-emption notice) exits PREEMPTED_EXIT instead and is
    replaced. Ctrl-C or SIGTERM to the fleet stops every worker gracefully (each finishes
    its in-flight chunk).
    """
    from actex.fleet.local import FleetError, LocalFleet, actex_command

    fleet = LocalFleet(
        [*actex_command(), "extract", "--claim", "--preempted-exit-code", str(PREEMPTED_EXIT), *ctx.args],
        workers,
        is_complete=lambda: any(w.returncode == 0 and w.signalled is None for w in fleet.result.exited),
        log_dir=log_dir,
        max_restarts=max_restarts,
    )
    # SIGTERM to the fleet unwinds like Ctrl-C, so run() stops the workers on its way out.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = fleet.run()
    except FleetError as error:
        typer.echo(f"actex: error: {error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("actex fleet: interrupted; workers stopped after their in-flight chunks", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"actex fleet: run complete in {result.seconds:.0f} s; {result.restarts} worker restart(s)")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def register(app: typer.Typer) -> None:
    """Add this area's subcommands to the `actex` app."""
    app.command("status")(status_command)
    app.command("fleet", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(fleet_command)
