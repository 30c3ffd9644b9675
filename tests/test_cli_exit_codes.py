"""`actex extract`'s exit codes from real processes (0 done, 2 bad input before anything is
written, 1 infrastructure failure, 75 stopped before finishing), and the model revision a
run pins in run.json when its hub repo moves on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_fixtures import jax_cache, tiny_model_dir, write_jsonl  # noqa: F401

from actex.engine.prepare import pinned_revision
from actex.model.random_checkpoint import write_random_checkpoint
from actex.store.commits import committed_chunks
from actex.store.folder import open_store
from actex.store.manifest import read_manifest

ACTEX = str(Path(sys.executable).parent / "actex")
ROWS = [{"text": f"row {i}: " + " ".join(str((i * 7 + j) % 10) for j in range(5 + (i * 13) % 40))} for i in range(16)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("exit-data") / "rows.jsonl", ROWS)


def extract_args(model: str, dataset: Path, output: Path, *extra: str) -> list[str]:
    return [
        ACTEX, "extract", "--model", model, "--dataset", str(dataset), "--format", "text",
        "--output", str(output), "--run-name", "r", "--hooks", "blocks.0.hook_resid_post",
        "--dtype", "float32", "--max-seq-len", "64", "--batch-tokens", "128", "--chunk-size", "1", *extra,
    ]


def run(args: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}, **kwargs)


def test_ctrl_c_mid_run_exits_75_and_the_rerun_completes_with_0(tiny_model_dir, dataset, tmp_path):  # noqa: F811
    args = extract_args(str(tiny_model_dir), dataset, tmp_path)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    commits = tmp_path / "r" / "commits"
    try:
        deadline = time.monotonic() + 120
        while not (commits.exists() and any(commits.iterdir())) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = committed_chunks(open_store(tmp_path / "r"))
    assert 0 < len(done) < len(ROWS), "the run was not interrupted mid-way"
    assert proc.returncode == 75, err[-2000:]
    assert "stopped by SIGINT" in out and "left to do" in out
    again = run(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(committed_chunks(open_store(tmp_path / "r"))) == len(ROWS)


BAD_INPUTS = {  # case -> what the one line must say
    "empty dataset": "no rows",
    "num-workers without index": "--worker-index",
    "missing dataset": "no-such.jsonl: no such file",
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_in_one_line_before_anything_is_written(case, tiny_model_dir, tmp_path):  # noqa: F811
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    extra = ("--num-workers", "4") if case == "num-workers without index" else ()
    env = {name: "" for name in ("TPU_WORKER_ID", "CLOUD_TPU_TASK_ID", "JOB_COMPLETION_INDEX")}
    rows = {"empty dataset": empty, "missing dataset": tmp_path / "no-such.jsonl"}.get(case) \
        or write_jsonl(tmp_path / "rows.jsonl", ROWS[:4])
    result = run(extract_args(str(tiny_model_dir), rows, tmp_path / "out", *extra), env)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("actex: error: "), result.stderr
    assert BAD_INPUTS[case] in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_every_row_skipped_exits_2_with_the_counts(tiny_model_dir, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from actex.cli import app

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": ""}, {"other": 1}, {"text": ""}])
    result = CliRunner().invoke(app, extract_args(str(tiny_model_dir), bad, tmp_path / "out", "--on-bad-row", "skip")[1:])
    assert result.exit_code == 2
    assert "all 3 rows skipped" in result.output and "2 x column 'text' is empty" in result.output
    assert not (tmp_path / "out").exists()

    some = write_jsonl(tmp_path / "some.jsonl", [{"text": "a fine row"}, {"text": ""}, {"other": 1}, {"text": ""}])
    result = CliRunner().invoke(app, extract_args(str(tiny_model_dir), some, tmp_path / "out", "--on-bad-row", "skip")[1:])
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "out" / "r"), "--json"])
    assert json.loads(shown.output)["skipped_rows"] == {"column 'text' is empty": 2, "no text column 'text'": 1}


def test_a_write_failing_for_good_mid_run_exits_1(tiny_model_dir, dataset, tmp_path):  # noqa: F811
    args = extract_args(str(tiny_model_dir), dataset, tmp_path, "--chunk-size", "40")
    # Writes past 64 KiB fail with EFBIG (SIGXFSZ ignored): a disk that fills up after
    # run.json was written. A shell sets the limit, so this process need not fork itself.
    result = run(["bash", "-c", 'trap "" XFSZ; ulimit -f 64; exec "$@"', "bash", *args])
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("actex: error: ")
    assert "File too large" in result.stderr
    assert (tmp_path / "r" / "run.json").exists() and not committed_chunks(open_store(tmp_path / "r"))


# --------------------------------------------------------------------------- revision pinning


def _snapshot(cache: Path, commit: str, source: Path) -> None:
    shutil.copytree(source, cache / "snapshots" / commit)


def test_a_run_pins_the_hub_commit_it_was_created_from(tiny_model_dir, dataset, tmp_path):  # noqa: F811
    """Two snapshots of one repo in an offline HF cache; refs/main moves between workers."""
    old, new = "a" * 40, "b" * 40
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    _snapshot(repo, old, tiny_model_dir)
    _snapshot(repo, new, tiny_model_dir)
    write_random_checkpoint(repo / "snapshots" / new, json.loads((tiny_model_dir / "config.json").read_text()), seed=2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(old)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    rows = write_jsonl(tmp_path / "rows.jsonl", ROWS[:4])
    worker = lambda index, *extra: extract_args("org/tiny", rows, tmp_path, "--num-workers", "2", "--worker-index", str(index), *extra)  # noqa: E731

    first = run(worker(0), env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["revision"] == old

    (repo / "refs" / "main").write_text(new)  # the hub repo got a new commit
    joining = run(worker(1), env)  # the model fingerprint must match run.json's: old commit
    assert joining.returncode == 0, joining.stderr[-2000:]
    assert len(committed_chunks(open_store(tmp_path / "r"))) == 4

    # Naming the recorded commit is accepted (and needs no hub look-up).
    assert pinned_revision("org/tiny", old, read_manifest(open_store(tmp_path / "r"))) == old
    moved = run(worker(0, "--revision", "main"), env)
    assert moved.returncode == 2, moved.stderr[-2000:]
    assert f"--revision main is commit {new}, but this run was created from commit {old}" in moved.stderr
