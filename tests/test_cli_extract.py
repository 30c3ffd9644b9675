"""`actex extract / demo / inspect` as users run them: real processes killed with SIGKILL at
random moments and rerun, static workers in parallel, one-line user errors, the demo."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_fixtures import committed_tensors, jax_cache, tiny_model_dir, write_jsonl  # noqa: F401
from typer.testing import CliRunner

from actex import open_run
from actex.cli import app
from actex.store.commits import read_commits
from actex.store.folder import open_store

ACTEX = str(Path(sys.executable).parent / "actex")
ROWS = [{"text": f"row {i}: " + " ".join(str((i * 7 + j) % 10) for j in range(5 + (i * 13) % 40))} for i in range(24)]
runner = CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("cli-data") / "rows.jsonl", ROWS)


def extract_args(model_dir: Path, dataset: Path, output: Path, *extra: str) -> list[str]:
    return [
        "extract", "--model", str(model_dir), "--dataset", str(dataset), "--format", "text",
        "--output", str(output), "--run-name", "r", "--layers", "0-1", "--activation", "residual",
        "--hooks", "", "--max-seq-len", "64", "--batch-tokens", "128", "--chunk-size", "2", *extra,
    ]


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([ACTEX, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, dataset, tmp_path_factory) -> Path:
    """One uninterrupted run, in-process through the same CLI code path."""
    output = tmp_path_factory.mktemp("reference")
    result = runner.invoke(app, extract_args(tiny_model_dir, dataset, output))
    assert result.exit_code == 0, result.output
    return output / "r"


def num_commits(run: Path) -> int:
    commits = run / "commits"
    return sum(1 for p in commits.iterdir() if p.suffix == ".json") if commits.exists() else 0


def attempt_dirs(run: Path) -> set[tuple[int, str]]:
    chunks = run / "chunks"
    return {(int(c.name), a.name) for c in chunks.iterdir() for a in c.iterdir()} if chunks.exists() else set()


def uncommitted_with_parts(run: Path, ignore: set) -> list[tuple[int, str]]:
    """Attempts (not in `ignore`) holding a part file whose chunk has no commit record yet."""
    return sorted(
        (chunk, attempt) for chunk, attempt in attempt_dirs(run) - ignore
        if any((run / "chunks" / f"{chunk:06d}" / attempt).glob("part-*.safetensors"))
        and not (run / "commits" / f"{chunk:06d}.json").exists()
    )


def kill_between_part_and_commit(proc: subprocess.Popen, run: Path) -> list[tuple[int, str]]:
    """SIGKILL `proc` at a moment when one of its attempts has a part on disk and no commit.

    Seen from outside: once such an attempt shows up, the process is frozen (SIGSTOP; the
    store is a local folder, so nothing of its lands while frozen) and looked at again; if
    the commit got in first, it is thawed and the next chunk is tried.
    """
    before = attempt_dirs(run)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the worker finished before a kill could land"
        if uncommitted_with_parts(run, before):
            os.kill(proc.pid, signal.SIGSTOP)
            while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
                time.sleep(0.001)
            if caught := uncommitted_with_parts(run, before):
                proc.kill()
                proc.wait()
                return caught
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.001)


def test_sigkill_at_random_moments_then_rerun_gives_every_chunk_once(reference, tiny_model_dir, dataset, tmp_path):
    rng = random.Random(7)
    run = tmp_path / "r"
    args = extract_args(tiny_model_dir, dataset, tmp_path)
    total = len(read_commits(open_store(reference)))
    kills = 0
    # One kill lands between a part upload and its commit, deterministically (see above).
    proc = cli(*args)
    orphans = kill_between_part_and_commit(proc, run)
    proc.stdout.close()
    # The first kill lands during start-up, the others once a random number of chunks is
    # committed (plus a random few ms): before, during and after part uploads and commits.
    targets = [0] + sorted(rng.sample(range(1, total - 3), 4))
    for target in targets:
        proc = cli(*args)
        deadline = time.monotonic() + 60
        while num_commits(run) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02) if target else rng.uniform(0.5, 2.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += num_commits(run) < total  # a kill that interrupted work
        proc.wait()
        proc.stdout.close()
    assert kills >= 4

    final = cli(*args)
    out, _ = final.communicate(timeout=120)
    assert final.returncode == 0, out
    assert "already committed" in out

    records = read_commits(open_store(run))
    assert sorted(records) == list(range(total))
    assert committed_tensors(str(run)) == committed_tensors(str(reference))  # byte-equal tensors
    # The attempt killed before its commit is still on disk, and nothing reads it: no
    # record names it and the reader's parts all lie in the attempts the records name.
    assert all(any((run / "chunks" / f"{chunk:06d}" / attempt).glob("part-*.safetensors")) for chunk, attempt in orphans)
    assert all(records[chunk].attempt != attempt for chunk, attempt in orphans)
    named = {f"chunks/{chunk:06d}/{r.attempt}/" for chunk, r in records.items()}
    parts = open_run(str(run)).parts()
    assert len(parts) >= total and all(p.path[: p.path.rindex("/") + 1] in named for p in parts)


def test_three_static_workers_in_parallel_equal_one_worker(reference, tiny_model_dir, dataset, tmp_path):
    args = extract_args(tiny_model_dir, dataset, tmp_path, "--num-workers", "3")
    procs = [cli(*args, "--worker-index", "0"), cli(*args, "--worker-index", "1")]
    # The third takes its index from the environment, as on a TPU VM.
    procs.append(subprocess.Popen([ACTEX, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "TPU_WORKER_ID": "2"}))
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
    records = read_commits(open_store(tmp_path / "r"))
    assert {r.worker for r in records.values()} == {"w0", "w1", "w2"}
    assert all(int(r.worker[1:]) == chunk % 3 for chunk, r in records.items())
    assert committed_tensors(str(tmp_path / "r")) == committed_tensors(str(reference))


def snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--dtype", "float32"], "holds a different run: config.dtype: ours 'float32' vs stored 'bfloat16'"),
        (["--hooks", "blocks.0.hook_nope", "--layers", None], "unknown hook 'blocks.0.hook_nope'"),
        (["--layers", "0-5"], "layer 2 out of range: model has 2 layers (0-1)"),
        (["--dataset", "MISSING"], "MISSING"),
        (["--output", "UNWRITABLE"], "Not a directory"),
    ],
    ids=["config-mismatch", "unknown-hook", "layer-out-of-range", "missing-dataset", "unwritable-output"],
)
def test_user_errors_are_one_line_and_touch_nothing(reference, tiny_model_dir, dataset, tmp_path, change, expected):
    args = extract_args(tiny_model_dir, dataset, reference.parent)
    replacements = {"MISSING": str(tmp_path / "no-such.jsonl"), "UNWRITABLE": str(dataset / "out")}
    for flag, value in zip(change[::2], change[1::2]):
        at = args.index(flag) if flag in args else len(args)
        del args[at : at + 2]
        if value is not None:
            args[at:at] = [flag, replacements.get(value, value)]
    expected = replacements.get(expected, expected)
    before = snapshot(reference)

    result = runner.invoke(app, args)

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("actex: error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert snapshot(reference) == before


def test_demo_then_inspect(tmp_path, jax_cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = runner.invoke(app, ["demo", "--output", str(tmp_path / "demo"), "--tasks", "1"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "demo" / "demo"
    assert f"-> {run}" in result.stdout
    assert (tmp_path / "cache" / "actex").is_dir()

    shown = runner.invoke(app, ["inspect", str(run), "--json"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.stdout)
    assert summary["chunks_committed"] == summary["chunks_total"] >= 1
    assert summary["samples"] == 2 and summary["tokens"] > 0 and summary["bytes"] > 0
    assert summary["dtype"] == "bfloat16"
    assert summary["hooks"]["blocks.3.hook_resid_post"]["width"] == 128
    assert summary["config"]["data"]["format"] == "arc"

    missing = runner.invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no run.json" in missing.stderr


def test_config_file_fields_with_flags_overriding(reference, tiny_model_dir, dataset, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\noutput: {tmp_path}\nrun_name: from-file\nlayers: '0'\nchunk_size: 5\n"
        f"shard_size: 1000000\ndata: {{dataset: {dataset}, format: text, max_seq_len: 64, limit: 4}}\n"
    )
    result = runner.invoke(app, ["extract", "--config", str(config), "--chunk-size", "3", "--shard-size", "2MB"])
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "from-file" / "run.json").read_text())["config"]
    assert stored["hooks"] == ["blocks.0.hook_resid_post"]
    assert (stored["chunk_size"], stored["shard_size"]) == (3, 2_000_000)  # flags win
    assert stored["data"]["limit"] == 4 and stored["data"]["max_seq_len"] == 64  # file kept
    assert stored["compute_dtype"] == "float32"  # the checkpoint's dtype

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nbogus_field: 1\n")
    result = runner.invoke(app, ["extract", "--config", str(bad), "--output", str(tmp_path), "--dataset", str(dataset)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "unknown config field(s) bogus_field" in result.stderr
