"""One sample of a plan: the record the plan hands out and the tokenizer consumes.

It lives apart from both so that data/plan.py may call data/tokenize.py (to refuse a
tokenizer without BOS while planning) without tokenize importing the plan back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actex.data import arc


@dataclass(frozen=True)
class Sample:
    sample_id: int
    source_row: int  # global row index in the source
    text: str
    meta: dict[str, Any]  # JSON-ready: source, row, task_id, test_index, augmentation ...
    task: arc.ArcTask | None = field(default=None, repr=False, compare=False)  # ARC rows: to score answers
