"""A fleet of TPU VMs across zones: names, placement, and the idempotent fleet operations
behind `actex tpu create|delete|list|status|recreate` (and the monitor's repairs).

Names follow `{prefix}-{region}-{zone letter}-{i}`: `tpu-us-central1-a-0` is the first VM of
zone us-central1-a. A fleet is `workers_per_zone` VMs in each listed zone; every node it makes
carries the label `actex-fleet-id=<fleet id>` (a hash of the project, the fleet's name and its
run), so a node placed in another zone after a stockout (under the next free index there) is
still found. A fleet acts only on nodes carrying its id: a planned name held by any other VM
(another team's, another fleet's with the same prefix) is left alone and the fleet takes the
zone's next free name instead. Nothing here touches a run's data.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from actex.fleet.tpu_api import DEAD_STATES, CapacityError, NodeInfo, NodeSpec, TpuApi

log = logging.getLogger("actex.tpu")

FLEET_LABEL = "actex-fleet"  # the fleet's name, for people reading `actex tpu list`
FLEET_ID_LABEL = "actex-fleet-id"  # the fleet's identity: the only label acted upon
NODE_KEY = "actex-node"  # metadata: the node's own name (its worker id's host part)
_NODE_ID = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE = re.compile(r"^([a-z]+-[a-z]+\d+)-([a-z])$")


def split_zone(zone: str) -> tuple[str, str]:
    """'us-central1-a' -> ('us-central1', 'a'); ValueError naming the zone otherwise."""
    match = _ZONE.match(zone)
    if not match:
        raise ValueError(f"zone {zone!r} is not a GCP zone name like us-central1-a")
    return match[1], match[2]


def node_name(prefix: str, zone: str, index: int) -> str:
    """`{prefix}-{region}-{zone letter}-{index}`, checked against GCP's node id rule."""
    region, letter = split_zone(zone)
    name = f"{prefix}-{region}-{letter}-{index}"
    if not _NODE_ID.match(name):
        raise ValueError(f"node name {name!r} (from prefix {prefix!r}) is not a valid TPU node id: lower-case letters, digits, '-', at most 63")
    return name


def fleet_id(project: str, name: str, run_url: str = "") -> str:
    """A fleet's id label value: 20 hex digits of a hash of what tells fleets apart, so two
    fleets of one project never share it, whatever their prefix, and every command given the
    same fleet file (deploy, monitor, tpu delete) finds the same VMs."""
    return hashlib.sha256(f"{project}\n{name}\n{run_url}".encode()).hexdigest()[:20]


def _label_value(text: str) -> str:
    """GCP label values: lower-case letters, digits, '-' and '_', at most 63."""
    return re.sub(r"[^a-z0-9_-]", "-", text.lower())[:63]


@dataclass(frozen=True)
class FleetLayout:
    """Where a fleet's VMs go and what they are."""

    name: str  # the fleet label's value
    project: str
    zones: tuple[str, ...]
    workers_per_zone: int
    spec: NodeSpec
    prefix: str = "tpu"
    # Default: derived from the project and the name (see fleet_id); a fleet file adds its run.
    fleet_id: str = ""

    def __post_init__(self) -> None:
        if not self.fleet_id:
            object.__setattr__(self, "fleet_id", fleet_id(self.project, self.name))

    def planned(self) -> list[tuple[str, str]]:
        """(zone, name) of every VM the fleet should have, zone by zone."""
        return [(zone, node_name(self.prefix, zone, i)) for zone in self.zones for i in range(self.workers_per_zone)]

    def node_spec(self) -> NodeSpec:
        return replace(self.spec, labels={**self.spec.labels, FLEET_LABEL: _label_value(self.name), FLEET_ID_LABEL: self.fleet_id})

    def owns(self, node: NodeInfo | None) -> bool:
        """True when `node` carries this fleet's id label: the only nodes the fleet may touch."""
        return node is not None and node.labels.get(FLEET_ID_LABEL) == self.fleet_id

    @property
    def size(self) -> int:
        return len(self.zones) * self.workers_per_zone


@dataclass(frozen=True)
class Placement:
    zone: str
    name: str
    created: bool  # False: a node of that name existed already (nothing done)


def zone_nodes(api: TpuApi, layout: FleetLayout) -> list[NodeInfo]:
    """Every node in the fleet's zones, whoever made it."""
    return [node for zone in layout.zones for node in api.list(zone)]


def fleet_nodes(api: TpuApi, layout: FleetLayout) -> list[NodeInfo]:
    """The nodes of this fleet: those carrying its id label (a name alone proves nothing)."""
    return [node for node in zone_nodes(api, layout) if layout.owns(node)]


def foreign(layout: FleetLayout, nodes: Iterable[NodeInfo]) -> list[NodeInfo]:
    """Nodes under one of the fleet's planned names that are not the fleet's: never touched."""
    planned = set(layout.planned())
    return [n for n in nodes if (n.zone, n.name) in planned and not layout.owns(n)]


def skipped_event(layout: FleetLayout, node: NodeInfo) -> dict:
    """The JSON line saying a planned name is held by a VM the fleet leaves alone."""
    return {"event": "skipped", "node": node.name, "zone": node.zone,
            "reason": f"not this fleet's VM (no label {FLEET_ID_LABEL}={layout.fleet_id}): left alone, another name taken"}


def members(layout: FleetLayout, nodes: Iterable[NodeInfo]) -> list[tuple[str, str, NodeInfo | None]]:
    """The fleet's VM slots as (zone, name, node or None when NOT_FOUND), from every node in
    its zones (`zone_nodes`): each node it has, then planned names it lacks, up to its size
    (a VM placed in another zone after a stockout stands for the planned name it replaced).
    A planned name held by a VM that is not the fleet's becomes the zone's next free name."""
    nodes = list(nodes)
    present = sorted((n for n in nodes if layout.owns(n)), key=lambda n: (n.zone, n.name))
    have = {(n.zone, n.name) for n in present}
    taken = {(n.zone, n.name) for n in nodes} | set(layout.planned())
    held = {(n.zone, n.name) for n in foreign(layout, nodes)}
    missing = []
    for zone, name in layout.planned():
        if (zone, name) in have:
            continue
        if (zone, name) in held:
            name = next_free_name(layout, zone, [n for z, n in taken if z == zone])
            taken.add((zone, name))
        missing.append((zone, name))
    return [(n.zone, n.name, n) for n in present] + [(z, n, None) for z, n in missing[: max(0, layout.size - len(present))]]


def next_free_name(layout: FleetLayout, zone: str, taken: Iterable[str]) -> str:
    """The lowest-index name of `zone` not in `taken`."""
    taken = set(taken)
    index = 0
    while node_name(layout.prefix, zone, index) in taken:
        index += 1
    return node_name(layout.prefix, zone, index)


def create_node(api: TpuApi, layout: FleetLayout, zone: str, name: str, *, fallback: bool = True,
                pick: Callable[[str], str] | None = None, spec: NodeSpec | None = None,
                other_zones_first: bool = False) -> Placement:
    """Create `name` in `zone`; on RESOURCE_EXHAUSTED there, and if `fallback`, a new name in
    each other zone of the fleet in turn. CapacityError when every zone refused.

    `pick(zone)` names the node in a fallback zone (default: its lowest free index there),
    and in any zone where the name turns out to be held by a VM that is not the fleet's.
    `other_zones_first`: try `zone` last (it kept a queued resource waiting too long)."""
    spec = spec or layout.node_spec()
    pick = pick or (lambda z: next_free_name(layout, z, [n.name for n in api.list(z)]))
    refusals = []
    others = [z for z in layout.zones if z != zone] if fallback else []
    candidates = others + [zone] if other_zones_first else [zone] + others
    for candidate in candidates:
        target = name if candidate == zone else pick(candidate)
        try:
            while not (created := api.create(candidate, target, replace(spec, metadata={**spec.metadata, NODE_KEY: target}))):
                if layout.owns(api.get(candidate, target)):
                    break  # the fleet's own VM of that name exists already: nothing to do
                log.warning("%s/%s is held by a VM that is not this fleet's (no %s=%s): left alone", candidate, target,
                            FLEET_ID_LABEL, layout.fleet_id, extra={"data": {"event": "skipped", "zone": candidate, "node": target}})
                target = pick(candidate)
        except CapacityError as error:
            log.warning("%s", error, extra={"data": {"event": "stockout", "zone": candidate, "node": target}})
            refusals.append(candidate)
            continue
        return Placement(candidate, target, created)
    raise CapacityError(",".join(refusals), f"no zone of the fleet could place {name}")


class NameBook:
    """Names in use per zone, so VMs placed concurrently never pick the same fallback name."""

    def __init__(self, names: Iterable[tuple[str, str]]):
        self._lock = threading.Lock()
        self._taken: dict[str, set[str]] = {}
        for zone, name in names:
            self._taken.setdefault(zone, set()).add(name)

    def pick(self, layout: FleetLayout, zone: str) -> str:
        with self._lock:
            taken = self._taken.setdefault(zone, set())
            name = next_free_name(layout, zone, taken)
            taken.add(name)
            return name


def delete_node(api: TpuApi, zone: str, name: str) -> bool:
    """Delete; False if it was not there (a no-op)."""
    return api.delete(zone, name)


def is_dead(node: NodeInfo | None) -> bool:
    """NOT_FOUND, PREEMPTED or TERMINATED: it will never run again as it is."""
    return node is None or node.state in DEAD_STATES


def recreate_node(api: TpuApi, layout: FleetLayout, zone: str, name: str, node: NodeInfo | None, *,
                  fallback: bool = True, pick: Callable[[str], str] | None = None,
                  metadata: dict[str, str] | None = None, other_zones_first: bool = False) -> Placement:
    """Delete a dead node (a pre-empted spot VM cannot be restarted, and it holds quota while
    it stays) and create it again, in another zone if its own is out of capacity.

    The new node gets `metadata` (the fleet's startup script) or else the old one's.
    ValueError if `node` is not the fleet's (the caller must never pass one)."""
    spec = layout.node_spec()
    old = {}
    if node is not None:
        if not layout.owns(node):
            raise ValueError(f"{zone}/{name} is not a VM of fleet {layout.name} (no {FLEET_ID_LABEL}={layout.fleet_id})")
        api.delete(zone, name)
        old = node.metadata
        spec = replace(spec, labels={**node.labels, **spec.labels})
    spec = replace(spec, metadata={**spec.metadata, **(metadata if metadata is not None else old)})
    return create_node(api, layout, zone, name, fallback=fallback, spec=spec, pick=pick, other_zones_first=other_zones_first)
