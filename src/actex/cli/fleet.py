"""`actex status` (a run's live progress, from the store) and `actex fleet` (local workers)."""

from __future__ import annotations

import json
import signal
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from actex.cli.errors import EXIT_STOPPED, user_errors


def status_command(
    url: str = typer.Argument(..., help="A run's URL (OUTPUT/RUN_NAME): local, gs://, s3:// or memory://."),
    silent_after: float = typer.Option(60.0, "--silent-after", help="Seconds without a heartbeat after which a running worker is reported silent."),
    as_json: bool = typer.Option(False, "--json", help="Print the progress as JSON."),
) -> None:
    """Chunks committed, chunks leased and to whom, and each worker's last heartbeat. A
    worker's chunk count comes from the commit records it wrote (every process that ran
    under its id, a resumed one included), not from its heartbeat, which lags by up to a
    beat and restarts at 0 with each process."""
    from actex.fleet.monitor import printable, read_progress
    from actex.store.commits import read_commits
    from actex.store.folder import open_store

    with user_errors():
        store = open_store(url)
        try:
            progress = read_progress(store, silent_after_s=silent_after)
        except FileNotFoundError:
            raise FileNotFoundError(f"{store.url}: no run.json here (not an actex run, or no worker started yet)") from None
        committed_by = Counter(record.worker for record in read_commits(store, skip_bad=True).values())
    if as_json:
        typer.echo(json.dumps({**asdict(progress), "complete": progress.complete,
                               "committed_by_worker": dict(committed_by)}, indent=2))
        return
    typer.echo(
        f"{store.url}: {progress.committed}/{progress.total} chunks committed"
        + (" (complete)" if progress.complete else f", {len(progress.leased)} leased")
    )
    for worker in progress.workers:
        flag = "  DEAD (its process is gone)" if worker.gone else "  SILENT (likely dead)" if worker.silent else ""
        typer.echo(
            f"  {printable(worker.worker):<28} {printable(worker.state):<9} {committed_by.pop(worker.worker, 0):>6} chunks "
            f"{worker.tokens_per_s:>10,.0f} tok/s  last beat {worker.age_s:,.0f} s ago{flag}"
        )
    for name, chunks in sorted(committed_by.items()):  # committers whose heartbeat is gone
        typer.echo(f"  {printable(name):<28} {'-':<9} {chunks:>6} chunks  (no heartbeat)")


PREEMPTED_EXIT = EXIT_STOPPED  # stopped before the run was complete; start another


def fleet_command(
    ctx: typer.Context,
    workers: int = typer.Option(..., "--workers", min=1, help="Workers to keep running (with --tpu-topology: slices, each a gang of hosts)."),
    executor: str = typer.Option("local", "--executor", help="local (processes on this machine) | ray (actors on a Ray cluster, restarted by Ray)."),
    max_restarts: int = typer.Option(50, "--max-restarts", min=0, help="Give up after this many replacements (ray: per worker, restarts and retries each)."),
    log_dir: Optional[Path] = typer.Option(None, "--log-dir", help="local: write each worker's output to DIR/worker-<slot>-<n>.log."),
    address: Optional[str] = typer.Option(None, "--address", help="ray: the cluster to join (auto, HOST:PORT or ray://HOST:PORT); default: start a local one."),
    worker_resources: Optional[str] = typer.Option(None, "--worker-resources", help='ray: resources of one worker as JSON, e.g. \'{"TPU": 4}\' (one per accelerator host); default {"CPU": 1}.'),
    tpu_topology: Optional[str] = typer.Option(None, "--tpu-topology", help="ray: each worker is a multi-host TPU slice of this topology (e.g. 4x4), its hosts started together as one gang."),
    tpu_version: Optional[str] = typer.Option(None, "--tpu-version", help="ray: the slice's TPU generation for --tpu-topology (e.g. v6e, v5p, v4)."),
    command: str = typer.Option("extract", "--command", help="What each worker runs: extract | generate."),
) -> None:
    """Run `actex extract --claim` workers until the run is complete: local processes, or Ray actors.

    Everything after `--` goes to `actex extract` (`actex generate` with --command generate), e.g.
    `actex fleet --workers 4 -- --config run.yaml --output gs://bucket/runs`.
    A worker that dies is replaced (ray: by Ray's actor restarts and task retries). A
    `--claim` worker exits 0 on its own only once every chunk has its commit record, so the
    first clean exit ends the fleet; a worker stopped from outside (SIGTERM, GCE pre-emption
    notice) exits 75 instead and is replaced; one that exits 2 (bad config) ends
    the fleet with exit 2. Ctrl-C or SIGTERM to the fleet stops every worker gracefully (each
    finishes its in-flight chunk). Watch progress with `actex status RUN_URL`.
    """
    args = [command, "--claim", "--preempted-exit-code", str(PREEMPTED_EXIT), *ctx.args]
    with user_errors():
        if command not in ("extract", "generate"):
            raise ValueError(f"--command must be extract or generate, got {command!r}")
        if executor not in ("local", "ray"):
            raise ValueError(f"--executor must be local or ray, got {executor!r}")
        if executor == "local" and (address or worker_resources or tpu_topology):
            raise ValueError("--address, --worker-resources and --tpu-topology need --executor ray")
        if bool(tpu_topology) != bool(tpu_version):
            raise ValueError("give --tpu-topology and --tpu-version together")
        resources = _resources(worker_resources) if worker_resources else None
    # SIGTERM to the fleet unwinds like Ctrl-C, so run() stops the workers on its way out.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if executor == "ray":
        _run_ray(args, workers, address=address, resources=resources, max_restarts=max_restarts,
                 tpu_topology=tpu_topology, tpu_version=tpu_version)
        return
    from actex.fleet.local import FleetError, LocalFleet, actex_command

    fleet = LocalFleet(
        [*actex_command(), *args],
        workers,
        is_complete=lambda: any(w.returncode == 0 and w.signalled is None for w in fleet.result.exited),
        log_dir=log_dir,
        max_restarts=max_restarts,
    )
    try:
        result = fleet.run()
    except FleetError as error:
        typer.echo(f"actex: error: {error}", err=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("actex fleet: interrupted; workers stopped after their in-flight chunks", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"actex fleet: run complete in {result.seconds:.0f} s; {result.restarts} worker restart(s)")


def _resources(text: str) -> dict[str, float]:
    """--worker-resources JSON -> {name: amount}; ValueError (one line) otherwise."""
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError(f"--worker-resources {text!r} is not JSON (e.g. '{{\"TPU\": 4}}')") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in value.values()):
        raise ValueError(f"--worker-resources {text!r}: expected an object of resource names to amounts >= 0")
    return {str(k): float(v) for k, v in value.items()}


def _run_ray(args: list[str], workers: int, *, address: str | None, resources: dict | None, max_restarts: int,
             tpu_topology: str | None, tpu_version: str | None) -> None:
    """`actex fleet --executor ray`: exit 0 complete, 2 a worker's bad config, 1 gave up, 130 interrupted."""
    try:
        from actex.fleet.ray_executor import RayFleet, RayFleetError, TpuSlice
    except ImportError:
        typer.echo("actex: error: --executor ray needs Ray: pip install 'actex[ray]'", err=True)
        raise typer.Exit(2) from None
    tpu_slice = TpuSlice(tpu_topology, tpu_version) if tpu_topology and tpu_version else None
    fleet = RayFleet(args, workers, address=address, resources=resources, tpu_slice=tpu_slice, max_restarts=max_restarts)
    try:
        result = fleet.run()
    except RayFleetError as error:
        typer.echo(f"actex: error: {error}", err=True)
        raise typer.Exit(error.exit_code) from None
    except ConnectionError as error:  # no cluster at --address (yet): worth another try later
        typer.echo(f"actex: error: Ray cluster {address or '(local)'}: {str(error).strip().splitlines()[0]}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("actex fleet: interrupted; workers stopped after their in-flight chunks", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"actex fleet: run complete in {result.seconds:.0f} s on Ray ({result.workers} worker actor(s))")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def register(app: typer.Typer) -> None:
    """Add this area's subcommands to the `actex` app."""
    app.command("status")(status_command)
    app.command("fleet", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(fleet_command)
