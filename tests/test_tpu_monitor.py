"""FleetMonitor's repairs against the fake TPU API (no workers: heartbeats are written to a
local run folder by hand), and the dashboard's text for a fixed snapshot."""

from __future__ import annotations

import dataclasses
import io
import time

import pytest
from fake_tpu_server import fake_tpu  # noqa: F401 (fixture)
from rich.console import Console

from actex.fleet.dashboard import render
from actex.fleet.deploy import create_fleet
from actex.fleet.recovery import FleetMonitor, FleetSnapshot, VmView
from actex.fleet.tpu import FleetLayout
from actex.fleet.tpu_api import NodeSpec, TpuApi, TpuApiError
from actex.store.commits import Heartbeat
from actex.store.folder import open_store

A, B = "us-central1-a", "us-central1-b"
A0, B0 = "tpu-us-central1-a-0", "tpu-us-central1-b-0"


@pytest.fixture
def fleet(fake_tpu, tmp_path):
    api = TpuApi("p", api_endpoint=fake_tpu.endpoint, poll_initial_s=0.05, poll_max_s=0.2)
    layout = FleetLayout("f", "p", (A, B), 1, NodeSpec("v4-8", "rt", "spot"))
    return api, layout, open_store(str(tmp_path / "run"))


def _settle(monitor: FleetMonitor, until, timeout_s: float = 20.0) -> list:
    """Tick until `until(actions)` (repairs run in the background)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        monitor.tick()
        if until(monitor.actions):
            return monitor.actions
        time.sleep(0.1)
    raise AssertionError(f"not settled: {monitor.actions}")


def _monitor(api, layout, store, **kwargs) -> FleetMonitor:
    actions: list = []
    monitor = FleetMonitor(api, layout, store, metadata={"startup-script": "echo boot"}, backoff_s=0.0,
                           on_action=actions.append, **kwargs)
    monitor.actions = actions
    return monitor


def test_missing_and_stuck_creating_vms_are_recreated(fake_tpu, fleet):
    api, layout, store = fleet
    create_fleet(api, dataclasses.replace(layout, zones=(A,)))  # a-0 only: b-0 is NOT_FOUND
    fake_tpu.stick_creating(1)
    with pytest.raises(TpuApiError, match="not done"):
        TpuApi("p", api_endpoint=fake_tpu.endpoint, op_timeout_s=0.3, poll_initial_s=0.05).create(B, B0, layout.node_spec())
    fake_tpu.node(B, B0).created_at -= 60  # stuck for a minute already
    api.delete(A, A0)
    monitor = _monitor(api, layout, store, creating_timeout_s=30)
    try:
        actions = _settle(monitor, lambda acts: sum(a.get("outcome") == "done" for a in acts) == 2)
    finally:
        monitor.close()
    started = sorted((a["node"], a["reason"]) for a in actions if a["outcome"] == "started")
    assert started[0] == (A0, "NOT_FOUND") and started[1][0] == B0 and started[1][1].startswith("CREATING for 6")
    assert fake_tpu.states() == {f"{A}/{A0}": "READY", f"{B}/{B0}": "READY"}
    assert api.get(B, B0).metadata["startup-script"] == "echo boot"  # the fleet's script, not the stuck one's


def test_a_vm_is_given_up_after_max_repairs(fake_tpu, fleet):
    api, layout, store = fleet
    create_fleet(api, layout)
    monitor = _monitor(api, layout, store, max_repairs=1)
    try:
        monitor.tick()
        fake_tpu.preempt(A, A0)
        _settle(monitor, lambda acts: any(a.get("outcome") == "done" for a in acts))
        fake_tpu.preempt(A, A0)
        actions = _settle(monitor, lambda acts: any(a["event"] == "give-up" for a in acts))
    finally:
        monitor.close()
    assert [a["event"] for a in actions if a["outcome"] != "done"] == ["recreate", "give-up"]
    assert fake_tpu.states()[f"{A}/{A0}"] == "PREEMPTED"
    assert monitor.tick().vms[0].action == "gave up"


def test_a_ready_vm_with_a_stale_heartbeat_gets_its_worker_relaunched(fake_tpu, fleet):
    api, layout, store = fleet
    create_fleet(api, layout, {"actex-launch": "0"})
    now = [time.time()]
    monitor = _monitor(api, layout, store, stale_after_s=60, clock=lambda: now[0])
    Heartbeat(store, f"{A0}-4242").beat(force=True)  # a-0's worker beats; b-0's never did
    try:
        monitor.tick()  # both READY: the boot grace period starts
        now[0] += 30
        assert monitor.tick().vms[0].worker == f"{A0}-4242"
        assert monitor.actions == []  # within the grace period
        now[0] += 40  # 70 s: a-0's beat is stale, b-0 never beat
        actions = _settle(monitor, lambda acts: sum(a.get("outcome") == "done" for a in acts) == 2)
    finally:
        monitor.close()
    reasons = sorted((a["node"], a["reason"]) for a in actions if a["outcome"] == "started")
    assert reasons == [(A0, "heartbeat 70 s old"), (B0, "no heartbeat")]
    assert api.get(A, A0).metadata["actex-launch"] == "1" and api.get(B, B0).metadata["actex-launch"] == "1"
    assert fake_tpu.states() == {f"{A}/{A0}": "READY", f"{B}/{B0}": "READY"}  # no VM was replaced


SNAPSHOT = FleetSnapshot(
    fleet="arc", run="gs://bucket/runs/arc", time=0.0, chunks_total=400, chunks_committed=123, chunks_leased=3,
    samples=7_872, tokens=70_848_000, tokens_per_s=41_250.0, eta_s=754.0, complete=False,
    vms=(
        VmView(A0, A, "READY", f"{A0}-812", 4.2, 61, 3_904, 35_136_000, 20_500.0, 0, ""),
        VmView("tpu-us-central1-a-2", A, "CREATING", None, None, 0, 0, 0, 0.0, 1, "recreate"),
        VmView(B0, B, "READY", f"{B0}-77", 3.0, 62, 3_968, 35_712_000, 20_750.0, 0, ""),
        VmView("tpu-us-central1-b-1", B, "PREEMPTED", "tpu-us-central1-b-1-90", 95.0, 0, 0, 0, 0.0, 2, ""),
    ),
    errors=("TPU API: us-central1-b: TPU API still failing after retries: 503",),
)

DASHBOARD = """\
fleet arc  run gs://bucket/runs/arc
chunks 123/400 (30.8%), 3 leased  samples 7,872  tokens 70,848,000  41,250 tok/s  ETA 12m34s
VM                   zone           state      heartbeat  chunks  samples      tokens   tok/s  repairs  action
tpu-us-central1-a-0  us-central1-a  READY         4s ago      61    3,904  35,136,000  20,500        0
tpu-us-central1-a-2  us-central1-a  CREATING           -       0        0           0       0        1  recreate
tpu-us-central1-b-0  us-central1-b  READY         3s ago      62    3,968  35,712,000  20,750        0
tpu-us-central1-b-1  us-central1-b  PREEMPTED  1m35s ago       0        0           0       0        2
TPU API: us-central1-b: TPU API still failing after retries: 503
"""


def test_dashboard_text():
    console = Console(width=120, record=True, color_system=None, file=io.StringIO())
    console.print(render(SNAPSHOT))
    text = "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"
    assert text == DASHBOARD


def test_a_queued_resource_waiting_too_long_moves_to_another_zone(fake_tpu, fleet):
    api, layout, store = fleet
    layout = dataclasses.replace(layout, spec=dataclasses.replace(layout.spec, queued=True))
    fake_tpu.stockout(B)
    create_fleet(api, layout)
    monitor = _monitor(api, layout, store, creating_timeout_s=3.0)
    try:
        assert [vm.name for vm in monitor.tick().vms] == [A0, B0]  # a queued slot is a member before its node exists
        actions = _settle(monitor, lambda acts: any(a.get("outcome") == "done" for a in acts))
        _settle(monitor, lambda acts: fake_tpu.states() == {f"{A}/{A0}": "READY", f"{A}/tpu-us-central1-a-1": "READY"})
    finally:
        monitor.close()
    started = [a for a in actions if a["outcome"] == "started"]
    assert [(a["node"], a["reason"].split(" for ")[0]) for a in started] == [(B0, "WAITING_FOR_RESOURCES")]
    done = next(a for a in actions if a["outcome"] == "done")
    assert (done["zone"], done["node"], done["moved_from"]) == (A, "tpu-us-central1-a-1", f"{B}/{B0}")
    assert sorted(q.split("/")[-1] for q in fake_tpu.queued) == [A0, "tpu-us-central1-a-1"]  # b-0's queue deleted


def test_ctrl_c_stops_watching_and_leaves_the_fleet_running(fake_tpu, fleet, tmp_path):
    import signal
    import subprocess

    import yaml

    from actex.fleet.local import actex_command

    from actex.fleet.deploy import load_fleet

    api, _, _ = fleet
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump({"name": "f", "project": "p", "zones": [A, B], "accelerator_type": "v4-8", "runtime_version": "rt",
                                          "extract": {"output": str(tmp_path / "runs"), "run_name": "r"}}))
    create_fleet(api, load_fleet(fleet_file).layout)
    before = len(fake_tpu.requests)
    monitor = subprocess.Popen([*actex_command(), "monitor", str(fleet_file), "--interval", "0.2", "--api-endpoint", fake_tpu.endpoint],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(fake_tpu.requests) < before + 4:  # one tick's listings (nodes, queues; 2 zones): it is watching
            assert time.monotonic() < deadline and monitor.poll() is None, "the monitor never looked at the fleet"
            time.sleep(0.1)
        monitor.send_signal(signal.SIGINT)
        _, err = monitor.communicate(timeout=60)
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait()
    assert monitor.returncode == 75, err
    assert "the fleet is left running" in err
    assert fake_tpu.states() == {f"{A}/{A0}": "READY", f"{B}/{B0}": "READY"}


def test_an_unreadable_run_and_garbage_heartbeats_leave_the_monitor_running(fake_tpu, fleet):
    api, layout, store = fleet
    store.write_bytes("run.json", b"\x00 not a manifest")
    store.write_bytes("workers/tpu-us-central1-a-0-7.json", b"[garbage")
    monitor = _monitor(api, layout, store)
    try:
        snapshot = monitor.tick()
    finally:
        monitor.close()
    assert len(snapshot.errors) == 1 and snapshot.errors[0].startswith("store: ") and "run.json" in snapshot.errors[0]
    assert monitor.actions == []  # no repair judged on what could not be read


def test_a_worker_that_never_beats_after_its_relaunch_gets_its_vm_recreated(fake_tpu, fleet):
    api, layout, store = fleet
    layout = dataclasses.replace(layout, zones=(A,))
    create_fleet(api, layout, {"actex-launch": "0"})
    first = fake_tpu.node(A, A0).created_at
    now = [time.time()]
    monitor = _monitor(api, layout, store, stale_after_s=60, clock=lambda: now[0])
    try:
        monitor.tick()  # READY: the boot grace period starts
        now[0] += 70
        _settle(monitor, lambda acts: any(a.get("outcome") == "done" for a in acts))  # relaunched
        monitor.tick()  # the relaunched worker's grace period starts
        now[0] += 70  # and ends with still no heartbeat
        actions = _settle(monitor, lambda acts: sum(a.get("outcome") == "done" for a in acts) == 2)
    finally:
        monitor.close()
    started = [(a["event"], a["reason"]) for a in actions if a["outcome"] == "started"]
    assert started == [("relaunch", "no heartbeat"), ("recreate", "no heartbeat since its relaunch")]
    assert fake_tpu.node(A, A0).created_at > first and fake_tpu.states() == {f"{A}/{A0}": "READY"}


def test_heartbeats_of_dead_pids_and_old_ones_are_not_shown_as_live(fake_tpu, fleet):
    """a-0 has a live worker and a restarted one's beat from two hours ago; b-0's only worker
    was SIGKILLed on this host a moment ago. Only a-0's live worker is shown (its row, tok/s),
    the others counted as pruned; the work they did still counts in the totals."""
    import json
    import subprocess
    import sys

    api, layout, store = fleet
    create_fleet(api, layout)
    now = time.time()
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    beats = {f"{A0}-1": ("running", now - 2.0, None), f"{A0}-2": ("running", now - 7200.0, None),
             f"{B0}-{killed.pid}": ("running", now - 1.0, killed.pid)}
    for worker, (state, updated_at, pid) in beats.items():
        Heartbeat(store, worker).beat(force=True)
        beat = {**json.loads(store.read_bytes(f"workers/{worker}.json")), "state": state, "updated_at": updated_at,
                "tokens": 100, "tokens_per_s": 10.0, "host": "here", "pid": pid or 1}
        store.write_bytes(f"workers/{worker}.json", json.dumps(beat).encode())
    monitor = _monitor(api, layout, store, clock=lambda: now, host="here")
    try:
        snapshot = monitor.tick(repair=False)
    finally:
        monitor.close()
    assert [(vm.name, vm.worker) for vm in snapshot.vms] == [(A0, f"{A0}-1"), (B0, None)]
    assert snapshot.pruned == (f"{A0}-2", f"{B0}-{killed.pid}")
    assert snapshot.tokens_per_s == 10.0 and snapshot.tokens == 300
    console = Console(width=160, record=True, color_system=None, file=io.StringIO())
    console.print(render(snapshot))
    assert f"2 heartbeat(s) of gone workers not shown (process gone, or no beat for 1h00m): {A0}-2, {B0}-{killed.pid}" in console.export_text()
