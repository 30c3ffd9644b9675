"""`actex extract / demo / inspect` as users run them: real processes killed with SIGKILL at
random moments and rerun, static workers in parallel, one-line user errors, the demo."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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
        (["--hooks", "blocks.0.hook_nope", "--layers", None], "unknown hook 'blocks.0.hook_nope'"),
        (["--layers", "0-5"], "layer 2 out of range: model has 2 layers (0-1)"),
        (["--dataset", "MISSING"], "MISSING"),
        (["--output", "UNWRITABLE"], "Not a directory"),
        (["--mesh", "data=3,model=1"], "--mesh data=3,model=1 needs 3 devices, 1 available"),
        (["--mesh", "3x1"], "--mesh '3x1': expected 'auto' or 'data=D,model=M'"),
        (["--attention", "cudnn"], "--attention cudnn needs an NVIDIA GPU; this host's platform is cpu"),
        (["--run-name", "../../escaped"], "--run-name (or ACTEX_RUN_NAME): '../../escaped' must be one directory name"),
        (["--run-name", "a/b"], "'a/b' must be one directory name under output"),
    ],
    ids=["unknown-hook", "layer-out-of-range", "missing-dataset", "unwritable-output",
         "mesh-too-large", "mesh-spelling", "attention-platform", "run-name-dotdot", "run-name-separator"],
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
    assert 0.5 < summary["useful_token_fraction"] <= 1.0  # tokens / computed slots

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
    assert stored["data"]["parse_special_tokens"] is False  # documents' special-token strings are text

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nbogus_field: 1\n")
    result = runner.invoke(app, ["extract", "--config", str(bad), "--output", str(tmp_path), "--dataset", str(dataset)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "unknown config field(s) bogus_field" in result.stderr


@pytest.mark.parametrize("hook", ["hook_embed", "blocks.0.hook_resid_pre"])
def test_embedding_only_hooks_store_the_embedding_rows_bit_exact(tiny_model_dir, dataset, tmp_path, hook):
    # No block runs and no block weight is loaded: each stored row is embed_tokens[token id].
    from safetensors.numpy import load_file

    args = extract_args(tiny_model_dir, dataset, tmp_path, "--dtype", "float32")
    args[args.index("--layers") : args.index("--layers") + 6] = ["--hooks", hook]  # layers, activation, hooks
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    embed = load_file(tiny_model_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert embed.dtype == np.float32
    stored = committed_tensors(str(tmp_path / "r"))
    assert len(stored) == len(ROWS)
    for tensors in stored.values():
        token_ids = np.frombuffer(tensors["token_ids"], np.int32)
        rows = np.frombuffer(tensors[hook], np.float32).reshape(len(token_ids), -1)
        np.testing.assert_array_equal(rows, embed[token_ids])


def _set_config(**fields):
    def edit(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | fields))
    return edit


def _rewrite(name: str, content):
    def edit(model: Path) -> None:
        path = model / name
        path.write_bytes(content(path.read_bytes()))
    return edit


@pytest.mark.parametrize(
    "edit, file, expected",
    [
        (_set_config(num_hidden_layers="four"), "config.json",
         "field num_hidden_layers: Input should be a valid integer, got 'four'"),
        (_set_config(rope_theta="big"), "config.json", "field rope_theta: Input should be a valid number, got 'big'"),
        (_rewrite("config.json", lambda data: data[:-5]), "config.json", "not valid JSON (line"),
        # A Qwen2 checkpoint (q/k/v biases) labelled llama, whose config says no biases.
        (_set_config(model_type="llama"), "model.safetensors",
         "checkpoint has q/k/v biases (model.layers."),
        (_set_config(model_type="gpt2"), "config.json", "model_type 'gpt2' not supported"),
        (_rewrite("model.safetensors", lambda data: data[: len(data) // 2]), "model.safetensors",
         "not a valid safetensors file (Error while deserializing header: incomplete metadata"),
        (_rewrite("model.safetensors", lambda data: bytes(len(data))), "model.safetensors",
         "not a valid safetensors file (Error while deserializing header"),
        (_rewrite("model.safetensors", lambda data: (2**62).to_bytes(8, "little") + data[8:]), "model.safetensors",
         "not a valid safetensors file (Error while deserializing header: header too large)"),
    ],
    ids=["int-field-string", "float-field-string", "invalid-json", "llama-with-biases", "unsupported-type",
         "truncated-weights", "garbage-weights", "huge-header"],
)
def test_bad_checkpoints_are_one_line_naming_file_and_field(tiny_model_dir, dataset, tmp_path, edit, file, expected):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    edit(model)
    result = runner.invoke(app, extract_args(model, dataset, tmp_path / "out"))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"actex: error: {model / file}: "), result.stderr
    assert expected in lines[0]
    if "biases" in expected:
        assert f"but {model / 'config.json'} says model_type 'llama' without attention_bias" in lines[0]
    assert not (tmp_path / "out" / "r").exists()  # nothing written


def test_unreachable_hub_names_model_and_cache(tmp_path, dataset):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(tmp_path / "hub"))
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([ACTEX, *extract_args("acme/tiny-qwen2", dataset, tmp_path / "out")],
                            env=env, capture_output=True, text=True, timeout=120)
    # An unreachable hub is infrastructure (issue 11's exit codes): 1, restartable, not 2.
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (
        f"actex: error: --model acme/tiny-qwen2: the Hugging Face hub could not be reached, and no cached "
        f"snapshot was found in {tmp_path / 'hub' / 'models--acme--tiny-qwen2'} (check the network, or set "
        "HF_HUB_CACHE / HF_HOME to where the model is cached)")


def test_log_json_stderr_holds_only_json_lines(tiny_model_dir, dataset, tmp_path):
    # XLA's own C++ logging (switched on here) writes to descriptor 2 directly, as libtpu's
    # backend warnings do on a TPU VM: with --log-json those lines must be JSON too.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="pjrt_client=1")
    ok = subprocess.run([ACTEX, *extract_args(tiny_model_dir, dataset, tmp_path, "--limit", "2", "--log-json")],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    records = [json.loads(line) for line in ok.stderr.splitlines()]  # every line parses
    assert all(isinstance(r, dict) for r in records)
    assert any(r["logger"] == "stderr" and "pjrt_client.cc" in r["message"] and r["level"] == "info" for r in records)
    assert [r["event"] for r in records if r.get("event") in ("start", "done")] == ["start", "done"]

    bad = runner.invoke(app, extract_args(tiny_model_dir, dataset, tmp_path, "--layers", "0-5", "--log-json"))
    assert bad.exit_code == 2
    records = [json.loads(line) for line in bad.stderr.splitlines()]
    errors = [r for r in records if r["level"] == "error"]
    assert errors == [{**errors[0], "message": "--layers 0-5: layer 2 out of range: model has 2 layers (0-1)", "event": "error",
                       "exit_code": 2}]


def test_json_stderr_wraps_plain_lines():
    from actex.cli.json_stderr import as_json_line

    assert json.loads(as_json_line(b"E0000 00:00:1.2 123 tpu.cc:1] TPU backend failed\n"))["level"] == "error"
    assert json.loads(as_json_line(b"W1130 16:26:32.05 4069 x.cc:2] careful\n"))["level"] == "warning"
    plain = json.loads(as_json_line(b"Traceback (most recent call last):\n"))
    assert plain["logger"] == "stderr" and plain["message"] == "Traceback (most recent call last):"
    assert as_json_line(b'{"level": "info", "message": "x"}\n') == b'{"level": "info", "message": "x"}\n'


def test_gc_refuses_a_path_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    result = runner.invoke(app, ["gc", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr == f"actex: error: {tmp_path}: no run.json here (not an actex run)\n"
    assert (tmp_path / "notes.txt").exists()


def _help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250"}, terminal_width=250)
    assert result.exit_code == 0, result.output
    return result.output


def test_help_shows_bracketed_text_and_no_type_label_on_flags():
    import click
    import typer.main

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        shown = _help(name)
        for param in command.params:
            help_text = (param.help or "").replace("\\[", "[")
            for bracketed in re.findall(r"\[[^\]]*\]", help_text):
                assert bracketed in shown, f"actex {name}: {bracketed!r} of {param.name} lost from --help"
            if isinstance(param, click.Option) and param.is_flag:
                line = next(line for line in shown.splitlines() if param.opts[0] in line)
                assert "<bool>" not in line, f"actex {name} {param.opts[0]}: {line.strip()}"
    assert "barc-style column of [input, output] pairs" in _help("streams")


def test_float16_compute_is_refused_before_the_plan(tiny_model_dir, tmp_path):
    # Refused by config validation, before the dataset is even looked at (it does not exist),
    # whether it comes from a --config file or the flag.
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\noutput: {tmp_path}\nlayers: '0'\ncompute_dtype: float16\n"
                      f"data: {{dataset: {tmp_path / 'missing.jsonl'}}}\n")
    result = runner.invoke(app, ["extract", "--config", str(config)])
    assert result.exit_code == 2
    assert result.stderr == ("actex: error: invalid config field compute_dtype: "
                             "Input should be 'bfloat16' or 'float32'\n")
    flag = runner.invoke(app, ["extract", "--config", str(config), "--compute-dtype", "float16"])
    assert flag.exit_code == 2 and "'float16' is not one of 'bfloat16', 'float32'" in flag.stderr
    assert not list(tmp_path.glob("run-*"))


@pytest.mark.parametrize("flags, env, line", [
    (["--positions", "skip_first:1"], {}, "--positions (or ACTEX_POSITIONS): 'skip_first:1' is not a token selection"),
    ([], {"ACTEX_POSITIONS": "skip_first:1"}, "--positions (or ACTEX_POSITIONS): 'skip_first:1' is not a token selection"),
    (["--run-name", "a/b"], {}, "--run-name (or ACTEX_RUN_NAME): 'a/b' must be one directory name under output"),
    (["--shard-size", "12XB"], {}, "--shard-size (or ACTEX_SHARD_SIZE): '12XB' is not a size (e.g. 1GB, 512MB, 4096)"),
    (["--dtype", "int4"], {}, "--dtype (or ACTEX_DTYPE): 'int4' is not one of 'bfloat16', 'float16', 'float32', 'int8'."),
    ([], {"ACTEX_DTYPE": "int4"}, "--dtype (or ACTEX_DTYPE): 'int4' is not one of 'bfloat16', 'float16', 'float32', 'int8'."),
], ids=["positions-flag", "positions-variable", "run-name", "shard-size", "dtype-flag", "dtype-variable"])
def test_a_refused_flag_is_named_as_given_without_pydantic_wording(tmp_path, flags, env, line):
    """Refused in collect(), before the model is looked at (it does not exist here)."""
    args = [ACTEX, "extract", "--model", str(tmp_path / "m"), "--dataset", str(tmp_path / "d.jsonl"),
            "--output", str(tmp_path / "out"), "--layers", "0", *flags]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert result.returncode == 2
    assert result.stderr.startswith(f"actex: error: {line}") and len(result.stderr.splitlines()) == 1, result.stderr
    assert "Value error" not in result.stderr and "env var:" not in result.stderr and "config field" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_config_file_value_is_named_by_its_field_without_pydantic_wording(tiny_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\noutput: {tmp_path / 'out'}\nlayers: '0'\npositions: skip_first:1\n"
                      f"data: {{dataset: {tmp_path / 'missing.jsonl'}}}\n")
    result = subprocess.run([ACTEX, "extract", "--config", str(config)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("actex: error: invalid config field positions: 'skip_first:1' is not a token selection")
    assert not (tmp_path / "out").exists()


def test_layer_and_hook_refusals_name_the_flag_and_only_this_models_hooks(tiny_model_dir, tmp_path):
    base = [ACTEX, "extract", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "d.jsonl"),
            "--output", str(tmp_path / "out")]
    layers = subprocess.run([*base, "--layers", "0-9"], capture_output=True, text=True, timeout=300)
    assert layers.returncode == 2
    assert layers.stderr == "actex: error: --layers 0-9: layer 2 out of range: model has 2 layers (0-1)\n"
    hook = subprocess.run([*base, "--hooks", "blocks.0.hook_foo"], capture_output=True, text=True, timeout=300)
    assert hook.returncode == 2 and "unknown hook 'blocks.0.hook_foo'" in hook.stderr, hook.stderr
    assert "mlp.hook_post" in hook.stderr and "router_logits" not in hook.stderr  # a dense Qwen2
    assert not (tmp_path / "out").exists()


def test_inspect_without_a_terminal_keeps_numbers_whole_and_says_what_it_leaves_out(tiny_model_dir, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [*ROWS[:6], {"text": ""}, {"other": 1}, {"text": ""}])
    out = tmp_path / "out"
    made = subprocess.run([ACTEX, *extract_args(tiny_model_dir, rows, out, "--activation", "ln1.hook_normalized",
                                                "--dtype", "int8", "--on-bad-row", "skip")],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    shown = subprocess.run([ACTEX, "inspect", str(out / "r")], capture_output=True, text=True, timeout=120)  # no TTY: 80 columns
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.split("\n{")[0]  # (the config JSON below)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    rows_of_tables = [[cell.strip() for cell in line.strip("│").split("│")] for line in text.splitlines() if line.startswith("│")]
    assert len(rows_of_tables) == 4, text  # 2 hooks x (figures, int8 errors): one line each
    for hook, *figures in rows_of_tables:
        assert hook in ("blocks.0.ln1.hook_normalized", "blocks.1.ln1.hook_normalized"), text
        assert all(float(figure) >= 0 for figure in figures), text  # whole numbers, none split
    words = " ".join(text.split())  # (a long path wraps)
    assert f"{rows}:row 6: column 'text' is empty (and 1 more like it)" in words
    assert f"{rows}:row 7: no text column 'text'" in words

    for copy in range(2, 7):  # an --output folder of 6 runs
        shutil.copytree(out / "r", out / f"r{copy}")
    folder = subprocess.run([ACTEX, "inspect", str(out)], capture_output=True, text=True, timeout=120)
    assert folder.returncode == 2
    assert folder.stderr.strip().endswith(f"{out}/r5 ... and 1 more (actex inspect {out}/<run>)"), folder.stderr


def test_skipped_rows_are_summed_up_by_kind_with_a_real_example():
    from actex.cli.inspect_run import skipped_row_lines

    listed = [{"source": "a.json", "row": 3, "reason": "train[0].input: cell (2,3) = 11 is outside 0-9"},
              {"source": "a.json", "row": 5, "reason": "train[1].input: cell (0,0) = 12 is outside 0-9"}]
    assert skipped_row_lines({"train[N].input: cell (N,N) = N is outside N-N": 7, "bad JSON": 2}, listed) == [
        "a.json:row 3: train[0].input: cell (2,3) = 11 is outside 0-9 (and 6 more like it)", "2 x bad JSON"]
