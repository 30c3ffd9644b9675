"""The fleet file and `actex deploy`: from nothing to a fleet of TPU VMs working on one run.

    name: arc-qwen                 # fleet label (default: the run name)
    project: my-project
    zones: [us-central1-a, us-central1-b]
    workers_per_zone: 2
    accelerator_type: v4-8
    runtime_version: tpu-ubuntu2204-base
    capacity: spot                 # spot | preemptible | reserved | on-demand
    queued: false                  # true: through queued resources (spot / on-demand), which wait for capacity
    extract: run.yaml              # the `actex extract --config` file (relative to this file), or inline fields
    # image: ghcr.io/you/actex:v1                 run this image instead of the deployer's wheel (a tag is
    #                                             resolved to its digest at deploy: only the digest reaches the VMs)
    # wheel: dist/actex-0.1.0-py3-none-any.whl   default: built from the deployer's source tree
    # lock: requirements/tpu-gcs.lock            the wheel's dependencies with sha256s (default: the source tree's, `make lock`)
    # worker_args: [--lease-seconds, '120']      extra `actex extract` flags
    # service_account: actex-worker@my-project.iam.gserviceaccount.com   (default: the compute account)
    # scopes, network, subnetwork, internal_ips_only: the VMs' OAuth scopes and network

The run must have a fixed `output` and `run_name` (every VM and every recreated VM must find
the same run).
"""

from __future__ import annotations

import json
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from actex.config import check_run_name, load_config_file
from actex.fleet.bootstrap import (LAUNCH_KEY, SCRIPT_KEY, DeployRecord, Payload, build_wheel, check_lock, default_lock, deploy_dir,
                                   put_addressed, upload)
from actex.fleet.registry import parse_image, resolve_digest
from actex.fleet.tpu import (FleetLayout, NameBook, Placement, create_node, fleet_id, fleet_nodes, foreign, is_dead, members,
                             skipped_event, split_zone, zone_nodes)
from actex.fleet.tpu_api import NodeInfo, NodeSpec, TpuApi
from actex.store import open_store
from actex.store.records import reason

log = logging.getLogger("actex.deploy")

class FleetFile(BaseModel):
    """A fleet file's fields (unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Fleet label put on every VM (default: the run name).")
    project: str = Field(description="GCP project id.")
    zones: list[str] = Field(min_length=1, description="Zones to spread the VMs over, e.g. [us-central1-a, us-central1-b].")
    workers_per_zone: int = Field(1, ge=1, description="VMs per zone.")
    accelerator_type: str = Field(description="TPU accelerator type, e.g. v4-8, v5litepod-8.")
    runtime_version: str = Field(description="TPU VM image, e.g. tpu-ubuntu2204-base.")
    capacity: Literal["spot", "preemptible", "reserved", "on-demand"] = Field("spot", description="How the VMs are billed and granted.")
    queued: bool = Field(False, description="Ask through queued resources (waiting for spot or on-demand capacity) instead of creating nodes directly.")
    prefix: str = Field("tpu", description="Node names are {prefix}-{region}-{zone letter}-{i}.")
    extract: Path | dict[str, Any] = Field(description="`actex extract --config` file (relative to the fleet file) or inline fields.")
    image: str | None = Field(None, description="Container image with actex to run instead of the deployer's wheel "
                                                "(name@sha256:..., or a tag, resolved to its digest at deploy).")
    wheel: Path | None = Field(None, description="actex wheel to install (default: built from the deployer's source tree).")
    lock: Path | None = Field(None, description="Hash lock of the wheel's dependencies, installed with pip --require-hashes "
                                                "(default: requirements/tpu-gcs.lock of the deployer's source tree; `make lock`).")
    worker_args: list[str] = Field(default_factory=list, description="Extra `actex extract` flags for every worker, e.g. [--lease-seconds, '120'].")
    service_account: str | None = Field(None, description="Email of the VMs' service account (default: the project's compute account, often Editor).")
    scopes: list[str] = Field(["https://www.googleapis.com/auth/cloud-platform"], min_length=1,
                              description="OAuth scopes of that account (IAM roles decide what it may do).")
    network: str | None = Field(None, description="VPC network of the VMs (default: the project's default network).")
    subnetwork: str | None = Field(None, description="Subnetwork of the VMs.")
    internal_ips_only: bool = Field(False, description="No external IP (Google APIs through Private Google Access or Cloud NAT).")
    hf_token_secret: str | None = Field(None, description="Secret Manager secret version (projects/P/secrets/S/versions/latest) "
                                                          "read into the workers' HF_TOKEN with the VM's service account.")


    @field_validator("image")
    @classmethod
    def _an_image_reference(cls, image: str | None) -> str | None:
        # Only checked here: a tag is resolved to its digest by `prepare` (the registry is
        # asked at deploy, not by every command that reads the fleet file).
        if image is not None:
            parse_image(image)
        return image


class Fleet:
    """A loaded fleet file: its layout, run fields and where its deploy files live."""

    def __init__(self, path: Path, file: FleetFile, fields: dict):
        self.path = path
        self.file = file
        self.fields = fields
        self.run_url = f"{fields['output'].rstrip('/')}/{fields['run_name']}"
        self.deploy_url = deploy_dir(self.run_url)
        name = file.name or fields["run_name"]
        self.layout = FleetLayout(
            name=name,
            fleet_id=fleet_id(file.project, name, self.run_url),
            project=file.project,
            zones=tuple(file.zones),
            workers_per_zone=file.workers_per_zone,
            spec=NodeSpec(file.accelerator_type, file.runtime_version, file.capacity, queued=file.queued,
                          service_account=file.service_account, scopes=tuple(file.scopes), network=file.network,
                          subnetwork=file.subnetwork, internal_ips_only=file.internal_ips_only),
            prefix=file.prefix,
        )


def load_fleet(path: Path) -> Fleet:
    """Read and check a fleet file; ValueError with one line naming the file and field."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a fleet file is a mapping of fields (project, zones, ...)")
    try:
        file = FleetFile.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{path}: {where}: {reason(first)}") from None
    for zone in file.zones:
        try:
            split_zone(zone)
        except ValueError as error:
            raise ValueError(f"{path}: zones: {error}") from None
    if isinstance(file.extract, dict):
        fields = dict(file.extract)
    else:
        config = file.extract if file.extract.is_absolute() else Path(path).parent / file.extract
        fields = load_config_file(config)
    for key in ("output", "run_name"):
        if not fields.get(key):
            raise ValueError(f"{path}: extract: a fleet's run needs a fixed `{key}` (every VM must find the same run)")
    try:
        check_run_name(str(fields["run_name"]))
    except ValueError as error:
        raise ValueError(f"{path}: extract: run_name: {error}") from None
    if file.queued and file.capacity not in ("spot", "on-demand"):
        raise ValueError(f"{path}: queued: queued resources are spot or on-demand, not {file.capacity}")
    fleet = Fleet(Path(path), file, fields)
    fleet.layout.planned()  # names valid for every zone (ValueError otherwise)
    return fleet


def prepare(fleet: Fleet, *, storage_options: dict | None = None) -> DeployRecord:
    """Upload run.yaml (and the wheel), content-addressed, beside the run; keep what was pinned
    in the deployer's record (`save_record`) and return it. Nothing is written for the VMs to
    read back unchecked: the startup script is `record.script()`, put on the VMs through the
    TPU API only. An image given by tag is resolved to its digest first; a lock that is not
    one is refused. ValueError (one line) for either, before anything is written."""
    if fleet.file.image:
        image = resolve_digest(fleet.file.image)
        store = open_store(fleet.deploy_url, **(storage_options or {}))
        config_url, config_sha, _, _ = upload(store, fleet.fields, None)
        payload = Payload(image=image)
    else:
        lock = _beside(fleet, fleet.file.lock) if fleet.file.lock else default_lock()
        lock_data = check_lock(lock)
        wheel = _beside(fleet, fleet.file.wheel) if fleet.file.wheel else build_wheel(Path(tempfile.mkdtemp(prefix="actex-wheel-")))
        store = open_store(fleet.deploy_url, **(storage_options or {}))
        config_url, config_sha, url, sha = upload(store, fleet.fields, wheel)
        lock_url, lock_sha = put_addressed(store, "locks", lock.name, lock_data)
        payload = Payload(wheel_url=url, wheel_sha256=sha, lock_url=lock_url, lock_sha256=lock_sha)
    record = DeployRecord(config_url, config_sha, payload, tuple(fleet.file.worker_args), fleet.file.hf_token_secret)
    save_record(fleet, record)
    return record


def _beside(fleet: Fleet, path: Path) -> Path:
    """A fleet file's relative path, from the fleet file's folder."""
    return path if path.is_absolute() else fleet.path.parent / path


def record_path(fleet: Fleet) -> Path:
    """The deployer's record of a fleet's pins: beside its fleet file, on the deployer's disk."""
    return fleet.path.with_name(fleet.path.name + ".deploy.json")


def save_record(fleet: Fleet, record: DeployRecord) -> None:
    path = record_path(fleet)
    path.write_text(json.dumps(record.to_json(), indent=2) + "\n")


def load_record(fleet: Fleet) -> DeployRecord | None:
    """The record the last `actex deploy` of this fleet file kept, or None if there is none
    here. ValueError (one line naming the file) when it is unreadable or another run's."""
    path = record_path(fleet)
    if not path.exists():
        return None
    try:
        record = DeployRecord.from_json(json.loads(path.read_text()))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if not record.config_url.startswith(fleet.deploy_url.rstrip("/") + "/"):
        raise ValueError(f"{path}: a deploy of {record.config_url.split('/configs/')[0]}, not of {fleet.deploy_url}: run actex deploy again")
    return record


def update_scripts(api: TpuApi, layout: FleetLayout, script: str, on_event=None) -> list[str]:
    """Put `script` on the fleet's running VMs whose startup script differs (a redeploy), and
    bump their `actex-launch`: each supervisor then stops its worker and runs the new script.
    Dead and still queued VMs are left to the monitor, which recreates them with it."""
    updated = []
    for node in fleet_nodes(api, layout):
        if node.queued or is_dead(node) or node.metadata.get(SCRIPT_KEY) == script:
            continue
        launch = int(node.metadata.get(LAUNCH_KEY, "0") or 0) + 1
        api.set_metadata(node.zone, node.name, {**node.metadata, SCRIPT_KEY: script, LAUNCH_KEY: str(launch)})
        updated.append(node.name)
        if on_event:
            on_event({"event": "redeploy", "node": node.name, "zone": node.zone, "launch": launch})
    return updated


def fleet_metadata(script: str) -> dict[str, str]:
    return {SCRIPT_KEY: script, LAUNCH_KEY: "0"}


def inherited_metadata(layout: FleetLayout, nodes: list[NodeInfo]) -> dict[str, str] | None:
    """Without the deployer's record: the startup script of a VM of the fleet, as the TPU API
    holds it (set by a deploy; never the bucket's, which workers can write), or None."""
    return next((fleet_metadata(n.metadata[SCRIPT_KEY]) for n in nodes if layout.owns(n) and SCRIPT_KEY in n.metadata), None)


def create_fleet(api: TpuApi, layout: FleetLayout, metadata: dict[str, str] | None = None, *,
                 fallback: bool = True, on_event=None) -> list[Placement]:
    """Create every planned VM that does not exist yet, in parallel; a zone out of capacity
    sends its VMs to the other zones (if `fallback`). Existing VMs are left as they are; a
    planned name held by a VM that is not the fleet's is skipped (event "skipped") and the
    zone's next free name taken."""
    from dataclasses import replace

    spec = replace(layout.node_spec(), metadata={**layout.spec.metadata, **(metadata or {})})
    nodes = zone_nodes(api, layout)
    slots = members(layout, nodes)
    for node in foreign(layout, nodes):
        if on_event:
            on_event(skipped_event(layout, node))
    existing = {(n.zone, n.name) for n in nodes if layout.owns(n)}
    # Slots without a VM; a VM placed in another zone earlier fills the slot it replaced.
    todo = [(z, n) for z, n, node in slots if node is None]
    # Names in use, and planned names, stay reserved for their slots.
    book = NameBook({(n.zone, n.name) for n in nodes} | set(layout.planned()) | set(todo))

    def one(zone_name):
        zone, name = zone_name
        placement = create_node(api, layout, zone, name, fallback=fallback, spec=spec, pick=lambda z: book.pick(layout, z))
        if on_event:
            on_event({"event": "create", "node": placement.name, "zone": placement.zone, "wanted_zone": zone})
        return placement

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(todo)))) as pool:
        placements = list(pool.map(one, todo))
    for zone, name in sorted(existing):
        if on_event:
            on_event({"event": "exists", "node": name, "zone": zone})
    return placements
