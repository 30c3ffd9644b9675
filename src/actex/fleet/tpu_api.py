"""`TpuApi`: the few Cloud TPU v2 calls the fleet manager makes. The ONLY module that imports
google-cloud-tpu (install it with `pip install actex[tpu-fleet]`).

Everything above this module sees plain dataclasses (`NodeSpec` in, `NodeInfo` out) and two
exceptions (`TpuApiError` and its `CapacityError`; creating an existing node or deleting a
missing one is not an error but reported by the return value), so a fake or another cloud can stand in for it.

Endpoint: `api_endpoint=None` is Google's (`tpu.googleapis.com`, Application Default
Credentials); an `http://` endpoint is an emulator reached with anonymous credentials, as
`STORAGE_EMULATOR_HOST` does for GCS. The REST transport is used everywhere (the same wire
format the emulator speaks; no gRPC channel to keep alive between monitor ticks).

Transient answers (HTTP 500/502/503/504) are retried with exponential backoff by
google-api-core's `Retry`; long-running operations are polled with backoff up to a timeout.
RESOURCE_EXHAUSTED (a zone out of capacity, or quota; HTTP 429) is not transient: it is
raised as `CapacityError` naming the zone, so the caller may try another zone.
"""

from __future__ import annotations

import contextlib
import os
from concurrent import futures
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

Capacity = Literal["spot", "preemptible", "reserved", "on-demand"]
CAPACITIES: tuple[str, ...] = ("spot", "preemptible", "reserved", "on-demand")

ENDPOINT_ENV = "ACTEX_TPU_API_ENDPOINT"

# States after which a node never runs again: a spot/preemptible TPU VM cannot be restarted,
# only deleted and recreated (and left in place it still holds quota). FAILED and SUSPENDED
# are a queued resource's: given up, or its spot node pre-empted.
DEAD_STATES = frozenset({"PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED"})
# Not a VM yet, but on the way: a node being created, or a queued resource waiting for capacity.
PENDING_STATES = frozenset({"CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"})


class TpuApiError(RuntimeError):
    """The TPU API refused or failed a call after retries (the message says which and why)."""


class CapacityError(TpuApiError):
    """RESOURCE_EXHAUSTED: no capacity (stockout) or no quota for this node in `zone`."""

    def __init__(self, zone: str, message: str):
        super().__init__(f"{zone}: no capacity or quota: {message}")
        self.zone = zone


@dataclass(frozen=True)
class NodeSpec:
    """What to create. `metadata` holds the startup script (see bootstrap.py)."""

    accelerator_type: str  # e.g. "v4-8"
    runtime_version: str  # e.g. "tpu-ubuntu2204-base"
    capacity: Capacity = "spot"
    metadata: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    # Ask through a queued resource (one node each, id = node name): GCP's queue for spot and
    # on-demand capacity of the newer TPU generations. It waits for capacity instead of
    # failing with RESOURCE_EXHAUSTED; the monitor moves one waiting too long to another zone.
    queued: bool = False
    # The VM's identity: without a service account GCP uses the project's default compute
    # account (often project Editor). Scopes only narrow what IAM grants that account.
    service_account: str | None = None
    scopes: tuple[str, ...] = ("https://www.googleapis.com/auth/cloud-platform",)
    network: str | None = None  # e.g. "default", or projects/P/global/networks/N
    subnetwork: str | None = None
    internal_ips_only: bool = False  # no external IP (reach Google APIs via Private Google Access)

    def __post_init__(self) -> None:
        if self.queued and self.capacity not in ("spot", "on-demand"):
            raise ValueError(f"a queued resource is spot or on-demand (guaranteed), not {self.capacity}")


@dataclass(frozen=True)
class NodeInfo:
    """A node as the API reports it."""

    name: str  # short id, e.g. "tpu-us-central1-a-0"
    zone: str
    state: str  # READY, CREATING, PREEMPTED, TERMINATED, DELETING, ... (the API's word)
    accelerator_type: str = ""
    capacity: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    create_time: float | None = None  # unix seconds
    health: str = ""
    queued: bool = False  # a queued resource not yet provisioned (state is the queue's)


def endpoint_from_env(explicit: str | None) -> str | None:
    """`--api-endpoint` if given, else $ACTEX_TPU_API_ENDPOINT, else None (Google's)."""
    return explicit or os.environ.get(ENDPOINT_ENV) or None


class TpuApi:
    """The TPU v2 nodes API of one project.

    `op_timeout_s` bounds each long-running operation (create, delete, update); `retry_s`
    bounds the retries of one call on transient errors.
    """

    def __init__(self, project: str, *, api_endpoint: str | None = None, op_timeout_s: float = 900.0,
                 retry_s: float = 120.0, poll_initial_s: float = 1.0, poll_max_s: float = 20.0):
        from google.api_core import exceptions, retry
        from google.api_core.future import polling
        from google.cloud import tpu_v2

        self.project = project
        self.op_timeout_s = op_timeout_s
        self._tpu = tpu_v2
        self._exc = exceptions
        client_options = {}
        credentials = None
        if api_endpoint:
            client_options["api_endpoint"] = api_endpoint
            if api_endpoint.startswith("http://"):
                from google.auth.credentials import AnonymousCredentials

                credentials = AnonymousCredentials()
        self._client = tpu_v2.TpuClient(transport="rest", credentials=credentials, client_options=client_options or None)
        transient = retry.if_exception_type(
            exceptions.InternalServerError, exceptions.BadGateway, exceptions.ServiceUnavailable, exceptions.GatewayTimeout
        )
        self._retry = retry.Retry(predicate=transient, initial=0.5, maximum=10.0, multiplier=2.0, timeout=retry_s)
        # Polling an operation waits while it is not done; each poll is itself retried on
        # transient answers (the `retry` of `result`).
        self._polling = retry.Retry(
            predicate=polling.POLLING_PREDICATE, initial=poll_initial_s, maximum=poll_max_s, multiplier=1.5, timeout=op_timeout_s
        )

    # ------------------------------------------------------------------ paths

    def _parent(self, zone: str) -> str:
        return f"projects/{self.project}/locations/{zone}"

    def _path(self, zone: str, name: str) -> str:
        return f"{self._parent(zone)}/nodes/{name}"

    # ------------------------------------------------------------------ reads

    def _queued_path(self, zone: str, name: str) -> str:
        return f"{self._parent(zone)}/queuedResources/{name}"

    def get(self, zone: str, name: str) -> NodeInfo | None:
        """The node (or its queued resource, not provisioned yet), or None if neither exists."""
        try:
            return self._info(self._call(self._client.get_node, zone, name=self._path(zone, name)))
        except self._exc.NotFound:
            pass
        try:
            return self._queued_info(self._call(self._client.get_queued_resource, zone, name=self._queued_path(zone, name)))
        except self._exc.NotFound:
            return None

    def list(self, zone: str) -> list[NodeInfo]:
        """Every node of the project in `zone` (whoever made it), and every queued resource
        whose node does not exist yet, sorted by name."""
        nodes = {n.name: n for n in map(self._info, self._call(self._client.list_nodes, zone, parent=self._parent(zone)))}
        for queued in self._call(self._client.list_queued_resources, zone, parent=self._parent(zone)):
            info = self._queued_info(queued)
            nodes.setdefault(info.name, info)
        return sorted(nodes.values(), key=lambda n: n.name)

    # ------------------------------------------------------------------ writes

    def create(self, zone: str, name: str, spec: NodeSpec) -> bool:
        """Create the node (or queue it) and wait for the operation (not for the VM to be READY).

        False (and nothing done) if a node of that name exists already. CapacityError on
        RESOURCE_EXHAUSTED, at the call or in the finished operation; TpuApiError otherwise.
        """
        if spec.queued:
            return self._create_queued(zone, name, spec)
        scheduling = {
            "spot": self._tpu.SchedulingConfig(spot=True),
            "preemptible": self._tpu.SchedulingConfig(preemptible=True),
            "reserved": self._tpu.SchedulingConfig(reserved=True),
            "on-demand": None,
        }[spec.capacity]
        node = self._node(spec, scheduling_config=scheduling)
        try:
            operation = self._call(self._client.create_node, zone, parent=self._parent(zone), node_id=name, node=node)
            self._wait(operation, zone)
        except self._exc.Conflict:  # HTTP 409 ALREADY_EXISTS (Conflict is what REST errors map to)
            return False
        return True

    def _create_queued(self, zone: str, name: str, spec: NodeSpec) -> bool:
        tpu = self._tpu
        node = self._node(spec)
        request = tpu.QueuedResource(
            tpu=tpu.QueuedResource.Tpu(node_spec=[tpu.QueuedResource.Tpu.NodeSpec(parent=self._parent(zone), node_id=name, node=node)]),
            **({"spot": tpu.QueuedResource.Spot()} if spec.capacity == "spot" else {"guaranteed": tpu.QueuedResource.Guaranteed()}),
        )
        try:
            operation = self._call(self._client.create_queued_resource, zone, parent=self._parent(zone),
                                   queued_resource_id=name, queued_resource=request)
            self._wait(operation, zone)
        except self._exc.Conflict:
            return False
        return True

    def _node(self, spec: NodeSpec, **extra):
        """The API's Node for `spec`: type, image, metadata, labels, identity and network."""
        tpu = self._tpu
        identity = {}
        if spec.service_account:
            identity["service_account"] = tpu.ServiceAccount(email=spec.service_account, scope=list(spec.scopes))
        if spec.network or spec.subnetwork or spec.internal_ips_only:
            identity["network_config"] = tpu.NetworkConfig(network=spec.network or "", subnetwork=spec.subnetwork or "",
                                                           enable_external_ips=not spec.internal_ips_only)
        return tpu.Node(accelerator_type=spec.accelerator_type, runtime_version=spec.runtime_version,
                        metadata=dict(spec.metadata), labels=dict(spec.labels), **identity, **extra)

    def delete(self, zone: str, name: str) -> bool:
        """Delete the node, then its queued resource if it has one (this client version has no
        `force`: the node must go first); wait for each. False if neither existed."""
        deleted = False
        for method, path in ((self._client.delete_node, self._path(zone, name)),
                             (self._client.delete_queued_resource, self._queued_path(zone, name))):
            try:
                self._wait(self._call(method, zone, name=path), zone)
                deleted = True
            except self._exc.NotFound:
                pass
        return deleted

    def set_metadata(self, zone: str, name: str, metadata: dict[str, str]) -> None:
        """Replace the node's metadata (the startup script's supervisor watches one key)."""
        node = self._tpu.Node(name=self._path(zone, name), metadata=dict(metadata))
        from google.protobuf import field_mask_pb2

        operation = self._call(self._client.update_node, zone, node=node, update_mask=field_mask_pb2.FieldMask(paths=["metadata"]))
        self._wait(operation, zone)

    # ------------------------------------------------------------------ plumbing

    def _call(self, method, zone: str, **request):
        with self._errors(zone, f"{method.__name__} refused"):
            return method(request=request, retry=self._retry)

    def _wait(self, operation, zone: str):
        with self._errors(zone, "TPU operation failed"):
            return operation.result(timeout=self.op_timeout_s, retry=self._retry, polling=self._polling)

    @contextlib.contextmanager
    def _errors(self, zone: str, what: str) -> Iterator[None]:
        """google-api-core's exceptions -> CapacityError / TpuApiError; NotFound and Conflict
        (HTTP 409, ALREADY_EXISTS) pass through for the caller's idempotence."""
        exc = self._exc
        try:
            yield
        except (exc.ResourceExhausted, exc.TooManyRequests) as error:
            raise CapacityError(zone, error.message) from None
        except (exc.NotFound, exc.Conflict):
            raise
        except exc.RetryError as error:  # a call's transient errors outlasted its retry budget
            raise TpuApiError(f"{zone}: TPU API still failing after retries: {error.cause}") from None
        except exc.GoogleAPICallError as error:
            raise TpuApiError(f"{zone}: {what}: {error.code} {error.message}") from None
        except (TimeoutError, futures.TimeoutError) as error:  # polling past op_timeout_s (distinct on 3.10)
            raise TpuApiError(f"{zone}: TPU operation not done after {self.op_timeout_s:.0f} s ({error})") from None

    def _queued_info(self, queued) -> NodeInfo:
        """A queued resource as a node that is not there yet (its state is the queue's)."""
        spec = queued.tpu.node_spec[0]
        parts = queued.name.split("/")
        return NodeInfo(
            name=spec.node_id, zone=parts[3] if len(parts) > 3 else "",
            state=self._tpu.QueuedResourceState.State(queued.state.state).name,
            accelerator_type=spec.node.accelerator_type, capacity="spot" if "spot" in queued else "on-demand",
            labels=dict(spec.node.labels), metadata=dict(spec.node.metadata),
            create_time=queued.create_time.timestamp() if queued.create_time else None, queued=True,
        )

    def _info(self, node) -> NodeInfo:
        parts = node.name.split("/")  # projects/P/locations/Z/nodes/N
        sched = node.scheduling_config
        capacity = "spot" if sched.spot else "preemptible" if sched.preemptible else "reserved" if sched.reserved else "on-demand"
        created = node.create_time.timestamp() if node.create_time else None
        return NodeInfo(
            name=parts[-1],
            zone=parts[3] if len(parts) > 3 else "",
            state=self._tpu.Node.State(node.state).name,
            accelerator_type=node.accelerator_type,
            capacity=capacity,
            labels=dict(node.labels),
            metadata=dict(node.metadata),
            create_time=created,
            health=self._tpu.Node.Health(node.health).name if node.health else "",
        )

