"""`actex generate --claim` on a pod slice (local jax.distributed processes) is exactly
once as `actex extract --claim` is: a slice and a single worker lease chunks of one run,
every chunk is committed once, the samples equal one process's run, and a rerun resumes
from the commits (computes nothing again).
"""

from __future__ import annotations

import subprocess

from engine_fixtures import committed_tensors, jax_cache, tiny_model_dir  # noqa: F401
from slice_fixtures import ACTEX, device_env, launch_slice, wait_slice
from test_pod_slice import assert_same_as_reference, dataset, generate_args, generated_texts  # noqa: F401

from actex.store.commits import read_commits
from actex.store.folder import open_store

CLAIM = ("--claim", "--lease-seconds", "30", "--chunk-size", "2")


def test_a_generating_slice_and_a_single_worker_claim_each_chunk_once_and_resume(tiny_model_dir, dataset, tmp_path):
    one = subprocess.run([ACTEX, *generate_args(tiny_model_dir, dataset, tmp_path / "one", "--chunk-size", "2")],
                         env=device_env(4), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    reference = committed_tensors(str(tmp_path / "one" / "g"))

    args = generate_args(tiny_model_dir, dataset, tmp_path / "shared", *CLAIM)
    procs = launch_slice(2, args, devices=2)
    single = subprocess.Popen([ACTEX, *args], env=device_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    codes, logs = wait_slice([*procs, single], timeout_s=300)
    assert codes == [0, 0, 0], logs
    run = tmp_path / "shared" / "g"
    assert_same_as_reference(run, reference)  # every sample once, as one process stores it
    assert generated_texts(run) == generated_texts(tmp_path / "one" / "g")
    records = read_commits(open_store(str(run)))
    assert sorted(records) == list(range(8))  # 16 rows in chunks of 2, each committed once

    # The rerun resumes from the commits: nothing is claimed or committed again.
    codes, logs = wait_slice(launch_slice(2, args, devices=2), timeout_s=180)
    assert codes == [0, 0], logs
    assert "committed 0 chunk(s)" in logs[0], logs[0]
    assert read_commits(open_store(str(run))) == records
