"""The fleet monitor leaves a READY VM whose worker beats alone, however old the VM (issue 26).

`--creating-timeout` is for VMs that never finish CREATING (or wait in a queue); a VM
that is READY and whose heartbeat is fresh is working, and recreating it would throw away
its chunk in flight. Before, only the queued-resource test caught a monitor that judged
every VM by its age.
"""

from __future__ import annotations

import json
import time

import pytest
from fake_tpu_server import fake_tpu  # noqa: F401 (fixture)

from actex.fleet.deploy import create_fleet
from actex.fleet.recovery import FleetMonitor
from actex.fleet.tpu import FleetLayout
from actex.fleet.tpu_api import NodeSpec, TpuApi
from actex.store import layout
from actex.store.folder import open_store

ZONE, NODE = "us-central1-a", "tpu-us-central1-a-0"
CREATING_TIMEOUT_S, STALE_AFTER_S = 30.0, 60.0


@pytest.mark.parametrize("age_s", [CREATING_TIMEOUT_S + 5, 10 * 3600])
def test_a_ready_vm_with_a_fresh_heartbeat_is_left_alone_whatever_its_age(fake_tpu, tmp_path, age_s):
    api = TpuApi("p", api_endpoint=fake_tpu.endpoint, poll_initial_s=0.05, poll_max_s=0.2)
    fleet = FleetLayout("f", "p", (ZONE,), 1, NodeSpec("v4-8", "rt", "spot"))
    create_fleet(api, fleet)
    fake_tpu.node(ZONE, NODE).created_at -= age_s
    store = open_store(str(tmp_path / "run"))
    now = [time.time()]
    actions: list[dict] = []
    monitor = FleetMonitor(api, fleet, store, metadata={"startup-script": "echo boot"}, backoff_s=0.0,
                           creating_timeout_s=CREATING_TIMEOUT_S, stale_after_s=STALE_AFTER_S,
                           on_action=actions.append, clock=lambda: now[0])
    try:
        for _ in range(4):  # 150 s of ticks: past the boot grace period, each beat 0 s old
            beat = {"worker": f"{NODE}-7", "state": "running", "updated_at": now[0], "chunks_done": 1}
            store.write_bytes(layout.worker_path(f"{NODE}-7"), json.dumps(beat).encode())
            vm = monitor.tick().vms[0]
            assert (vm.state, vm.action, vm.heartbeat_age_s) == ("READY", "", 0.0)
            now[0] += STALE_AFTER_S * 5 / 6
    finally:
        monitor.close()
    assert actions == []
    assert fake_tpu.states() == {f"{ZONE}/{NODE}": "READY"}
