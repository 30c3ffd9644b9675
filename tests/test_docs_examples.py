"""Every runnable fenced block of README.md and docs/*.md runs, as written, on the demo run.

A `bash`/`sh` or `python` block runs unless the line before its fence is
`<!-- not run: REASON -->` (a bucket, the hub, an interface listing, a loop fragment); a
`yaml` block (a `--config` or fleet file) must name only real fields with valid values.
The demo run is built once for the module, as `make demo` builds it (`actex demo`, on one
task to stay quick), in a folder that also holds `.venv` (this interpreter's environment),
so `source .venv/bin/activate` and `.venv/bin/actex` work as they do after `make demo`.
Each block runs in a fresh working directory that sees the demo run at `actex-demo/demo`.
A block made only of `actex ...` lines runs in-process through the same CLI (the same
argument vectors, without an interpreter start-up per line); any other block runs in bash
with the virtualenv's bin/ taken off PATH, as in a new shell.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actex.cli import app

REPO = Path(__file__).resolve().parent.parent
# architecture.md's blocks are interface listings (signatures, not programs): not run.
DOCS = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "architecture.md")]
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python", "yaml": "yaml"}
NOT_RUN = re.compile(r"<!--\s*not run:\s*\S.*-->")


@dataclass(frozen=True)
class Block:
    file: str
    line: int  # of the opening fence, 1-based
    language: str  # "bash" or "python"
    code: str
    skipped: bool

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The runnable-language fenced blocks of one markdown file."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        language = RUNNABLE.get(fence.group(1))
        if language:
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            blocks.append(Block(str(path.relative_to(REPO)), i + 1, language, "\n".join(lines[i + 1 : end]) + "\n",
                                bool(NOT_RUN.search(before))))
        i = end + 1
    return blocks


BLOCKS = [block for path in DOCS for block in fenced_blocks(path)]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "yaml"], ids=lambda b: b.id)
def test_config_file_examples_validate(block, tmp_path):
    # A --config or fleet file needs the hub, GCP or a cluster to run, but it must be valid.
    import yaml

    from actex.config import check_field_names
    from actex.data.config import DataConfig

    fields = yaml.safe_load(block.code)
    if "zones" in fields:  # a TPU VM fleet file (actex deploy / tpu / monitor)
        from actex.fleet.deploy import FleetFile

        FleetFile.model_validate(fields)
    elif "image" in fields and "workers" in fields:  # a GKE fleet file: render it as written
        (tmp_path / "fleet.yaml").write_text(block.code)
        result = CliRunner().invoke(app, ["k8s", "render", str(tmp_path / "fleet.yaml")])
        assert result.exit_code == 0, result.output
    else:
        check_field_names(fields)
        DataConfig.model_validate(fields["data"])


def test_the_docs_hold_runnable_blocks():
    # The convention is noticed: a parser that found nothing would pass every check below.
    ran = [b for b in BLOCKS if not b.skipped]
    assert len(ran) >= 10 and {b.file for b in ran} >= {"README.md", "docs/reader.md", "docs/store.md"}
    readme = [b for b in BLOCKS if b.file == "README.md"]
    activation = next(b for b in readme if "source .venv/bin/activate" in b.code)
    # How to reach `actex` comes before its first use.
    assert readme.index(activation) == min(i for i, b in enumerate(readme) if "actex " in b.code and not b.skipped)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("first-hour")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        patch.chdir(root)
        result = CliRunner().invoke(app, ["demo", "--tasks", "1"])
        assert result.exit_code == 0, result.output
    return root


def _actex_lines(code: str) -> list[list[str]] | None:
    """The argument vectors of a block made only of `actex ...` lines, else None."""
    code = code.replace("\\\n", " ")  # a command continued over lines is one command
    commands = [shlex.split(line, comments=True) for line in code.splitlines()]
    commands = [c for c in commands if c]
    return [c[1:] for c in commands] if commands and all(c[0] == "actex" for c in commands) else None


def _shell_env(root: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return env | {"PATH": path, "XDG_CACHE_HOME": str(root / "cache")}


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.skipped and b.language != "yaml"], ids=lambda b: b.id)
def test_block_runs_on_the_demo_run(block, demo_root, tmp_path, monkeypatch):
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "actex-demo").symlink_to(demo_root / "actex-demo")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_root / "cache"))
    commands = _actex_lines(block.code) if block.language == "bash" else None
    if commands is not None:
        for args in commands:
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, f"{block.id}: actex {shlex.join(args)}\n{result.output}"
        return
    argv = ["bash", "-e", "-o", "pipefail", "-c", block.code] if block.language == "bash" else [
        sys.executable, "-c", block.code]
    result = subprocess.run(argv, cwd=tmp_path, env=_shell_env(demo_root), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{block.id}:\n{block.code}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
