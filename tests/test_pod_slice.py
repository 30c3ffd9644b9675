"""Multi-host pod slices on local processes: real jax.distributed (coordinator on 127.0.0.1,
gloo collectives over CPU devices), real `actex extract` processes, hard timeouts.

What one process stores is the reference: a slice must store the same samples, token ids
and positions byte for byte, every chunk once, and the same float32 activations up to
REL_BOUND. Not bit-identical because each process packs its share into its own [rows, seq]
shapes (half the tokens per step), so XLA:CPU picks other matmul blockings and attention
tiles, and a model axis (within or across processes) sums wo / w_down's partial products
in another order: a few ulps per operation, the bound tests/test_model_mesh.py states for
meshes (observed 2.7e-7 for 2 x 2 with --mesh model=4).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from engine_fixtures import committed_tensors, jax_cache, tiny_model_dir, write_jsonl  # noqa: F401
from slice_fixtures import ACTEX, device_env, free_port, launch_slice, wait_for, wait_slice

from actex.store.commits import read_commits
from actex.store.folder import open_store

ROWS = [{"text": f"row {i}: " + " ".join(str((i * 7 + j) % 10) for j in range(5 + (i * 13) % 40))} for i in range(16)]
HEARTBEAT_S = 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("slice-data") / "rows.jsonl", ROWS)


def extract_args(model_dir: Path, dataset: Path, output: Path, *extra: str) -> list[str]:
    return [
        "extract", "--model", str(model_dir), "--dataset", str(dataset), "--format", "text",
        "--output", str(output), "--run-name", "r", "--layers", "0-1", "--max-seq-len", "64",
        "--batch-tokens", "128", "--chunk-size", "2", "--dtype", "float32", *extra,
    ]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, dataset, tmp_path_factory) -> dict:
    """One process on 4 devices: the same total devices as the 2 x 2 slice."""
    output = tmp_path_factory.mktemp("slice-reference")
    proc = subprocess.run([ACTEX, *extract_args(tiny_model_dir, dataset, output)], env=device_env(4),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return committed_tensors(str(output / "r"))


REL_BOUND = 4e-6  # of the hook's largest |value| in the sample


def assert_same_as_reference(run: Path, reference: dict) -> None:
    stored = committed_tensors(str(run))  # asserts no sample is stored twice
    assert sorted(stored) == sorted(reference)
    for sample, tensors in reference.items():
        assert set(stored[sample]) == set(tensors)
        for name, ref in tensors.items():
            ours = stored[sample][name]
            if name in ("token_ids", "positions"):
                assert ours == ref, f"sample {sample}: {name} differs"
                continue
            a, b = np.frombuffer(ours, np.float32), np.frombuffer(ref, np.float32)
            assert a.shape == b.shape, f"sample {sample}: {name} has {a.size} values, not {b.size}"
            scale = float(np.abs(b).max(initial=0.0)) + 1e-30
            assert float(np.abs(a - b).max(initial=0.0)) <= REL_BOUND * scale, f"sample {sample}: {name} differs"


def commits(run: Path) -> int:
    path = run / "commits"
    return len(list(path.glob("*.json"))) if path.exists() else 0


def test_two_processes_of_two_devices_store_what_one_process_does(reference, tiny_model_dir, dataset, tmp_path):
    procs = launch_slice(2, extract_args(tiny_model_dir, dataset, tmp_path), devices=2)
    codes, logs = wait_slice(procs, timeout_s=180)
    assert codes == [0, 0], logs
    for i, log in enumerate(logs):
        # The one start line: process i of N, host, local devices, coordinator.
        assert re.search(rf"actex: process {i} of 2 on host \S+: 2 local device\(s\) .*; coordinator 127\.0\.0\.1:\d+", log), log
    assert "committed 8 chunk(s)" in logs[0]
    assert_same_as_reference(tmp_path / "r", reference)
    records = read_commits(open_store(str(tmp_path / "r")))
    # Process 0 committed each chunk listing BOTH processes' parts, under one attempt.
    assert all(len({p.path.rsplit("/", 1)[0] for p in r.parts}) == 1 and len(r.parts) >= 2 for r in records.values())


def stored_parts(run: Path) -> tuple[list[str], list[str]]:
    """(every part path the commit records list, every part file under chunks/), both sorted."""
    listed = sorted(p.path for r in read_commits(open_store(str(run))).values() for p in r.parts)
    on_disk = sorted(str(f.relative_to(run)) for f in (run / "chunks").rglob("part-*.safetensors"))
    return listed, on_disk


def test_four_processes_of_one_device_store_what_one_process_does(reference, tiny_model_dir, dataset, tmp_path):
    procs = launch_slice(4, extract_args(tiny_model_dir, dataset, tmp_path), devices=1)
    codes, logs = wait_slice(procs, timeout_s=180)
    assert codes == [0, 0, 0, 0], logs
    assert "committed 8 chunk(s)" in logs[0]
    assert_same_as_reference(tmp_path / "r", reference)
    listed, on_disk = stored_parts(tmp_path / "r")
    assert listed == on_disk and len(set(listed)) == len(listed)


@pytest.mark.parametrize("processes, mesh", [(2, "model=2"), (4, "data=2,model=2")])
def test_a_model_axis_across_processes_stores_what_one_process_does(
        reference, tiny_model_dir, dataset, tmp_path, processes, mesh):
    """Consecutive processes form one model group and hold the same rows; only the
    group's first process writes them. Same bound as for one host: a model axis split over
    processes sums wo / w_down's partial products in another order, as it does over the
    devices of one host (tests/test_model_mesh.py)."""
    procs = launch_slice(processes, extract_args(tiny_model_dir, dataset, tmp_path, "--mesh", mesh), devices=1)
    codes, logs = wait_slice(procs, timeout_s=180)
    assert codes == [0] * processes, logs
    assert_same_as_reference(tmp_path / "r", reference)  # also: no sample stored twice
    listed, on_disk = stored_parts(tmp_path / "r")
    assert listed == on_disk and len(set(listed)) == len(listed)  # nothing written twice, nor left over
    for p in range(1, processes):
        writes = p % 2 == 0  # the first process of each group of two
        assert ("wrote its rows of every chunk" in logs[p]) == writes, logs[p]
        assert ("computed its model shard of every chunk" in logs[p]) != writes, logs[p]


def test_a_config_difference_makes_every_process_exit_2_naming_field_and_process(tiny_model_dir, dataset, tmp_path):
    procs = launch_slice(2, extract_args(tiny_model_dir, dataset, tmp_path), devices=1,
                         extra={1: ["--chunk-size", "3"]})
    codes, logs = wait_slice(procs, timeout_s=120)
    assert codes == [2, 2], logs
    for log in logs:
        assert "actex: error: the processes of the slice disagree on the config: chunk_size on process(es) 1 (3 vs process 0's 2)" in log
    assert not (tmp_path / "r").exists()  # nothing written


BARRIER_SCRIPT = textwrap.dedent("""
    import sys, time
    from actex.config import WorkerOptions
    from actex.engine.distributed import initialize, BarrierTimeout
    me = int(sys.argv[1])
    s = initialize(WorkerOptions(coordinator=sys.argv[2], num_processes=2, process_id=me, worker_host=sys.argv[3],
                                 heartbeat_timeout_s=30, barrier_timeout_s=3))
    if me == 1:
        time.sleep(8)   # alive, heart-beating, but never at the barrier
    else:
        try:
            s.barrier("commit-7")
        except BarrierTimeout as error:
            print("TIMEOUT", error, flush=True)
    s.barrier("end", timeout_s=30)
""")


def test_a_barrier_process_1_never_reaches_names_process_1_and_its_host(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for i, host in enumerate(["host-a", "host-b"]):
        procs.append(subprocess.Popen([sys.executable, "-c", BARRIER_SCRIPT, str(i), coordinator, host], env=device_env(1),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    codes, logs = wait_slice(procs, timeout_s=90)
    assert codes == [0, 0], logs
    assert ("TIMEOUT barrier 'barrier/commit-7' timed out after 3 s on process 0: process 1 (host host-b) "
            "did not arrive") in logs[0], logs[0]


def kill_process_1_after_a_commit(procs: list, run: Path, *, first_commit_s: float, bound_s: float) -> int:
    """SIGKILL process 1 once `run` holds a commit; process 0 must then end, not with 0,
    within `bound_s` (aborted by the coordination service: SIGABRT, 134 from a shell).
    Returns the commits the run holds afterwards."""
    try:
        wait_for(lambda: commits(run) >= 1, first_commit_s, "a first commit")
    except AssertionError:
        wait_slice(procs, 1)
        raise
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    codes, logs = wait_slice(procs, timeout_s=bound_s)
    assert codes[0] not in (0, None), logs[0]
    assert time.monotonic() - killed < bound_s
    return commits(run)


def test_sigkill_of_one_process_stops_the_others_and_the_rerun_completes_identical(
        reference, tiny_model_dir, dataset, tmp_path):
    # One sample per chunk: 16 steps, so the kill lands mid-run even on a fast machine.
    args = extract_args(tiny_model_dir, dataset, tmp_path, "--chunk-size", "1")
    before = kill_process_1_after_a_commit(launch_slice(2, args, devices=2, heartbeat_s=HEARTBEAT_S),
                                           tmp_path / "r", first_commit_s=120, bound_s=HEARTBEAT_S + 40)
    assert 1 <= before < 16
    codes, logs = wait_slice(launch_slice(2, args, devices=2), timeout_s=180)
    assert codes == [0, 0], logs
    assert f"{before} already committed" in logs[0]
    assert_same_as_reference(tmp_path / "r", reference)


def test_sigterm_on_one_host_stops_every_host_at_the_same_step_and_the_rerun_completes(
        reference, tiny_model_dir, dataset, tmp_path):
    args = extract_args(tiny_model_dir, dataset, tmp_path, "--chunk-size", "1", "--preempted-exit-code", "75")
    procs = launch_slice(2, args, devices=2)
    try:
        wait_for(lambda: commits(tmp_path / "r") >= 1, 120, "a first commit")
    except AssertionError:
        wait_slice(procs, 1)
        raise
    procs[1].send_signal(signal.SIGTERM)  # the actex process itself, as a pre-emption would
    codes, logs = wait_slice(procs, timeout_s=90)
    assert codes == [75, 75], logs
    steps = [re.search(r"the slice stops before step (\d+): SIGTERM on process 1", log) for log in logs]
    assert all(steps), logs
    assert steps[0].group(1) == steps[1].group(1)
    assert commits(tmp_path / "r") < 16
    codes, logs = wait_slice(launch_slice(2, args, devices=2), timeout_s=180)
    assert codes == [0, 0], logs
    assert_same_as_reference(tmp_path / "r", reference)


def test_a_slice_and_a_single_claiming_worker_share_one_run_each_chunk_once(
        reference, tiny_model_dir, dataset, tmp_path):
    args = extract_args(tiny_model_dir, dataset, tmp_path, "--claim", "--lease-seconds", "30")
    procs = launch_slice(2, args, devices=2)
    single = subprocess.Popen([ACTEX, *args], env=device_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    codes, logs = wait_slice([*procs, single], timeout_s=240)
    assert codes == [0, 0, 0], logs
    assert_same_as_reference(tmp_path / "r", reference)
    workers = {r.worker for r in read_commits(open_store(str(tmp_path / "r"))).values()}
    assert len(workers) >= 1


def generate_args(model_dir: Path, dataset: Path, output: Path, *extra: str) -> list[str]:
    """Sampled (temperature 1, top-k 40): each sample's tokens hang on its (seed, sample id)
    key alone, whichever process decodes it."""
    return [
        "generate", "--model", str(model_dir), "--dataset", str(dataset), "--format", "text",
        "--output", str(output), "--run-name", "g", "--layers", "0-1", "--max-seq-len", "96",
        "--max-new-tokens", "12", "--batch-tokens", "256", "--chunk-size", "4", "--dtype", "float32",
        "--temperature", "1.0", "--top-k", "40", "--sampling-seed", "3", *extra,
    ]


def generated_texts(run: Path) -> dict[int, str]:
    from actex.reader.run import Run

    stored = Run(open_store(str(run)))
    return {s["sample_id"]: s["generated_text"] for c in range(stored.num_chunks) for s in stored.samples(c)}


def test_generate_on_two_processes_survives_a_peer_kill_and_stores_what_one_process_does(
        tiny_model_dir, dataset, tmp_path):
    """Each process decodes its share of every chunk on its own devices, then all exchange
    the tokens and capture in lockstep. A SIGKILL of one process mid-run (it may be decoding
    or waiting for the other's tokens) ends the other in bounded time; the rerun finishes
    and the run holds the same samples, generated tokens and (within REL_BOUND)
    activations as one process with the same 4 devices."""
    args = lambda output: generate_args(tiny_model_dir, dataset, output, "--chunk-size", "1")  # noqa: E731
    one = subprocess.run([ACTEX, *args(tmp_path / "one")], env=device_env(4), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    run = tmp_path / "slice" / "g"
    before = kill_process_1_after_a_commit(launch_slice(2, args(tmp_path / "slice"), devices=2, heartbeat_s=HEARTBEAT_S),
                                           run, first_commit_s=180, bound_s=HEARTBEAT_S + 60)
    assert 1 <= before < len(ROWS)
    codes, logs = wait_slice(launch_slice(2, args(tmp_path / "slice"), devices=2), timeout_s=240)
    assert codes == [0, 0], logs
    assert f"{before} already committed" in logs[0]
    texts = generated_texts(run)
    assert texts == generated_texts(tmp_path / "one" / "g") and len(texts) == len(ROWS)
    assert len(set(texts.values())) > len(ROWS) // 2  # sampled: the continuations differ
    assert_same_as_reference(run, committed_tensors(str(tmp_path / "one" / "g")))
