"""Shared data fixtures: a tokenizer trained on the spot, a tiny hand-checked ARC task, file writers.

Import the fixtures into a test module (`from data_fixtures import tokenizer`) to use them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actex.data import build_tokenizer

# Hand-checked task: the rule swaps colours 1 and 2. Two train pairs, one test with output.
HAND_TASK = {
    "id": "swap12",
    "train": [
        {"input": [[1, 0], [0, 2]], "output": [[2, 0], [0, 1]]},
        {"input": [[1, 1, 2]], "output": [[2, 2, 1]]},
    ],
    "test": [{"input": [[0, 1], [2, 0], [1, 1]], "output": [[0, 2], [1, 0], [2, 2]]}],
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A saved HF tokenizer directory (ChatML template), trained once per test session."""
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSON lines; a str row is written verbatim (to plant bad JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
