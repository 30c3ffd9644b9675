"""`actex tpu create|delete|list|status|recreate`, `actex deploy` and `actex monitor`: fleets of
TPU VMs (see docs/tpu-fleet.md). Flags in, fleet library calls out."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer

from actex.cli.errors import EXIT_INFRASTRUCTURE, EXIT_STOPPED, UserError, user_errors

tpu_app = typer.Typer(help="Create, delete, list, check and recreate a fleet's TPU VMs (names tpu-{region}-{zone letter}-{i}).",
                      no_args_is_help=True)

_ENDPOINT_HELP = "TPU API endpoint; an http:// URL is an emulator (anonymous credentials). Default: $ACTEX_TPU_API_ENDPOINT, else Google's with Application Default Credentials."


@contextlib.contextmanager
def infra_errors() -> Iterator[None]:
    """A TPU API failure after retries: one line, exit 1 (restartable, not the user's input)."""
    from actex.fleet.tpu_api import TpuApiError

    try:
        yield
    except TpuApiError as error:
        typer.echo(f"actex: error: {error}", err=True)
        raise typer.Exit(EXIT_INFRASTRUCTURE) from None


def _api(project: str, endpoint: Optional[str], **kwargs):
    try:
        from actex.fleet.tpu_api import TpuApi, endpoint_from_env
    except ImportError as error:  # google-cloud-tpu is an optional extra
        raise UserError(f"the TPU fleet needs google-cloud-tpu: pip install 'actex[tpu-fleet]' ({error})") from None
    return TpuApi(project, api_endpoint=endpoint_from_env(endpoint), **kwargs)


def _layout(fleet_file: Optional[Path], project, zones, workers_per_zone, accelerator_type, runtime_version, capacity, prefix, name, queued):
    """The fleet from --fleet FILE, or from the flags."""
    from actex.fleet.deploy import load_fleet
    from actex.fleet.tpu import FleetLayout, split_zone
    from actex.fleet.tpu_api import NodeSpec

    if fleet_file is not None:
        return load_fleet(Path(fleet_file)).layout
    if not project or not zones:
        raise UserError("give --fleet FILE, or --project and --zones")
    zone_list = tuple(z.strip() for z in zones.split(",") if z.strip())
    for zone in zone_list:
        split_zone(zone)
    return FleetLayout(name or prefix, project, zone_list, workers_per_zone,
                       NodeSpec(accelerator_type, runtime_version, capacity, queued=queued), prefix)


def _capacity(spot: bool, preemptible: bool, reserved: bool) -> str:
    chosen = [c for c, on in (("spot", spot), ("preemptible", preemptible), ("reserved", reserved)) if on]
    if len(chosen) > 1:
        raise UserError("give at most one of --spot, --preemptible, --reserved")
    return chosen[0] if chosen else "on-demand"


def _fleet_options(f):
    """The options every `actex tpu` command shares, so each states them once."""
    import functools
    import inspect

    extra = {
        "fleet_file": typer.Option(None, "--fleet", help="Take the fleet's fields from this fleet file."),
        "project": typer.Option(None, "--project", help="GCP project id."),
        "zones": typer.Option(None, "--zones", help="Comma-separated zones, e.g. us-central1-a,us-central1-b."),
        "workers_per_zone": typer.Option(1, "--workers-per-zone", min=1, help="VMs per zone."),
        "accelerator_type": typer.Option("v4-8", "--accelerator-type", help="TPU type, e.g. v4-8."),
        "runtime_version": typer.Option("tpu-ubuntu2204-base", "--runtime-version", help="TPU VM image."),
        "spot": typer.Option(False, "--spot", help="Spot capacity (cheapest; pre-emptible at any time)."),
        "preemptible": typer.Option(False, "--preemptible", help="Legacy pre-emptible capacity (stops within 24 h)."),
        "reserved": typer.Option(False, "--reserved", help="Capacity from a reservation of the project."),
        "queued": typer.Option(False, "--queued", help="Through queued resources (spot or on-demand), which wait for capacity."),
        "prefix": typer.Option("tpu", "--prefix", help="Node names are {prefix}-{region}-{zone letter}-{i}."),
        "name": typer.Option(None, "--name", help="Fleet label put on its VMs (default: the prefix)."),
        "api_endpoint": typer.Option(None, "--api-endpoint", help=_ENDPOINT_HELP),
    }
    own = inspect.signature(f)
    # api and layout are made here; a command taking fleet_file gets the shared option's value.
    params = [p for p in own.parameters.values() if p.name not in ("api", "layout", *extra)] + [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in extra.items()
    ]

    @functools.wraps(f)
    def wrapper(**kwargs):
        shared = {k: kwargs.pop(k) for k in extra}
        if "fleet_file" in own.parameters:  # a command that reads more of the fleet file than its layout
            kwargs["fleet_file"] = shared["fleet_file"]
        with user_errors():
            capacity = _capacity(shared.pop("spot"), shared.pop("preemptible"), shared.pop("reserved"))
            endpoint = shared.pop("api_endpoint")
            layout = _layout(shared["fleet_file"], shared["project"], shared["zones"], shared["workers_per_zone"],
                             shared["accelerator_type"], shared["runtime_version"], capacity, shared["prefix"], shared["name"], shared["queued"])
            api = _api(layout.project, endpoint)
        with infra_errors():
            return f(api=api, layout=layout, **kwargs)

    wrapper.__signature__ = own.replace(parameters=params)
    return wrapper


def _echo_event(entry: dict) -> None:
    typer.echo(json.dumps(entry))


@tpu_app.command("create")
@_fleet_options
def create_command(api=None, layout=None, fallback: bool = typer.Option(True, "--fallback/--no-fallback", help="Place a VM in another listed zone when its own is out of capacity.")) -> None:
    """Create the fleet's VMs that do not exist yet (existing ones are left alone, and said so)."""
    from actex.fleet.deploy import create_fleet

    create_fleet(api, layout, fallback=fallback, on_event=_echo_event)


@tpu_app.command("delete")
@_fleet_options
def delete_command(api=None, layout=None) -> None:
    """Delete every VM of the fleet, those carrying its id label (a missing one is a no-op that
    says so; a VM of another owner under a planned name is left alone). Runs' data is untouched."""
    from actex.fleet.tpu import foreign, skipped_event, zone_nodes

    nodes = zone_nodes(api, layout)
    for node in foreign(layout, nodes):
        _echo_event(skipped_event(layout, node))
    held = {(n.zone, n.name) for n in nodes}
    for zone, name in sorted({(n.zone, n.name) for n in nodes if layout.owns(n)}):
        deleted = api.delete(zone, name)
        _echo_event({"event": "delete" if deleted else "absent", "node": name, "zone": zone})
    for zone, name in sorted(set(layout.planned()) - held):
        _echo_event({"event": "absent", "node": name, "zone": zone})


@tpu_app.command("list")
@_fleet_options
def list_command(api=None, layout=None, as_json: bool = typer.Option(False, "--json", help="JSON lines.")) -> None:
    """Every TPU VM in the fleet's zones, whoever made it."""
    for zone in layout.zones:
        for node in api.list(zone):
            if as_json:
                typer.echo(json.dumps({"node": node.name, "zone": node.zone, "state": node.state, "accelerator_type": node.accelerator_type,
                                       "capacity": node.capacity, "fleet": node.labels.get("actex-fleet")}))
            else:
                typer.echo(f"{node.name:<32} {node.zone:<16} {node.state:<11} {node.accelerator_type:<12} {node.capacity}")


@tpu_app.command("status")
@_fleet_options
def status_command(api=None, layout=None, as_json: bool = typer.Option(False, "--json", help="JSON lines.")) -> None:
    """The fleet's VMs, planned and placed elsewhere, with their state (NOT_FOUND included)."""
    from actex.fleet.tpu import is_dead, members, zone_nodes

    slots = members(layout, zone_nodes(api, layout))
    for zone, name, node in slots:
        state = node.state if node else "NOT_FOUND"
        if as_json:
            typer.echo(json.dumps({"node": name, "zone": zone, "state": state}))
        else:
            typer.echo(f"{name:<32} {zone:<16} {state}")
    dead = sum(is_dead(node) for _, _, node in slots)
    nodes = [node for _, _, node in slots if node]
    if not as_json:
        typer.echo(f"{len(nodes)} VM(s), {dead} to recreate (actex tpu recreate)")


@tpu_app.command("recreate")
@_fleet_options
def recreate_command(api=None, layout=None, fleet_file=None, fallback: bool = typer.Option(True, "--fallback/--no-fallback", help="Place a VM in another listed zone when its own is out of capacity.")) -> None:
    """Delete and recreate every PREEMPTED / TERMINATED / missing VM of the fleet; a dead spot
    VM cannot be restarted. A deployed fleet's VMs (--fleet FILE) boot with the startup script
    of its deploy record (kept beside FILE where `actex deploy` ran), else their own, else a
    VM of the fleet's; with none of these nothing is touched (exit 2). VMs made by flags keep
    what they had."""
    from actex.fleet.tpu import NameBook, foreign, is_dead, members, recreate_node, skipped_event, zone_nodes

    nodes = zone_nodes(api, layout)
    slots = members(layout, nodes)
    dead = [(zone, name, node) for zone, name, node in slots if is_dead(node)]
    with user_errors():
        scripts = _recreate_metadata(fleet_file, layout, nodes, dead)
    for node in foreign(layout, nodes):
        _echo_event(skipped_event(layout, node))
    book = NameBook({(n.zone, n.name) for n in nodes} | {(z, n) for z, n, _ in slots} | set(layout.planned()))
    for (zone, name, node), metadata in zip(dead, scripts):
        placement = recreate_node(api, layout, zone, name, node, fallback=fallback, pick=lambda z: book.pick(layout, z), metadata=metadata)
        _echo_event({"event": "recreate", "node": placement.name, "zone": placement.zone, "was": node.state if node else "NOT_FOUND",
                     **({"moved_from": f"{zone}/{name}"} if (placement.zone, placement.name) != (zone, name) else {})})


def _recreate_metadata(fleet_file: Optional[Path], layout, nodes, dead) -> list[Optional[dict]]:
    """What each dead VM boots with (None: its own metadata). A fleet given by flags is bare
    VMs (`actex tpu create` puts no script on them): each keeps what it had. A deployed fleet
    (--fleet FILE) gets the deploy record's script, else a dead VM keeps its own, else takes
    a VM of the fleet's, as the TPU API holds it; UserError when a VM would get no script at
    all (it would boot, bill, and never start a worker)."""
    from actex.fleet.bootstrap import SCRIPT_KEY
    from actex.fleet.deploy import fleet_metadata, inherited_metadata, load_fleet, load_record, record_path

    if fleet_file is None:
        return [None] * len(dead)
    fleet = load_fleet(Path(fleet_file))
    record = load_record(fleet)
    if record is not None:
        return [fleet_metadata(record.script())] * len(dead)
    inherited = inherited_metadata(layout, nodes)
    out = []
    for zone, name, node in dead:
        if node is not None and SCRIPT_KEY in node.metadata:
            out.append(None)
        elif inherited is None:
            raise UserError(f"{zone}/{name}: no startup script to recreate it with (no deploy record {record_path(fleet)}, and no VM "
                            f"of the fleet holds one): run this where `actex deploy {fleet_file}` ran, or run that deploy again")
        else:
            out.append(inherited)
    return out


# ----------------------------------------------------------------------------- deploy / monitor


def deploy_command(
    fleet_file: Path = typer.Argument(..., help="The fleet file (see docs/tpu-fleet.md)."),
    create: bool = typer.Option(False, "--create", help="Create the fleet's missing VMs (else they must exist, made by an earlier deploy)."),
    monitor: bool = typer.Option(False, "--monitor", help="Then watch and heal the fleet until the run is complete (as `actex monitor`)."),
    api_endpoint: Optional[str] = typer.Option(None, "--api-endpoint", help=_ENDPOINT_HELP),
    interval: float = typer.Option(10.0, "--interval", min=0.1, help="With --monitor: seconds between refreshes."),
    action_log: Optional[Path] = typer.Option(None, "--action-log", help="With --monitor: append one JSON line per action here (default: stderr)."),
    delete_when_done: bool = typer.Option(False, "--delete-when-done", help="With --monitor: delete the VMs once the run is complete."),
    creating_timeout: float = typer.Option(900.0, "--creating-timeout", min=1.0, help="With --monitor: recreate a VM still CREATING after this many seconds."),
    stale_after: float = typer.Option(600.0, "--stale-after", min=1.0, help="With --monitor: relaunch the worker of a READY VM whose heartbeat is older."),
) -> None:
    """Upload the run's config and this actex (wheel or image) beside the run, create the VMs
    (--create), whose startup script starts the workers, and watch them (--monitor)."""
    from actex.fleet.deploy import create_fleet, fleet_metadata, load_fleet, prepare, record_path, update_scripts
    from actex.fleet.tpu import members, zone_nodes
    from actex.fleet.tpu_api import CapacityError

    with user_errors():
        fleet = load_fleet(fleet_file)
        api = _api(fleet.layout.project, api_endpoint)
        record = prepare(fleet)
        script = record.script()
    if fleet.file.image and record.payload.image != fleet.file.image:
        typer.echo(f"actex deploy: image {fleet.file.image} resolved to {record.payload.image}: the VMs get only the digest", err=True)
    if not fleet.file.service_account:
        typer.echo(f"actex deploy: warning: {fleet_file}: no service_account: the VMs run as the project's default compute "
                   "account, often project Editor; give them one that may only use the bucket (docs/tpu-fleet.md, Permissions)", err=True)
    typer.echo(f"actex deploy: {fleet.run_url}: config and wheel in {fleet.deploy_url}; pins kept in {record_path(fleet)}", err=True)
    with infra_errors():
        update_scripts(api, fleet.layout, script, on_event=_action_logger(action_log))
        if create:
            try:
                create_fleet(api, fleet.layout, fleet_metadata(script), on_event=_action_logger(action_log))
            except CapacityError as error:
                if not monitor:
                    raise
                _action_logger(action_log)({"event": "create", "outcome": "failed", "error": str(error)})
        else:
            missing = [name for _, name, node in members(fleet.layout, zone_nodes(api, fleet.layout)) if node is None]
            if missing and not monitor:
                raise UserError(f"{fleet_file}: VM(s) {', '.join(missing)} do not exist: run with --create")
    if monitor:
        _monitor(fleet, api, interval=interval, once=False, action_log=action_log, delete_when_done=delete_when_done,
                 creating_timeout=creating_timeout, stale_after=stale_after, script=script)


def monitor_command(
    fleet_file: Path = typer.Argument(..., help="The fleet file (see docs/tpu-fleet.md)."),
    interval: float = typer.Option(10.0, "--interval", min=0.1, help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print one JSON snapshot and exit (no repairs)."),
    action_log: Optional[Path] = typer.Option(None, "--action-log", help="Append one JSON line per action here (default: stderr)."),
    delete_when_done: bool = typer.Option(False, "--delete-when-done", help="Delete the VMs once the run is complete."),
    creating_timeout: float = typer.Option(900.0, "--creating-timeout", min=1.0, help="Recreate a VM still CREATING after this many seconds."),
    stale_after: float = typer.Option(600.0, "--stale-after", min=1.0, help="Relaunch the worker of a READY VM whose heartbeat is older than this."),
    max_repairs: int = typer.Option(10, "--max-repairs", min=0, help="Stop repairing a VM after this many repairs."),
    api_endpoint: Optional[str] = typer.Option(None, "--api-endpoint", help=_ENDPOINT_HELP),
) -> None:
    """Live dashboard of a fleet and its run; recreates dead VMs and relaunches stale workers.

    Exits 0 when the run is complete; Ctrl-C leaves the fleet running (exit 75)."""
    from actex.fleet.deploy import load_fleet, load_record, record_path

    with user_errors():
        fleet = load_fleet(fleet_file)
        api = _api(fleet.layout.project, api_endpoint)
        record = load_record(fleet)
    if record is None and not once:
        typer.echo(f"actex monitor: no deploy record {record_path(fleet)} (it is kept where `actex deploy` ran): "
                   "a recreated VM gets the startup script the TPU API holds for the fleet's VMs", err=True)
    script = record.script() if record else None
    _monitor(fleet, api, interval=interval, once=once, action_log=action_log, delete_when_done=delete_when_done,
             creating_timeout=creating_timeout, stale_after=stale_after, script=script, max_repairs=max_repairs)


def _action_logger(path: Optional[Path]):
    def log_action(entry: dict) -> None:
        line = json.dumps({"time": round(time.time(), 3), **entry}, sort_keys=False)
        if path is None:
            print(line, file=sys.stderr, flush=True)
        else:
            with open(path, "a") as out:
                out.write(line + "\n")

    return log_action


def _monitor(fleet, api, *, interval, once, action_log, delete_when_done, creating_timeout, stale_after, script, max_repairs=10) -> None:
    from rich.console import Console
    from rich.live import Live

    from actex.fleet.dashboard import render
    from actex.fleet.deploy import fleet_metadata
    from actex.fleet.recovery import FleetMonitor
    from actex.fleet.tpu import fleet_nodes
    from actex.store.folder import open_store

    log_action = _action_logger(action_log)
    with user_errors():
        store = open_store(fleet.run_url)
    monitor = FleetMonitor(api, fleet.layout, store, run_url=fleet.run_url,
                           metadata=fleet_metadata(script) if script else None, creating_timeout_s=creating_timeout,
                           stale_after_s=stale_after, max_repairs=max_repairs, on_action=log_action)
    if once:
        snapshot = monitor.tick(repair=False)
        monitor.close()
        typer.echo(json.dumps(snapshot.to_json(), indent=2))
        return
    # Not a terminal (a log file, CI): wide enough for whole node and zone names.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                snapshot = monitor.tick()
                live.update(render(snapshot), refresh=True)
                if snapshot.complete:
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        monitor.close(wait=False)
        typer.echo("actex monitor: interrupted; the fleet is left running (actex monitor FLEET resumes watching, actex tpu delete --fleet FLEET removes it)", err=True)
        raise typer.Exit(EXIT_STOPPED) from None
    monitor.close()
    log_action({"event": "complete", "fleet": fleet.layout.name, "run": fleet.run_url, "chunks": snapshot.chunks_committed})
    if delete_when_done:
        with infra_errors():
            for node in fleet_nodes(api, fleet.layout):
                api.delete(node.zone, node.name)
                log_action({"event": "delete", "fleet": fleet.layout.name, "node": node.name, "zone": node.zone, "outcome": "done"})
    typer.echo(f"actex monitor: {fleet.run_url} complete ({snapshot.chunks_committed} chunks)"
               + ("; VMs deleted" if delete_when_done else "; VMs left running (actex tpu delete --fleet FLEET)"), err=True)


def register(app: typer.Typer) -> None:
    """Add this area's subcommands to the `actex` app."""
    app.add_typer(tpu_app, name="tpu")
    app.command("deploy")(deploy_command)
    app.command("monitor")(monitor_command)
