"""`actex extract` options from flags, ACTEX_* variables, a --config file and the models'
defaults, in that order; all generated from the config models (one source)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import typer
from pydantic import Field
from typer.testing import CliRunner

from actex.cli import app
from actex.cli.config_docs import render_docs
from actex.cli.options import extract_options, model_options
from actex.config import DeviceConfig, GenerationConfig, HookSelection, RunConfig, WorkerOptions
from actex.data.config import DataConfig

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def resolved(*args: str, env: dict | None = None, config: dict | None = None, tmp_path: Path | None = None) -> dict:
    """What `actex extract --show-config` resolved: {"config": fields, "worker": options}."""
    argv = ["extract", "--show-config", *args]
    if config is not None:
        path = tmp_path / "run.json"
        path.write_text(json.dumps(config))
        argv += ["--config", str(path)]
    result = runner.invoke(app, argv, env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_flag_beats_variable_beats_file_beats_default(tmp_path):
    file = {"model": "m", "chunk_size": 5, "batch_tokens": 512, "data": {"dataset": "d.jsonl", "max_seq_len": 32}}
    env = {"ACTEX_CHUNK_SIZE": "7", "ACTEX_MAX_SEQ_LEN": "64", "ACTEX_BATCH_TOKENS": "256"}
    shown = resolved("--chunk-size", "3", env=env, config=file, tmp_path=tmp_path)["config"]
    assert shown["chunk_size"] == 3  # flag over variable (and file)
    assert shown["batch_tokens"] == 256  # variable over file
    assert shown["data"]["max_seq_len"] == 64  # variable over file, nested under data
    assert shown["model"] == "m" and shown["data"]["dataset"] == "d.jsonl"  # file where nothing else says
    assert shown["dtype"] == "bfloat16" and shown["data"]["long_policy"] == "truncate"  # model defaults
    assert resolved()["config"]["chunk_size"] == RunConfig.model_fields["chunk_size"].default


def test_variables_of_every_type_and_worker_options():
    env = {
        "ACTEX_HOOKS": "blocks.0.hook_resid_post, blocks.1.hook_mlp_out",  # a list field
        "ACTEX_DIHEDRAL": "false",  # a bool field with a --no- form
        "ACTEX_DTYPE": "float32",  # a Literal
        "ACTEX_COLOUR_ALL_PROB": "0.5",
        "ACTEX_SHARD_SIZE": "2MB",  # text the model parses
        "ACTEX_DATA_REVISION": "v2",  # data.revision, renamed beside the model's --revision
        "ACTEX_REVISION": "main",
        "ACTEX_CLAIM": "1",
        "ACTEX_LEASE_SECONDS": "9",
        "ACTEX_WORKER_INDEX": "3",
    }
    shown = resolved(env=env)
    config, worker = shown["config"], shown["worker"]
    assert config["hooks"] == ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    assert config["data"]["dihedral"] is False and config["dtype"] == "float32"
    assert config["data"]["colour_all_prob"] == 0.5 and config["shard_size"] == "2MB"
    assert config["data"]["revision"] == "v2" and config["revision"] == "main"
    assert worker["claim"] is True and worker["lease_seconds"] == 9.0 and worker["worker_index"] == 3
    assert resolved("--no-claim", env=env)["worker"]["claim"] is False  # the flag still wins


def test_bad_values_are_one_line_errors_naming_the_flag_or_variable():
    result = runner.invoke(app, ["extract", "--show-config"], env={"ACTEX_LEASE_SECONDS": "0.5"})
    assert result.exit_code == 2
    assert result.stderr.strip() == "actex: error: --lease-seconds (or ACTEX_LEASE_SECONDS): Input should be greater than or equal to 1"
    result = runner.invoke(app, ["extract", "--show-config"], env={"ACTEX_DTYPE": "int4"})
    assert result.exit_code == 2 and "ACTEX_DTYPE" in result.output  # click names the variable
    result = runner.invoke(app, ["extract", "--output", "o"], env={"ACTEX_DATASET": "d.jsonl"})
    assert result.exit_code == 2
    assert result.stderr.strip() == "actex: error: missing --model (or ACTEX_MODEL, or `model:` in --config)"


def test_unknown_actex_variable_is_warned_about_by_name():
    env = {"ACTEX_BATCH_TOKEN": "5", "ACTEX_CHUNK_SIZE": "2", "ACTEX_HOME": "/var/lib/actex"}  # the last: the TPU bootstrap's
    result = runner.invoke(app, ["extract", "--show-config"], env=env)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "ACTEX_" in line]
    assert warnings == ["actex: ignoring environment variable ACTEX_BATCH_TOKEN: no such option (did you mean ACTEX_BATCH_TOKENS?)"]


def test_every_model_field_is_a_flag_with_its_variable_in_help():
    command = typer.main.get_command(app).commands["extract"]
    by_env = {p.envvar: p for p in command.params if getattr(p, "envvar", None)}
    # generation is a section of `actex generate` only (checked below).
    names = {*RunConfig.model_fields, *DataConfig.model_fields, *HookSelection.model_fields, *WorkerOptions.model_fields,
             *DeviceConfig.model_fields} - {"data", "generation"}
    # data.revision meets the model's revision: it becomes --data-revision.
    expected = {f"ACTEX_{n.upper()}" for n in names} | {"ACTEX_DATA_REVISION", "ACTEX_CONFIG"}
    assert set(by_env) == expected
    assert all(p.show_envvar for p in by_env.values())
    help_text = runner.invoke(app, ["extract", "--help"], env={"COLUMNS": "400"}).stdout
    # --samples-per-prompt (a data field) is taken by extract but shown by generate only.
    for envvar in expected - {"ACTEX_SAMPLES_PER_PROMPT"}:
        assert f"env var: {envvar}]" in help_text
    assert "--samples-per-prompt" not in help_text
    assert "--samples-per-prompt" in runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "400"}).stdout
    assert "Tokens per packed batch. (default: 16384)" in help_text  # the model's description and default
    generate = typer.main.get_command(app).commands["generate"]
    generate_env = {p.envvar for p in generate.params if getattr(p, "envvar", None)}
    assert generate_env == expected | {f"ACTEX_{n.upper()}" for n in GenerationConfig.model_fields}


def test_a_new_config_field_becomes_a_flag_and_variable():
    class WithStallTimeout(RunConfig):
        stall_timeout: float = Field(300.0, ge=1, description="Seconds without progress before the worker exits.")

    option = next(o for o in model_options(WithStallTimeout, target="config", panel="Run") if o.name == "stall_timeout")
    assert (option.flag, option.envvar, option.kind, option.path) == ("--stall-timeout", "ACTEX_STALL_TIMEOUT", float, ("stall_timeout",))
    assert option.help == "Seconds without progress before the worker exits. (default: 300.0)"


def test_docs_list_every_variable():
    text = DOCS.read_text()
    assert render_docs(text, extract_options()) == text, "docs/config.md is stale: run `python -m actex.cli.config_docs docs/config.md`"


@pytest.mark.parametrize("argv, env, named", [
    (["extract", "--dtype", "bf16"], {}, "'bf16' is not one of"),
    (["extract", "--bogus-flag"], {}, "No such option: --bogus-flag"),
    (["extract", "--model", "m"], {"ACTEX_CHUNK_SIZE": "abc"}, "ACTEX_CHUNK_SIZE"),
])
def test_a_mistyped_flag_or_variable_is_one_line_exit_2(argv, env, named):
    """Click's usage errors follow the same rule as every other input error: one line."""
    actex = str(Path(sys.executable).parent / "actex")
    result = subprocess.run([actex, *argv], capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("actex: error: ") and named in lines[0], result.stderr


def test_help_text_is_wrapped_by_the_terminal_not_by_the_docstring():
    from actex.cli import unwrap

    assert unwrap("First line.\n\nA paragraph wrapped\nat 90 columns.\n- a list item\n- another\n\n    indented\n    example") == \
        "First line.\n\nA paragraph wrapped at 90 columns.\n- a list item\n- another\n\n    indented\n    example"
    from actex.cli import app

    fleet = next(c for c in app.registered_commands if c.name == "fleet")  # its docstring breaks after "A"
    assert "task retries). A `--claim` worker exits 0 on its own only once every chunk has its commit record" in fleet.help
