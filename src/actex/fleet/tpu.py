"""A fleet of TPU VMs across zones: names, placement, and the idempotent fleet operations
behind `actex tpu create|delete|list|status|recreate` (and the monitor's repairs).

Names follow `{prefix}-{region}-{zone letter}-{i}`: `tpu-us-central1-a-0` is the first VM of
zone us-central1-a. A fleet is `workers_per_zone` VMs in each listed zone; every node it makes
carries the label `actex-fleet=<fleet name>`, so a node placed in another zone after a stockout
(under the next free index there) is still found. Nothing here touches a run's data.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from actex.fleet.tpu_api import DEAD_STATES, CapacityError, NodeInfo, NodeSpec, TpuApi

log = logging.getLogger("actex.tpu")

FLEET_LABEL = "actex-fleet"
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


@dataclass(frozen=True)
class FleetLayout:
    """Where a fleet's VMs go and what they are."""

    name: str  # the fleet label's value
    project: str
    zones: tuple[str, ...]
    workers_per_zone: int
    spec: NodeSpec
    prefix: str = "tpu"

    def planned(self) -> list[tuple[str, str]]:
        """(zone, name) of every VM the fleet should have, zone by zone."""
        return [(zone, node_name(self.prefix, zone, i)) for zone in self.zones for i in range(self.workers_per_zone)]

    def node_spec(self) -> NodeSpec:
        return replace(self.spec, labels={**self.spec.labels, FLEET_LABEL: self.name})

    @property
    def size(self) -> int:
        return len(self.zones) * self.workers_per_zone


@dataclass(frozen=True)
class Placement:
    zone: str
    name: str
    created: bool  # False: a node of that name existed already (nothing done)


def fleet_nodes(api: TpuApi, layout: FleetLayout) -> list[NodeInfo]:
    """Every node of this fleet in its zones: labelled with it, or named as planned."""
    planned = set(layout.planned())
    return [
        node for zone in layout.zones for node in api.list(zone)
        if node.labels.get(FLEET_LABEL) == layout.name or (node.zone, node.name) in planned
    ]


def members(layout: FleetLayout, nodes: Iterable[NodeInfo]) -> list[tuple[str, str, NodeInfo | None]]:
    """The fleet's VM slots as (zone, name, node or None when NOT_FOUND): every node it has,
    then planned names it lacks, up to its size (a VM placed in another zone after a stockout
    stands for the planned name it replaced)."""
    present = sorted(nodes, key=lambda n: (n.zone, n.name))
    have = {(n.zone, n.name) for n in present}
    missing = [(z, n) for z, n in layout.planned() if (z, n) not in have]
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

    `pick(zone)` names the node in a fallback zone (default: its lowest free index there).
    `other_zones_first`: try `zone` last (it kept a queued resource waiting too long)."""
    spec = spec or layout.node_spec()
    pick = pick or (lambda z: next_free_name(layout, z, [n.name for n in api.list(z)]))
    refusals = []
    others = [z for z in layout.zones if z != zone] if fallback else []
    candidates = others + [zone] if other_zones_first else [zone] + others
    for candidate in candidates:
        target = name if candidate == zone else pick(candidate)
        try:
            created = api.create(candidate, target, replace(spec, metadata={**spec.metadata, NODE_KEY: target}))
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

    The new node gets `metadata` (the fleet's startup script) or else the old one's."""
    spec = layout.node_spec()
    old = {}
    if node is not None:
        api.delete(zone, name)
        old = node.metadata
        spec = replace(spec, labels={**node.labels, **spec.labels})
    spec = replace(spec, metadata={**spec.metadata, **(metadata if metadata is not None else old)})
    return create_node(api, layout, zone, name, fallback=fallback, spec=spec, pick=pick, other_zones_first=other_zones_first)
