"""`actex generate` end to end on a tiny random Qwen2 over real ARC tasks: generated tokens
and their activations against transformers, samples.jsonl fields, predictions.json,
inspect, and the worker modes of extract (static split, --claim) giving every chunk once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import TINY_HOOKS, arc_dataset, committed_tensors, jax_cache, tiny_model_dir  # noqa: F401
from model_fixtures import reference_hooks
from transformers import AutoTokenizer, Qwen2ForCausalLM
from typer.testing import CliRunner

from actex.cli import app
from actex.reader.run import Run
from actex.store.folder import open_store

ACTEX = str(Path(sys.executable).parent / "actex")
MAX_NEW = 6
F32_TOL = 1e-4  # as tests/test_model_parity.py: max abs error / max abs value
runner = CliRunner()


def generate_args(model_dir: Path, dataset: Path, output: Path, name: str, *extra: str) -> list[str]:
    return [
        "generate", "--model", str(model_dir), "--dataset", str(dataset), "--output", str(output),
        "--run-name", name, "--hooks", ",".join(TINY_HOOKS), "--dtype", "float32", "--compute-dtype", "float32",
        "--predictions-per-task", "2", "--chunk-size", "2", "--batch-tokens", "2048",
        "--max-new-tokens", str(MAX_NEW), "--no-progress", *extra,
    ]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, arc_dataset, tmp_path_factory) -> Path:
    """One run in-process through the CLI code path: 3 tasks x 2 predictions, 3 chunks."""
    output = tmp_path_factory.mktemp("generate")
    result = runner.invoke(app, generate_args(tiny_model_dir, arc_dataset, output, "g"))
    assert result.exit_code == 0, result.output
    assert "predictions.json: 3 test inputs, 0/6 answers parsed, pass@2 0/3" in result.output
    return output / "g"


def test_generated_tokens_and_their_activations_match_transformers(reference, tiny_model_dir):
    run = Run(open_store(str(reference)))
    assert run.manifest.kind == "generate"
    assert run.config["generation"] == {"max_new_tokens": MAX_NEW, "stop_tokens": ["<|im_end|>", "<|endoftext|>"]}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = Qwen2ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    stop_ids = sorted({tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])})
    stored = committed_tensors(str(reference))
    records = {r["sample_id"]: r for chunk in run.chunks for r in run.samples(chunk)}
    assert sorted(stored) == sorted(records) == list(range(6))
    for sample_id, record in records.items():
        ids = np.frombuffer(stored[sample_id]["token_ids"], np.int32)
        n_prompt = record["n_prompt_tokens"]
        assert len(ids) == record["n_tokens"] == n_prompt + len(ids[n_prompt:]) and len(ids) > n_prompt
        prompt, generated = ids[:n_prompt].tolist(), ids[n_prompt:].tolist()
        with torch.inference_mode():
            expected = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, n_prompt, dtype=torch.long),
                                      max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=stop_ids, pad_token_id=0)
        assert generated == expected[0, n_prompt:].tolist()
        assert record["generated_text"] == tokenizer.decode(generated, skip_special_tokens=False)
        stopped = generated[-1] in stop_ids
        assert record["stop_reason"] == ("stop_token" if stopped else "max_new_tokens")
        assert stopped or len(generated) == MAX_NEW
        assert record["answer"]["grid"] is None and record["answer"]["reason"] and record["answer"]["correct"] is False
        # Every stored token, prompt and generated, against one transformers forward.
        want = reference_hooks(model, ids[None].copy())  # frombuffer arrays are read-only
        for hook in TINY_HOOKS:
            got = np.frombuffer(stored[sample_id][hook], np.float32).reshape(len(ids), -1)
            err = np.abs(got - want[hook][0]).max() / np.abs(want[hook][0]).max()
            assert err <= F32_TOL, f"sample {sample_id} {hook}: {err:.1e}"
        assert np.frombuffer(stored[sample_id]["positions"], np.int32).tolist() == list(range(len(ids)))


def test_predictions_accuracy_and_inspect(reference):
    predictions = json.loads((reference / "predictions.json").read_text())
    tasks = [json.loads(line) for line in Path(Run(open_store(str(reference))).config["data"]["dataset"]).read_text().splitlines()]
    assert predictions == {t["id"]: [{"attempt_1": [[0]], "attempt_2": [[0]]}] * len(t["test"]) for t in tasks}
    accuracy = json.loads((reference / "accuracy.json").read_text())
    assert accuracy["samples"] == 6 and accuracy["test_inputs_known"] == 3 and accuracy["pass_at_2"] == 0
    result = runner.invoke(app, ["inspect", str(reference), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["kind"] == "generate" and summary["answers"] == accuracy
    run = Run(open_store(str(reference)))
    records = [s for c in range(run.num_chunks) for s in run.samples(c)]
    generated = sum(s["n_tokens"] - s["n_prompt_tokens"] for s in records)
    totals = summary["generation"]
    assert totals["samples"] == 6 and totals["generated_tokens"] == generated > 0
    assert totals["stop_token"] + totals["max_new_tokens"] == 6 and totals["skipped"] == 0
    shown = runner.invoke(app, ["inspect", str(reference)]).output
    assert "answers: 0/6 parsed" in shown and "pass@2 0/3" in shown
    assert f"generated {generated:,} tokens over 6 samples" in shown


def test_claim_and_static_workers_give_every_chunk_once_equal_to_one_worker(reference, tiny_model_dir, arc_dataset,
                                                                            tmp_path):
    """Two --claim workers at once (real processes), and a static split 0/2 + 1/2: the same
    bytes as the single worker, each sample stored once (committed_tensors checks that)."""
    claimers = [subprocess.Popen([ACTEX, *generate_args(tiny_model_dir, arc_dataset, tmp_path, "c", "--claim")],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for index in range(2):
        result = runner.invoke(app, generate_args(tiny_model_dir, arc_dataset, tmp_path, "s",
                                                  "--worker-index", str(index), "--num-workers", "2"))
        assert result.exit_code == 0, result.output
    for proc in claimers:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
    expected = committed_tensors(str(reference))
    for name in ("c", "s"):
        assert committed_tensors(str(tmp_path / name)) == expected, name
        assert json.loads((tmp_path / name / "predictions.json").read_text()) == json.loads(
            (reference / "predictions.json").read_text())


def test_generation_fields_are_validated_before_anything_is_written(tiny_model_dir, arc_dataset, tmp_path):
    result = runner.invoke(app, generate_args(tiny_model_dir, arc_dataset, tmp_path, "bad", "--max-seq-len", "64",
                                              "--max-new-tokens", "64"))
    assert result.exit_code == 2
    assert "actex: error: invalid config field" in result.output and "max_seq_len 64" in result.output
    assert not (tmp_path / "bad").exists()


def test_generate_on_a_data_by_model_mesh_equals_one_device(reference, tiny_model_dir, arc_dataset, tmp_path):
    """4 host devices as a 2 x 2 (data, model) mesh: the same generations and predictions,
    activations within float32 rounding (the model axis sums partial products per device)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run([ACTEX, *generate_args(tiny_model_dir, arc_dataset, tmp_path, "m", "--mesh", "data=2,model=2")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = Run(open_store(str(tmp_path / "m"))), Run(open_store(str(reference)))
    assert [s["generated_text"] for c in range(ours.num_chunks) for s in ours.samples(c)] == \
        [s["generated_text"] for c in range(theirs.num_chunks) for s in theirs.samples(c)]
    assert json.loads((tmp_path / "m" / "predictions.json").read_text()) == json.loads(
        (reference / "predictions.json").read_text())
    for hook in TINY_HOOKS:
        got, want = (np.concatenate([b.activations.astype(np.float32) for b in run.iter_batches(hook, 256, shuffle=False)])
                     for run in (ours, theirs))
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), hook


def test_prompts_without_room_are_warned_voted_and_counted_on_their_own(tiny_model_dir, arc_dataset, tmp_path):
    """--max-seq-len 384 leaves 378 tokens of room: task d631b094's 402-token prompts (both
    of chunk 2) are skipped. A real process says so in a warning per chunk, predictions.json
    still names the task ([[0]]), and the summary and inspect count them as skipped, not as
    unparsed answers. With --positions sample:0.5, inspect tells selection from padding."""
    result = subprocess.run([ACTEX, *generate_args(tiny_model_dir, arc_dataset, tmp_path, "r", "--max-seq-len", "384",
                                                   "--positions", "sample:0.5")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = next(line for line in result.stderr.splitlines() if "skipped (prompt too long" in line)
    assert "chunk 2: 2 prompt(s) skipped" in warning and "sample 4 " in warning and "402 tokens" in warning
    assert "3 test inputs, 0/4 answers parsed, 2 skipped (prompt too long), pass@2 0/2" in result.stdout
    predictions = json.loads((tmp_path / "r" / "predictions.json").read_text())
    assert predictions["d631b094"] == [{"attempt_1": [[0]], "attempt_2": [[0]]}] and len(predictions) == 3
    records = [s for c in range(3) for s in Run(open_store(str(tmp_path / "r"))).samples(c)]
    assert [r["skipped"].split(":")[0] for r in records if r["skipped"]] == ["prompt too long"] * 2
    shown = subprocess.run([ACTEX, "inspect", str(tmp_path / "r")], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "COLUMNS": "400"})
    assert shown.returncode == 0, shown.stderr
    decoded = [r for r in records if not r["skipped"]]
    stops = {reason: sum(r["stop_reason"] == reason for r in decoded) for reason in ("stop_token", "max_new_tokens")}
    assert f"stop reasons {', '.join(f'{k} {n}' for k, n in stops.items() if n)}, skipped 2;" in shown.stdout
    assert "{" not in shown.stdout.split("stop reasons")[1].splitlines()[0]
    assert "answers: 0/4 parsed (2 skipped: prompt too long)" in shown.stdout
    # Tokens computed: every decoded prompt + generation; stored: about half of them.
    computed = sum(r["n_prompt_tokens"] + r["n_generated_tokens"] for r in decoded)
    stored = sum(r["n_tokens"] for r in records)
    selected = re.search(r"--positions sample:0.5 selected ([\d.]+)% of the tokens computed; padding ([\d.]+)% of the slots",
                         shown.stdout)
    assert selected and float(selected[1]) == round(100 * stored / computed, 1), shown.stdout
    assert "(the rest: padding)" not in shown.stdout
