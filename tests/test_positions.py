"""Token selection (`--positions`, issue 23 item 3): a run stores exactly the selected tokens
of each window, with the values the every-token run stores for them, the same across a
rerun, a resume and a mesh; statistics cover only the stored tokens.

Runs are real `actex extract` processes: the CLI is the interface users rely on, and a
mesh needs its own process anyway (the device count is fixed when jax starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from engine_fixtures import arc_dataset, committed_tensors, jax_cache, tiny_model_dir, write_jsonl  # noqa: F401
from typer.testing import CliRunner

from actex.cli import app
from actex.config import check_positions
from actex.data.positions import PositionSelection
from actex.store import layout
from actex.store.commits import read_commits
from actex.store.folder import open_store
from actex.store.stats import HookStats, decode_stats

ACTEX = str(Path(sys.executable).parent / "actex")
HOOK = "blocks.0.hook_resid_post"
# Varied lengths; max-seq-len 48 splits the longest rows into two windows (long-policy split).
ROWS = [{"text": f"row {i}: " + " ".join(str((i * 7 + j) % 10) for j in range(3 + (i * 13) % 70))} for i in range(10)]
SEED = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("positions-data") / "rows.jsonl", ROWS)


def extract(model: Path, dataset: Path, output: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [
        ACTEX, "extract", "--model", str(model), "--dataset", str(dataset), "--format", "text",
        "--output", str(output), "--run-name", "r", "--hooks", HOOK, "--dtype", "float32",
        "--max-seq-len", "48", "--long-policy", "split", "--batch-tokens", "128", "--chunk-size", "3",
        "--seed", str(SEED), *extra,
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def stored(output: Path) -> dict[int, dict[str, np.ndarray]]:
    """sample id -> token_ids, positions, activations of run `output/r`."""
    out = {}
    for sample, tensors in committed_tensors(str(output / "r")).items():
        out[sample] = {
            "token_ids": np.frombuffer(tensors["token_ids"], np.int32),
            "positions": np.frombuffer(tensors["positions"], np.int32),
            "acts": np.frombuffer(tensors[HOOK], np.float32).reshape(-1, 32),
        }
    return out


def splitmix_keep(seed: int, sample_id: int, index: int, rate: float) -> bool:
    """docs/store.md's rule, in plain Python integers (independent of the numpy code)."""
    mask = (1 << 64) - 1

    def mix(x: int) -> int:
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    golden = 0x9E3779B97F4A7C15
    key = mix((seed * golden + sample_id) & mask)
    return (mix((key + (index + 1) * golden) & mask) >> 11) / 2**53 < rate


def expected(everything: dict, rule) -> dict[int, np.ndarray]:
    """sample id -> the rows of the every-token run that `rule(sample, index, position)` keeps."""
    return {
        sample: np.array([rule(sample, i, int(p)) for i, p in enumerate(rows["positions"])], bool)
        for sample, rows in everything.items()
    }


def assert_selected(selected: dict, everything: dict, keep: dict) -> None:
    assert sorted(selected) == sorted(everything)
    for sample, rows in everything.items():
        for name in ("token_ids", "positions", "acts"):
            np.testing.assert_array_equal(selected[sample][name], rows[name][keep[sample]], err_msg=f"sample {sample} {name}")


def chunk_stats(output: Path) -> HookStats:
    store = open_store(str(output / "r"))
    records = read_commits(store).values()
    return HookStats.merge_all(decode_stats(store.read_bytes(r.stats_path))[HOOK] for r in records)


@pytest.fixture(scope="module")
def everything(tmp_path_factory, tiny_model_dir, dataset) -> dict:  # noqa: F811
    output = tmp_path_factory.mktemp("positions-all")
    extract(tiny_model_dir, dataset, output)
    return stored(output)


def test_spellings_are_checked_and_made_canonical():
    assert check_positions("all") == "all"
    assert check_positions("skip-first:4") == "skip-first:4"
    assert check_positions("sample:0.250") == "sample:0.25"
    for bad in ("skip-first:0", "sample:0", "sample:1.5", "first:3", "sample:", "skip-first:-1"):
        with pytest.raises(ValueError):
            check_positions(bad)


def test_the_numpy_rule_is_the_documented_hash():
    select = PositionSelection("sample:0.3", SEED)
    keep = select.keep(7, 40, 100)
    assert keep.tolist() == [splitmix_keep(SEED, 7, 40 + i, 0.3) for i in range(100)]


def test_skip_first_stores_exactly_positions_from_k(tmp_path, tiny_model_dir, dataset, everything):  # noqa: F811
    extract(tiny_model_dir, dataset, tmp_path, "--positions", "skip-first:2")
    selected = stored(tmp_path)
    keep = expected(everything, lambda sample, index, position: position >= 2)
    assert sum(k.sum() for k in keep.values()) < sum(len(k) for k in keep.values())
    assert_selected(selected, everything, keep)
    # Recorded in run.json; samples.jsonl counts the stored tokens.
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert manifest["config"]["positions"] == "skip-first:2"
    # Statistics are of the stored tokens only.
    stats = chunk_stats(tmp_path)
    values = np.concatenate([rows["acts"] for rows in selected.values()]).astype(np.float64)
    assert stats.count == len(values)
    np.testing.assert_allclose(stats.mean, values.mean(0), rtol=1e-5, atol=1e-6)
    # verify cannot recompute a window whose first tokens were dropped: refused in one line.
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "r")])
    assert result.exit_code == 2 and "stores --positions skip-first:2" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_sample_is_the_same_on_a_rerun_a_resume_and_a_mesh(tmp_path, tiny_model_dir, dataset, everything):  # noqa: F811
    flag = ("--positions", "sample:0.4")
    extract(tiny_model_dir, dataset, tmp_path / "a", *flag)
    selected = stored(tmp_path / "a")
    keep = expected(everything, lambda sample, index, position: splitmix_keep(SEED, sample, index, 0.4))
    assert_selected(selected, everything, keep)
    kept = sum(k.sum() for k in keep.values()) / sum(len(k) for k in keep.values())
    assert 0.25 < kept < 0.55, kept

    extract(tiny_model_dir, dataset, tmp_path / "b", *flag)  # a rerun from nothing
    assert committed_tensors(str(tmp_path / "b" / "r")) == committed_tensors(str(tmp_path / "a" / "r"))

    # A resume: half of the chunks by a first worker, the rest by a second process.
    extract(tiny_model_dir, dataset, tmp_path / "c", *flag, "--num-workers", "2", "--worker-index", "0")
    assert 0 < len(read_commits(open_store(str(tmp_path / "c" / "r")))) < 4
    extract(tiny_model_dir, dataset, tmp_path / "c", *flag)
    assert committed_tensors(str(tmp_path / "c" / "r")) == committed_tensors(str(tmp_path / "a" / "r"))

    # A mesh: 4 data shards pack other batch shapes; the same tokens are stored.
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    extract(tiny_model_dir, dataset, tmp_path / "d", *flag, "--mesh", "data=4,model=1", env=env)
    meshed = stored(tmp_path / "d")
    assert sorted(meshed) == sorted(selected)
    for sample, rows in selected.items():
        np.testing.assert_array_equal(meshed[sample]["token_ids"], rows["token_ids"])
        np.testing.assert_array_equal(meshed[sample]["positions"], rows["positions"])
        np.testing.assert_allclose(meshed[sample]["acts"], rows["acts"], rtol=1e-4, atol=1e-5)


def test_a_bad_spelling_is_one_line_exit_2_before_anything_is_written(tmp_path, tiny_model_dir, dataset):  # noqa: F811
    args = [ACTEX, "extract", "--model", str(tiny_model_dir), "--dataset", str(dataset), "--format", "text",
            "--output", str(tmp_path / "out"), "--hooks", HOOK, "--positions", "sample:2"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("actex: error: ") and "sample:2" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_generation_run_selects_over_prompt_and_answer_alike(tmp_path, tiny_model_dir, arc_dataset):  # noqa: F811
    args = [ACTEX, "generate", "--model", str(tiny_model_dir), "--dataset", str(arc_dataset), "--output", str(tmp_path),
            "--run-name", "r", "--hooks", HOOK, "--dtype", "float32", "--compute-dtype", "float32",
            "--predictions-per-task", "1", "--chunk-size", "2", "--batch-tokens", "2048", "--max-new-tokens", "4",
            "--no-progress", "--positions", "skip-first:3"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    store = open_store(str(tmp_path / "r"))
    records = {}
    for record in read_commits(store).values():
        lines = store.read_bytes(layout.samples_path(record.chunk, record.attempt)).decode().splitlines()
        records |= {line["sample_id"]: line for line in map(json.loads, lines)}
    stored_rows = stored(tmp_path)
    assert sorted(stored_rows) == sorted(records) and records
    for sample, rows in stored_rows.items():
        record = records[sample]
        # One window of prompt + answer; positions 0-2 dropped, every later one stored,
        # the generated tokens (positions from n_prompt_tokens on) among them.
        assert rows["positions"].tolist() == list(range(3, 3 + record["n_tokens"])), sample
        if record["stop_reason"] is not None:  # not skipped
            assert 3 + record["n_tokens"] > record["n_prompt_tokens"], record
