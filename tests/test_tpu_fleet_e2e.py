"""End to end: `actex deploy fleet.yaml --create --monitor` against the fake TPU API.

4 VMs over 2 zones boot from their real startup script (the wheel install replaced by
ACTEX_VENV, the venv running these tests) and run `actex extract --claim` workers on a
fake-gcs-server run. Mid-run 2 VMs are pre-empted (their workers SIGKILLed) and one zone is
stocked out; the monitor recreates both, one in the other zone, and exits when the run is
complete: every chunk committed once, tensors equal to one worker's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from engine_fixtures import jax_cache, tiny_model_dir  # noqa: F401 (fixtures)
from fake_tpu_server import FakeTpu
from fleet_fixtures import WORKER_ENV, check_run, fleet_case
from servers import create_gcs_bucket
from typer.testing import CliRunner

from actex.cli import app
from actex.fleet.local import actex_command
from actex.fleet.monitor import read_progress
from actex.store.commits import read_heartbeats
from actex.store.folder import open_store

CHUNKS = 64
ZONES = ("us-central1-a", "us-central1-b")


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"deploy exited {proc.returncode} while waiting for {what}")
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not after {timeout_s:.0f} s")


def _vm_log(fake: FakeTpu) -> str:
    """Every VM's bootstrap and worker logs, for a failing test's report."""
    out = []
    for path in sorted(fake.workdir.glob("*/*.log")):
        out.append(f"--- {path.parent.name}/{path.name}\n{path.read_text(errors='replace')[-1500:]}")
    return "\n".join(out)


@pytest.fixture(scope="module")
def healed(tiny_model_dir, gcs_emulator, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("tpu-e2e")
    started = time.monotonic()
    fields, reference = fleet_case(tiny_model_dir, base, CHUNKS)
    bucket = create_gcs_bucket(gcs_emulator)
    fields = {**fields, "output": bucket}
    vm_env = {**gcs_emulator.env, **WORKER_ENV, "ACTEX_VENV": sys.prefix}
    fake = FakeTpu(vm_env=lambda node: vm_env, workdir=base / "vms", create_s=0.5)
    fleet_file = base / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump({
        "project": "test-project", "zones": list(ZONES), "workers_per_zone": 2,
        "accelerator_type": "v4-8", "runtime_version": "tpu-ubuntu2204-base", "capacity": "spot",
        "extract": fields, "worker_args": ["--lease-seconds", "4"],
    }))
    actions = base / "actions.jsonl"
    env = {**os.environ, **gcs_emulator.env}
    deploy = subprocess.Popen(
        [*actex_command(), "deploy", str(fleet_file), "--create", "--monitor", "--interval", "0.3",
         "--action-log", str(actions), "--api-endpoint", fake.endpoint, "--stale-after", "120"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    store = open_store(f"{bucket}/{fields['run_name']}", **gcs_emulator.storage_options)
    timings = {"reference": time.monotonic() - started}
    started = time.monotonic()
    try:
        # Pre-empt one VM per zone once the run has started committing: mid-run, whatever
        # the uneven start of 4 workers on shared cores. A VM whose worker is beating is
        # preferred, so a victim is usually caught working.
        def victims():
            if not store.exists("run.json") or read_progress(store).committed == 0:
                return None
            beating = {w.rsplit("-", 1)[0] for w in read_heartbeats(store)}
            return [min((f"tpu-{zone}-{i}" for i in range(2)), key=lambda n: (n not in beating, n)) for zone in ZONES]

        chosen = _wait(victims, 240, "the run's first commit", deploy)  # generous: JAX workers starting on 2 shared cores
        timings["preempt"] = time.monotonic() - started
        committed_at_preemption = read_progress(store).committed
        fake.stockout("us-central1-b")
        for zone, name in zip(ZONES, chosen):
            fake.preempt(zone, name)
        output, _ = deploy.communicate(timeout=240)
        result = {
            "fake": fake, "fleet_file": fleet_file, "env": env, "store": store, "reference": reference,
            "url": f"{bucket}/{fields['run_name']}", "storage_options": gcs_emulator.storage_options,
            "returncode": deploy.returncode, "output": output.decode(errors="replace"),
            "actions": [json.loads(line) for line in actions.read_text().splitlines()],
            "committed_at_preemption": committed_at_preemption, "victims": list(zip(ZONES, chosen)),
            "timings": {**timings, "deploy": time.monotonic() - started},
        }
        yield result
    except BaseException:
        print(_vm_log(fake))
        raise
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
        fake.close()


def test_fleet_heals_preemption_and_stockout_and_completes_exactly_once(healed):
    fake, actions = healed["fake"], healed["actions"]
    report = f"{healed['output'][-3000:]}\n{json.dumps(actions, indent=1)}"
    print(report, healed["timings"])
    assert healed["returncode"] == 0, report
    assert healed["committed_at_preemption"] < CHUNKS, "the run finished before the pre-emption"

    check = check_run(healed["url"], healed["storage_options"], healed["reference"])
    assert check.chunks == CHUNKS

    # Both dead VMs were recreated; the one in the stocked-out zone went to the other zone.
    (zone_a, victim_a), (zone_b, victim_b) = healed["victims"]
    survivor_b = next(n for n in ("tpu-us-central1-b-0", "tpu-us-central1-b-1") if n != victim_b)
    started = [a for a in actions if a["event"] == "recreate" and a["outcome"] == "started"]
    assert sorted((a["zone"], a["node"], a["reason"]) for a in started) == [
        (zone_a, victim_a, "PREEMPTED"), (zone_b, victim_b, "PREEMPTED")], report
    done = [a for a in actions if a["event"] == "recreate" and a.get("outcome") == "done"]
    assert sorted((a.get("moved_from", ""), a["zone"], a["node"]) for a in done) == [
        ("", zone_a, victim_a), (f"{zone_b}/{victim_b}", zone_a, "tpu-us-central1-a-2")], report
    assert fake.states() == {
        "us-central1-a/tpu-us-central1-a-0": "READY", "us-central1-a/tpu-us-central1-a-1": "READY",
        "us-central1-a/tpu-us-central1-a-2": "READY", f"us-central1-b/{survivor_b}": "READY",
    }, report
    # The recreated VMs booted from the fleet's startup script: a second boot of the victim's
    # name, a first of the node that replaced the stocked-out zone's VM.
    assert fake.boots[(zone_a, victim_a)] == 2 and fake.boots[(zone_b, victim_b)] == 1
    assert fake.boots[("us-central1-a", "tpu-us-central1-a-2")] == 1
    assert actions[-1]["event"] == "complete"


def test_monitor_once_prints_the_fleet_and_run_as_json(healed):
    out = CliRunner().invoke(app, ["monitor", str(healed["fleet_file"]), "--once", "--api-endpoint", healed["fake"].endpoint])
    assert out.exit_code == 0, out.output
    snapshot = json.loads(out.stdout)
    assert {k: snapshot[k] for k in ("fleet", "run", "chunks_total", "chunks_committed", "complete", "errors")} == {
        "fleet": "fleet", "run": healed["url"], "chunks_total": CHUNKS, "chunks_committed": CHUNKS,
        "complete": True, "errors": [],
    }
    vms = {(vm["zone"], vm["name"]): vm for vm in snapshot["vms"]}
    survivor_b = next(n for n in ("tpu-us-central1-b-0", "tpu-us-central1-b-1") if n != healed["victims"][1][1])
    assert sorted(vms) == [("us-central1-a", f"tpu-us-central1-a-{i}") for i in range(3)] + [("us-central1-b", survivor_b)]
    assert all(vm["state"] == "READY" and vm["repairs"] == 0 and vm["action"] == "" for vm in vms.values())
    # Per-VM counters come from the workers' heartbeats (worker id = "<node>-<pid>").
    survivor = vms[("us-central1-b", survivor_b)]
    assert survivor["worker"].startswith(f"{survivor_b}-") and survivor["chunks"] > 0 and survivor["tokens"] > 0
    assert snapshot["samples"] > 0 and snapshot["tokens"] > 0  # as the workers last reported them


def test_monitor_delete_when_done_removes_vms_but_never_the_run(healed):
    out = CliRunner().invoke(app, ["monitor", str(healed["fleet_file"]), "--delete-when-done", "--interval", "0.2",
                                   "--api-endpoint", healed["fake"].endpoint])
    assert out.exit_code == 0, out.output
    assert "VMs deleted" in out.output
    _wait(lambda: not healed["fake"].nodes, 10, "VMs gone")
    assert all(node.process is None or node.process.poll() is not None for node in healed["fake"].nodes.values())
    check = check_run(healed["url"], healed["storage_options"], healed["reference"])
    assert check.chunks == CHUNKS
    assert healed["store"].exists("run.json")
