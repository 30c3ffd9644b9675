"""`actex inspect`'s token-use line: with --positions other than all, the stored tokens
are a selection of the tokens computed, so the line gives the selected fraction and the
padding apart (a real `actex inspect` process over a tiny extraction run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from engine_fixtures import jax_cache, text_dataset, tiny_model_dir  # noqa: F401
from typer.testing import CliRunner

from actex.cli import app
from actex.reader.run import Run
from actex.store.folder import open_store

ACTEX = str(Path(sys.executable).parent / "actex")
MAX_SEQ_LEN = 16


def inspect_output(run: Path) -> str:
    shown = subprocess.run([ACTEX, "inspect", str(run)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "COLUMNS": "400"})
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def extract(model: Path, dataset: Path, output: Path, *extra: str) -> Path:
    result = CliRunner().invoke(app, [
        "extract", "--model", str(model), "--dataset", str(dataset), "--format", "text", "--output", str(output),
        "--run-name", "r", "--hooks", "blocks.0.hook_resid_post", "--max-seq-len", str(MAX_SEQ_LEN),
        "--long-policy", "truncate", "--batch-tokens", "64", "--chunk-size", "3", "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    return output / "r"


def test_sampled_positions_are_told_apart_from_padding(tiny_model_dir, text_dataset, tmp_path):  # noqa: F811
    run_dir = extract(tiny_model_dir, text_dataset, tmp_path, "--positions", "sample:0.5")
    run = Run(open_store(str(run_dir)))
    records = [s for c in range(run.num_chunks) for s in run.samples(c)]
    assert any(r["truncated"] for r in records)
    computed = sum(min(r["n_source_tokens"], MAX_SEQ_LEN) for r in records)
    stored = sum(r["n_tokens"] for r in records)
    slots = sum(record.token_slots for record in run.commits.values())
    shown = inspect_output(run_dir)
    figures = re.search(r"tokens stored ([\d.]+)% of the slots computed: --positions sample:0.5 selected ([\d.]+)% "
                        r"of the tokens computed; padding ([\d.]+)% of the slots", shown)
    assert figures, shown
    assert [float(f) for f in figures.groups()] == [round(100 * stored / slots, 1), round(100 * stored / computed, 1),
                                                    round(100 - 100 * computed / slots, 1)]
    assert "(the rest: padding)" not in shown


def test_every_position_keeps_the_padding_line(tiny_model_dir, text_dataset, tmp_path):  # noqa: F811
    shown = inspect_output(extract(tiny_model_dir, text_dataset, tmp_path))
    assert re.search(r"useful tokens [\d.]+% of the slots computed \(the rest: padding\)", shown), shown
