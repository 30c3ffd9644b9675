"""`actex monitor`'s engine: one `tick()` looks at the fleet (TPU API) and the run (store),
repairs what died, and returns a `FleetSnapshot` for the dashboard or `--once`.

Repairs, per VM slot (a slot is one of the fleet's `zones x workers_per_zone` places):
* PREEMPTED, TERMINATED or NOT_FOUND: delete it (a spot VM cannot restart, and a dead one
  holds quota), create it again with the fleet's startup script, in another zone if its own
  is out of capacity; it boots and its worker joins the run.
* CREATING (or queued and waiting for capacity) for longer than `creating_timeout_s`:
  delete and create again (a waiting queued resource: in another zone first).
* READY but its worker's heartbeat is older than `stale_after_s` (or it never beat that long
  after boot): bump its `actex-launch` metadata; the VM's supervisor restarts the worker.
  Still no heartbeat `stale_after_s` after that relaunch: delete and create the VM again.
The dashboard shows as live only heartbeats of workers that may be alive: one whose process
is gone (on this machine) or that is older than `prune_after_s` is left out of the VM rows,
tok/s and the ETA, and counted in `FleetSnapshot.pruned`; repairs still see every heartbeat.
Each repair runs in a background thread (the dashboard keeps refreshing), is one JSON log
line when it starts and when it ends, backs off exponentially per slot, and a slot stops
being repaired after `max_repairs`. Nothing here deletes or rewrites a run's data: the store
is only read (the commit records and heartbeats), never written.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

from actex.fleet.bootstrap import LAUNCH_KEY
from actex.fleet.deploy import inherited_metadata
from actex.fleet.monitor import PRUNE_AFTER_S, prune_beats, read_progress
from actex.fleet.tpu import FleetLayout, NameBook, foreign, is_dead, members, recreate_node, skipped_event, zone_nodes
from actex.fleet.tpu_api import PENDING_STATES, NodeInfo, TpuApi, TpuApiError
from actex.store.commits import read_heartbeats
from actex.store.folder import Store


@dataclass(frozen=True)
class VmView:
    """One VM's row of the dashboard."""

    name: str
    zone: str
    state: str  # the TPU API's state, or NOT_FOUND
    worker: str | None  # its latest worker id, from the heartbeats
    heartbeat_age_s: float | None
    chunks: int
    samples: int
    tokens: int
    tokens_per_s: float
    repairs: int
    action: str  # what the monitor is doing about it ("" when nothing)


@dataclass(frozen=True)
class FleetSnapshot:
    fleet: str
    run: str
    time: float
    chunks_total: int
    chunks_committed: int
    chunks_leased: int
    samples: int
    tokens: int
    tokens_per_s: float
    eta_s: float | None
    complete: bool
    vms: tuple[VmView, ...]
    errors: tuple[str, ...] = ()
    pruned: tuple[str, ...] = ()  # worker ids whose heartbeats are not shown: process gone, or too old

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Slot:
    zone: str
    name: str
    repairs: int = 0
    not_before: float = 0.0  # backoff: no new repair before this time
    busy: Future | None = None  # the repair in flight
    started: float = 0.0
    action: str = ""
    launch: int = 0  # last actex-launch value this monitor set
    ready_since: float | None = None  # first tick this monitor saw it READY
    relaunched_at: float | None = None  # its last relaunch, until its worker beats again


class FleetMonitor:
    def __init__(self, api: TpuApi, layout: FleetLayout, store: Store, *, run_url: str = "",
                 metadata: dict[str, str] | None = None, creating_timeout_s: float = 900.0,
                 stale_after_s: float = 600.0, max_repairs: int = 10, backoff_s: float = 30.0,
                 on_action: Callable[[dict], None] | None = None, clock: Callable[[], float] = time.time,
                 prune_after_s: float = PRUNE_AFTER_S, host: str | None = None):
        self.api = api
        self.layout = layout
        self.store = store
        self.run_url = run_url or store.url
        self.metadata = metadata  # the fleet's startup script etc.; None: keep a dead VM's own
        self.creating_timeout_s = creating_timeout_s
        self.stale_after_s = stale_after_s
        self.max_repairs = max_repairs
        self.backoff_s = backoff_s
        self.on_action = on_action or (lambda entry: None)
        self.clock = clock
        self.prune_after_s = prune_after_s
        self.host = socket.gethostname() if host is None else host  # its workers' pids are checked
        self.slots: list[Slot] = []  # from the first look at the fleet (some VMs may have moved zone)
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(8, layout.size)), thread_name_prefix="repair")
        self._first: tuple[float, int] | None = None  # (time, committed) at the first tick: the ETA's rate

    # ------------------------------------------------------------------ one look

    def observe(self) -> tuple[list[NodeInfo], list[str]]:
        """Every node in the fleet's zones (whoever made it), and the API's error if any."""
        try:
            return zone_nodes(self.api, self.layout), []
        except TpuApiError as error:
            return [], [f"TPU API: {error}"]

    def tick(self, *, repair: bool = True) -> FleetSnapshot:
        now = self.clock()
        listed, errors = self.observe()
        if not self.slots and not errors:
            for node in foreign(self.layout, listed):
                self.on_action({"time": round(now, 3), "fleet": self.layout.name, **skipped_event(self.layout, node), "outcome": "skipped"})
            self.slots = [Slot(zone, name) for zone, name, _ in members(self.layout, listed)]
        # Only the fleet's own VMs: a slot whose VM is gone reads NOT_FOUND even when a VM of
        # another owner took its name since (recreating it then takes another name).
        nodes = {(n.zone, n.name): n for n in listed if self.layout.owns(n)}
        progress, beats = None, {}
        try:
            beats = read_heartbeats(self.store)
            progress = read_progress(self.store, now=now, beats=beats, host=self.host)
        except FileNotFoundError:
            pass  # no worker created run.json yet
        except (OSError, ValueError) as error:
            # The store unreachable, or run.json unreadable: shown, and no repair is judged
            # on heartbeats that could not be read (every worker would look silent).
            errors.append(f"store: {error}")
        complete = progress is not None and progress.complete
        for slot in self.slots:
            # A repair that finished after the listing above is judged on the next tick's
            # listing: this one may predate its new VM (which would read as NOT_FOUND).
            reaped = self._reap(slot)
            if repair and not errors and not complete and not reaped:
                latest = _latest_beat(beats, slot.name)
                self._repair(slot, nodes.get((slot.zone, slot.name)), latest[1] if latest else None, now, listed)
        live, pruned = prune_beats(beats, now=now, host=self.host, prune_after_s=self.prune_after_s)
        return self._snapshot(nodes, progress, beats, live, errors, now, pruned)

    def _reap(self, slot: Slot) -> bool:
        """Log the slot's finished repair, if any; True when there was one."""
        if slot.busy is None or not slot.busy.done():
            return False
        action, started = slot.action, slot.started
        try:
            result = slot.busy.result()
        except TpuApiError as error:  # CapacityError included: every zone refused
            self._log(action, slot, outcome="failed", error=str(error), seconds=round(self.clock() - started, 1))
        else:
            if result is not None:  # a placement: the slot's VM may now live elsewhere
                moved = (result.zone, result.name) != (slot.zone, slot.name)
                old = (slot.zone, slot.name)
                slot.zone, slot.name = result.zone, result.name
                self._log(action, slot, outcome="done", seconds=round(self.clock() - started, 1),
                          **({"moved_from": f"{old[0]}/{old[1]}"} if moved else {}))
            else:
                self._log(action, slot, outcome="done", seconds=round(self.clock() - started, 1))
        slot.busy, slot.action = None, ""
        slot.ready_since = None
        return True

    def _repair(self, slot: Slot, node: NodeInfo | None, beat: dict | None, now: float, listed: list[NodeInfo]) -> None:
        if slot.busy is not None or now < slot.not_before:
            return
        if node is not None and node.state == "READY":
            slot.ready_since = slot.ready_since or now
        else:
            slot.ready_since = None
        if slot.relaunched_at is not None and beat is not None and float(beat.get("updated_at", 0.0)) > slot.relaunched_at:
            slot.relaunched_at = None  # the relaunch worked
        action = reason = None
        if is_dead(node):
            action, reason = "recreate", node.state if node else "NOT_FOUND"
        elif node.state in PENDING_STATES and node.create_time is not None and now - node.create_time > self.creating_timeout_s:
            action, reason = "recreate", f"{node.state} for {now - node.create_time:.0f} s"
        elif node.state == "READY" and self._stale(slot, beat, now) and slot.relaunched_at is not None:
            # A relaunch did not bring a worker back (a failed install, a dead supervisor,
            # a broken VM): only a new VM will.
            action, reason = "recreate", "no heartbeat since its relaunch"
        elif node.state == "READY" and self._stale(slot, beat, now):
            action, reason = "relaunch", "no heartbeat" if beat is None else f"heartbeat {now - float(beat.get('updated_at', 0)):.0f} s old"
        if action is None:
            return
        if slot.repairs >= self.max_repairs:
            if slot.action != "gave up":
                slot.action = "gave up"
                self._log("give-up", slot, reason=f"{slot.repairs} repairs already", outcome="skipped")
            return
        slot.repairs += 1
        slot.not_before = now + min(self.backoff_s * 2 ** (slot.repairs - 1), 600.0)
        slot.action = action
        self._log(action, slot, reason=reason, outcome="started", repair=slot.repairs)
        if action == "recreate":
            slot.relaunched_at = None
            book = NameBook([(s.zone, s.name) for s in self.slots] + [(n.zone, n.name) for n in listed])
            # A queue that waited too long in its zone is moved: its zone has no capacity.
            slot.busy = self._pool.submit(recreate_node, self.api, self.layout, slot.zone, slot.name, node,
                                          pick=lambda z: book.pick(self.layout, z), metadata=self._metadata(node, listed),
                                          other_zones_first=node is not None and node.queued)
        else:
            slot.launch = max(slot.launch, int(node.metadata.get(LAUNCH_KEY, "0") or 0)) + 1
            metadata = {**node.metadata, LAUNCH_KEY: str(slot.launch)}
            slot.busy = self._pool.submit(lambda: self.api.set_metadata(slot.zone, slot.name, metadata))
            slot.ready_since = None  # the relaunched worker gets a fresh grace period
            slot.relaunched_at = now
        slot.started = now

    def _metadata(self, node: NodeInfo | None, listed: list[NodeInfo]) -> dict[str, str] | None:
        """What a recreated VM gets: the fleet's script from the deployer's record; without
        one, the dead VM's own (None), or for a VM that vanished a sibling's, as the TPU API
        holds it (set by the deployer; never the bucket's, which workers can write)."""
        if self.metadata is not None or node is not None:
            return self.metadata
        return inherited_metadata(self.layout, listed)

    def _stale(self, slot: Slot, beat: dict | None, now: float) -> bool:
        if slot.ready_since is None or now - slot.ready_since < self.stale_after_s:
            return False  # booting, or relaunched lately: give the worker time to beat
        if beat is None:
            return True
        return beat.get("state") == "running" and now - float(beat.get("updated_at", 0.0)) > self.stale_after_s

    def _log(self, action: str, slot: Slot, **data) -> None:
        self.on_action({"time": round(self.clock(), 3), "event": action, "fleet": self.layout.name,
                        "node": slot.name, "zone": slot.zone, **data})

    # ------------------------------------------------------------------ the picture

    def _snapshot(self, nodes, progress, beats, live, errors, now: float, pruned: tuple[str, ...]) -> FleetSnapshot:
        """Totals of samples and tokens from every heartbeat (work done); what is live (VM
        rows, tok/s, the ETA's fallback rate) from `live` alone."""
        vms = []
        for slot in self.slots:
            node = nodes.get((slot.zone, slot.name))
            worker, beat = _latest_beat(live, slot.name) or (None, None)
            vms.append(VmView(
                name=slot.name, zone=slot.zone, state=node.state if node else "NOT_FOUND",
                worker=worker, heartbeat_age_s=None if beat is None else round(now - float(beat.get("updated_at", 0.0)), 1),
                chunks=int((beat or {}).get("chunks_done", 0)), samples=int((beat or {}).get("samples", 0)),
                tokens=int((beat or {}).get("tokens", 0)), tokens_per_s=round(float((beat or {}).get("tokens_per_s", 0.0)), 1),
                repairs=slot.repairs, action=slot.action,
            ))
        total = progress.total if progress else 0
        committed = progress.committed if progress else 0
        if self._first is None:
            self._first = (now, committed)
        return FleetSnapshot(
            fleet=self.layout.name, run=self.run_url, time=round(now, 3),
            chunks_total=total, chunks_committed=committed, chunks_leased=len(progress.leased) if progress else 0,
            samples=sum(int(b.get("samples", 0)) for b in beats.values()),
            tokens=sum(int(b.get("tokens", 0)) for b in beats.values()),
            tokens_per_s=round(sum(float(b.get("tokens_per_s", 0.0)) for b in live.values() if b.get("state") == "running"), 1),
            eta_s=self._eta(live, total, committed, now), complete=progress is not None and progress.complete,
            vms=tuple(vms), errors=tuple(errors), pruned=pruned,
        )

    def _eta(self, beats: dict, total: int, committed: int, now: float) -> float | None:
        """Seconds left at the chunk rate seen since the first tick, else the live workers'."""
        left = total - committed
        if total == 0 or left <= 0:
            return None if total == 0 else 0.0
        first_at, first_committed = self._first
        rate = (committed - first_committed) / (now - first_at) if now - first_at > 0 else 0.0
        if rate <= 0:
            rate = sum(int(b.get("chunks_done", 0)) / max(float(b.get("updated_at", 0)) - float(b.get("started_at", 0)), 1.0)
                       for b in beats.values() if b.get("state") == "running")
        return round(left / rate, 1) if rate > 0 else None

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)


def _latest_beat(beats: dict[str, dict], node: str) -> tuple[str, dict] | None:
    """The newest heartbeat of a worker on `node` (worker ids are `<node>-<pid>`)."""
    mine = [(w, b) for w, b in beats.items() if w.startswith(f"{node}-") and w[len(node) + 1:].isdigit()]
    return max(mine, key=lambda wb: float(wb[1].get("updated_at", 0.0)), default=None)
