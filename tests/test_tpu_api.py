"""TpuApi and the fleet operations through the real google-cloud-tpu client (REST) against
the fake TPU API: idempotence, retries of 5xx answers, stockouts, operations, names."""

from __future__ import annotations

import pytest
from fake_tpu_server import fake_tpu  # noqa: F401 (fixture)

from actex.fleet.deploy import create_fleet
from actex.fleet.tpu import FleetLayout, members, node_name, recreate_node
from actex.fleet.tpu_api import CapacityError, NodeSpec, TpuApi, TpuApiError

A, B = "us-central1-a", "us-central1-b"


def _api(fake, **kwargs) -> TpuApi:
    return TpuApi("p", api_endpoint=fake.endpoint, poll_initial_s=0.05, poll_max_s=0.2, **kwargs)


def _layout(**kwargs) -> FleetLayout:
    return FleetLayout("f", "p", (A, B), 2, NodeSpec("v4-8", "tpu-ubuntu2204-base", "spot"), **kwargs)


def test_node_names_follow_region_zone_letter_index():
    assert node_name("tpu", "us-central1-a", 3) == "tpu-us-central1-a-3"
    assert _layout().planned() == [(A, "tpu-us-central1-a-0"), (A, "tpu-us-central1-a-1"), (B, "tpu-us-central1-b-0"), (B, "tpu-us-central1-b-1")]
    with pytest.raises(ValueError, match="not a GCP zone"):
        node_name("tpu", "central", 0)
    with pytest.raises(ValueError, match="not a valid TPU node id"):
        node_name("TPU_", "us-central1-a", 0)


def test_create_and_delete_are_idempotent_and_wait_for_their_operations(fake_tpu):
    api = _api(fake_tpu)
    spec = NodeSpec("v4-8", "rt", "spot", metadata={"k": "v"}, labels={"l": "x"})
    assert api.create(A, "n", spec) is True
    node = api.get(A, "n")  # the create returned once the operation was done: READY
    assert (node.state, node.capacity, node.metadata, node.labels) == ("READY", "spot", {"k": "v"}, {"l": "x"})
    assert api.create(A, "n", spec) is False  # exists: nothing done
    assert api.delete(A, "n") is True
    assert api.get(A, "n") is None
    assert api.delete(A, "n") is False  # missing: nothing done


def test_transient_5xx_answers_are_retried(fake_tpu):
    api = _api(fake_tpu)
    fake_tpu.fail_next(3, 503)
    assert api.create(A, "n", NodeSpec("v4-8", "rt")) is True
    assert [s for _, _, s in fake_tpu.requests[:3]] == [503, 503, 503]


def test_5xx_beyond_the_retry_budget_is_an_api_error(fake_tpu):
    api = _api(fake_tpu, retry_s=0.5)
    fake_tpu.fail_next(1000, 500)
    with pytest.raises(TpuApiError, match="after retries"):
        api.list(A)


def test_stockout_is_a_capacity_error_naming_the_zone(fake_tpu):
    fake_tpu.stockout(B)
    with pytest.raises(CapacityError, match=f"{B}: no capacity"):
        _api(fake_tpu).create(B, "n", NodeSpec("v4-8", "rt"))


def test_an_operation_that_never_finishes_times_out(fake_tpu):
    fake_tpu.stick_creating(1)
    with pytest.raises(TpuApiError, match="not done after"):
        _api(fake_tpu, op_timeout_s=1.0).create(A, "n", NodeSpec("v4-8", "rt"))
    assert _api(fake_tpu).get(A, "n").state == "CREATING"


def test_fleet_creation_sends_a_stocked_out_zones_vms_to_the_other_zone(fake_tpu):
    api, layout = _api(fake_tpu), _layout()
    fake_tpu.stockout(B)
    placements = create_fleet(api, layout)
    assert sorted((p.zone, p.name) for p in placements) == [(A, f"tpu-us-central1-a-{i}") for i in range(4)]
    nodes = {n.name: n for n in api.list(A)}
    assert all(n.labels["actex-fleet"] == "f" and n.metadata["actex-node"] == n.name for n in nodes.values())
    # The fleet has its 4 VMs: the missing planned names of zone b are not holes.
    assert [node is None for _, _, node in members(layout, nodes.values())] == [False] * 4
    assert create_fleet(api, layout) == []  # idempotent: all there


def test_recreate_deletes_a_preempted_vm_and_keeps_its_startup_script(fake_tpu):
    api, layout = _api(fake_tpu), _layout()
    create_fleet(api, layout, {"startup-script": "echo hi"})
    fake_tpu.preempt(A, "tpu-us-central1-a-1")
    dead = api.get(A, "tpu-us-central1-a-1")
    created_before = fake_tpu.node(A, "tpu-us-central1-a-1").created_at
    placement = recreate_node(api, layout, A, "tpu-us-central1-a-1", dead)
    assert (placement.zone, placement.name, placement.created) == (A, "tpu-us-central1-a-1", True)
    node = api.get(A, "tpu-us-central1-a-1")
    assert node.state == "READY" and node.metadata["startup-script"] == "echo hi"
    assert fake_tpu.node(A, "tpu-us-central1-a-1").created_at > created_before
    assert ("DELETE", f"/v2/projects/p/locations/{A}/nodes/tpu-us-central1-a-1") in {(m, p.split("?")[0]) for m, p, _ in fake_tpu.requests}


def test_queued_resources_wait_for_capacity_then_provision_their_node(fake_tpu):
    api = _api(fake_tpu)
    spec = NodeSpec("v5litepod-8", "rt", "spot", metadata={"startup-script": "echo hi"}, queued=True)
    fake_tpu.stockout(B)
    assert api.create(B, "q", spec) is True and api.create(B, "q", spec) is False
    waiting = _until(lambda: api.get(B, "q"), lambda n: n.state == "WAITING_FOR_RESOURCES")
    assert waiting.queued and waiting.metadata["startup-script"] == "echo hi"
    assert [(n.name, n.state) for n in api.list(B)] == [("q", "WAITING_FOR_RESOURCES")]
    fake_tpu.stockout(B, False)
    node = _until(lambda: api.get(B, "q"), lambda n: n.state == "READY")
    assert (node.queued, node.capacity) == (False, "spot")
    fake_tpu.preempt(B, "q")
    assert api.get(B, "q").state == "PREEMPTED"
    assert api.delete(B, "q") is True  # the node, then its queued resource
    assert api.get(B, "q") is None and not fake_tpu.queued
    with pytest.raises(ValueError, match="spot or on-demand"):
        NodeSpec("v4-8", "rt", "preemptible", queued=True)


def _until(get, ok, timeout_s: float = 10.0):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := get()) is not None and ok(value):
            return value
        time.sleep(0.05)
    raise AssertionError(f"not reached: {get()}")


def test_actex_tpu_commands_reach_the_endpoint_named_by_the_environment(fake_tpu):
    import json

    from typer.testing import CliRunner

    from actex.cli import app

    runner = CliRunner(env={"ACTEX_TPU_API_ENDPOINT": fake_tpu.endpoint})
    fleet = ["--project", "p", "--zones", f"{A},{B}", "--spot"]
    fake_tpu.stockout(B)
    created = runner.invoke(app, ["tpu", "create", *fleet])
    assert created.exit_code == 0, created.output
    assert sorted(json.loads(line)["node"] for line in created.stdout.splitlines()) == ["tpu-us-central1-a-0", "tpu-us-central1-a-1"]
    fake_tpu.preempt(A, "tpu-us-central1-a-0")
    status = runner.invoke(app, ["tpu", "status", *fleet, "--json"])
    assert [json.loads(line)["state"] for line in status.stdout.splitlines()] == ["PREEMPTED", "READY"]
    recreated = runner.invoke(app, ["tpu", "recreate", *fleet])
    assert json.loads(recreated.stdout) == {"event": "recreate", "node": "tpu-us-central1-a-0", "zone": A, "was": "PREEMPTED"}
    deleted = runner.invoke(app, ["tpu", "delete", *fleet])
    again = runner.invoke(app, ["tpu", "delete", *fleet])
    assert sorted(json.loads(line)["event"] for line in deleted.stdout.splitlines()) == ["absent", "delete", "delete"]
    assert {json.loads(line)["event"] for line in again.stdout.splitlines()} == {"absent"}
    assert runner.invoke(app, ["tpu", "list", *fleet, "--spot", "--reserved"]).exit_code == 2


def test_a_foreign_vm_under_a_planned_name_survives_create_recreate_and_delete(fake_tpu):
    """Another team's unlabelled VM holds tpu-us-central1-a-0, and another fleet with the same
    prefix shares the zone: each command leaves them alone and says so."""
    import json

    from typer.testing import CliRunner

    from actex.cli import app

    api = _api(fake_tpu)
    theirs = NodeSpec("v4-8", "rt", "spot", metadata={"startup-script": "their own"}, labels={"team": "other"})
    api.create(A, "tpu-us-central1-a-0", theirs)
    runner = CliRunner(env={"ACTEX_TPU_API_ENDPOINT": fake_tpu.endpoint})
    ours = ["--project", "p", "--zones", A, "--workers-per-zone", "2", "--spot", "--name", "ours"]
    other = [*ours[:-1], "other-fleet"]

    def events(args):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines()]

    created = events(["tpu", "create", *ours])
    assert sorted((e["event"], e["node"]) for e in created) == [  # creates run in parallel
        ("create", "tpu-us-central1-a-1"), ("create", "tpu-us-central1-a-2"), ("skipped", "tpu-us-central1-a-0")]
    assert "not this fleet's VM" in next(e["reason"] for e in created if e["event"] == "skipped")
    # A second fleet of the same prefix takes the names left free, and touches nothing of ours.
    assert sorted(e["node"] for e in events(["tpu", "create", *other]) if e["event"] == "create") == [
        "tpu-us-central1-a-3", "tpu-us-central1-a-4"]

    fake_tpu.preempt(A, "tpu-us-central1-a-0")
    fake_tpu.preempt(A, "tpu-us-central1-a-1")
    recreated = [e for e in events(["tpu", "recreate", *ours]) if e["event"] == "recreate"]
    assert [e["node"] for e in recreated] == ["tpu-us-central1-a-1"]
    foreign = api.get(A, "tpu-us-central1-a-0")
    assert (foreign.state, foreign.labels, foreign.metadata) == ("PREEMPTED", {"team": "other"}, {"startup-script": "their own"})

    deleted = events(["tpu", "delete", *ours])
    assert sorted((e["event"], e["node"]) for e in deleted) == [
        ("delete", "tpu-us-central1-a-1"), ("delete", "tpu-us-central1-a-2"), ("skipped", "tpu-us-central1-a-0")]
    assert sorted(n.name for n in api.list(A)) == [f"tpu-us-central1-a-{i}" for i in (0, 3, 4)]


def test_creating_a_name_a_foreign_vm_took_meanwhile_takes_the_next_free_name(fake_tpu):
    """A slot planned as a-0 (free when listed) was taken by someone else before the create."""
    from actex.fleet.tpu import create_node

    api, layout = _api(fake_tpu), _layout()
    api.create(A, "tpu-us-central1-a-0", NodeSpec("v4-8", "rt"))
    placement = create_node(api, layout, A, "tpu-us-central1-a-0")
    assert (placement.zone, placement.name, placement.created) == (A, "tpu-us-central1-a-1", True)
    assert api.get(A, "tpu-us-central1-a-0").labels == {}
    with pytest.raises(ValueError, match="not a VM of fleet f"):
        recreate_node(api, layout, A, "tpu-us-central1-a-0", api.get(A, "tpu-us-central1-a-0"))


def test_vms_get_the_fleet_files_identity_and_network_and_deploy_warns_without_one(fake_tpu, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from actex.cli import app

    def deploy(run_name: str, **fields):
        path = tmp_path / f"{run_name}.yaml"
        path.write_text(yaml.safe_dump({"project": "p", "zones": [A], "accelerator_type": "v4-8", "runtime_version": "rt",
                                        "image": "example/actex@sha256:" + "0" * 64, **fields,
                                        "extract": {"output": str(tmp_path / "runs"), "run_name": run_name}}))
        result = CliRunner().invoke(app, ["deploy", str(path), "--create", "--api-endpoint", fake_tpu.endpoint])
        assert result.exit_code == 0, result.output
        return result.stderr

    warned = deploy("plain", prefix="plain")
    assert "no service_account: the VMs run as the project's default compute account" in warned
    assert not fake_tpu.node(A, "plain-us-central1-a-0").body.get("serviceAccount")
    quiet = deploy("scoped", prefix="scoped", service_account="w@p.iam.gserviceaccount.com", scopes=["https://www.googleapis.com/auth/devstorage.read_write"],
                   network="actex-net", subnetwork="actex-sub", internal_ips_only=True)
    assert "warning" not in quiet
    body = fake_tpu.node(A, "scoped-us-central1-a-0").body
    assert body["serviceAccount"] == {"email": "w@p.iam.gserviceaccount.com", "scope": ["https://www.googleapis.com/auth/devstorage.read_write"]}
    assert body["networkConfig"] == {"network": "actex-net", "subnetwork": "actex-sub"}  # enableExternalIps false: the JSON default, left out
