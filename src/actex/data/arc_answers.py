"""ARC answers: parse a generated grid, undo the augmentation, vote, score, submit.

The prompt ends at `arc.ANSWER_PREFIX` (the opening fence of the output grid), so the
model's answer is the rest of that fenced block. `parse_answer` inverts the encoder that
rendered the prompt (`arc.GridEncoder`: shape header, row numbers, minimal digits) and
never raises: a malformed answer gives `grid=None` and the reason, one line whose text
before the first ':' is a stable category (counted in the accuracy summary).

`undo_augmentation` maps a parsed grid from the prompt's frame back to the task's (inverse
colour map, inverse dihedral transform), where it can be compared with the test output
and voted with the other augmented predictions of the same test input.

`vote` ranks a test input's distinct grids by how many predictions gave them (ties: the
lowest prediction index first, so prediction 0, the task as given, wins a tie), and
`submission` writes the ARC Prize layout: {task_id: [{attempt_1, attempt_2}] per test input}.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from actex.data.arc import ANSWER_PREFIX, apply_dihedral, invert_dihedral

FENCE_OPEN = "```grid"
FENCE_CLOSE = "```"
# ARC Prize submissions need a grid in both attempts; this one stands for "no answer".
NO_ANSWER = [[0]]

_SHAPE_HEADER = re.compile(r"^ shape: (\d+)x(\d+)$")
_NUMBERED_ROW = re.compile(r"^(\d+) (.*)$")


@dataclass(frozen=True)
class ParsedAnswer:
    """grid: int8 [h, w] in the prompt's frame, or None with `reason` saying why."""

    grid: np.ndarray | None
    reason: str | None = None


def _fail(reason: str) -> ParsedAnswer:
    return ParsedAnswer(None, reason)


def _short(text: str, limit: int = 30) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def answer_block(generated_text: str) -> tuple[str, list[str]] | ParsedAnswer:
    """(fence info string, lines up to the closing fence) of the answer, or a failure.

    The prompt opened the fence when ANSWER_PREFIX ends with it; otherwise the model must.
    """
    text = ANSWER_PREFIX + generated_text
    start = text.rfind(FENCE_OPEN, 0, len(ANSWER_PREFIX))
    if start < 0:
        start = text.find(FENCE_OPEN, len(ANSWER_PREFIX))
        if start < 0:
            return _fail("missing fence: no ```grid in the answer")
    header, _, body = text[start + len(FENCE_OPEN):].partition("\n")
    lines = body.split("\n")
    # The closing fence may be followed on its line by what ends the turn ("```<|im_end|>").
    close = next((i for i, line in enumerate(lines) if line.startswith(FENCE_CLOSE)), None)
    if close is None:
        return _fail(f"missing closing fence: {len(lines)} line(s) and no ``` line")
    return header, lines[:close]


def parse_answer(generated_text: str, encoder, stop_reason: str | None = None) -> ParsedAnswer:
    """The grid in `generated_text` (what followed the prompt), read with `encoder`'s format.

    `encoder`: the arc.GridEncoder that rendered the prompt (its `row_numbers` and `shape`
    flags). `stop_reason` "max_new_tokens" marks an unclosed answer as cut at the budget.
    Never raises.
    """
    block = answer_block(generated_text)
    if isinstance(block, ParsedAnswer):
        if stop_reason == "max_new_tokens" and block.reason.startswith("missing closing fence"):
            return _fail("cut at max_new_tokens: the answer has no closing fence")
        return block
    header, lines = block
    expected_shape = None
    if encoder.shape:
        match = _SHAPE_HEADER.match(header)
        if match is None:
            return _fail(f"bad shape header: expected ' shape: HxW' after ```grid, got {_short(header)}")
        expected_shape = (int(match.group(1)), int(match.group(2)))
    elif header.strip():
        return _fail(f"bad fence: unexpected text after ```grid: {_short(header)}")
    if not lines:
        return _fail("empty grid: no rows before the closing fence")
    rows = []
    for r, line in enumerate(lines):
        if encoder.row_numbers:
            match = _NUMBERED_ROW.match(line)
            if match is None or int(match.group(1)) != r + 1:
                return _fail(f"bad row number: row {r + 1} is {_short(line)}")
            line = match.group(2)
        if not line or not line.isdigit() or not line.isascii():
            return _fail(f"non-digits: row {r + 1} is {_short(line)}")
        rows.append(line)
    widths = {len(row) for row in rows}
    if len(widths) > 1:
        return _fail(f"ragged rows: row widths {sorted(widths)}")
    grid = np.array([[int(c) for c in row] for row in rows], dtype=np.int8)
    if expected_shape is not None and grid.shape != expected_shape:
        return _fail(
            f"shape mismatch: header says {expected_shape[0]}x{expected_shape[1]}, "
            f"rows are {grid.shape[0]}x{grid.shape[1]}"
        )
    return ParsedAnswer(grid)


def undo_augmentation(grid: np.ndarray, augmentation: dict) -> np.ndarray:
    """A grid in the prompt's frame -> the task's frame.

    `augmentation`: a sample's meta (`transform`, `colour_map`: source colour c was shown
    as colour_map[c]). Rendering recoloured then transformed; this undoes both.
    """
    inverse_colours = np.argsort(np.asarray(augmentation["colour_map"])).astype(np.int8)
    return inverse_colours[apply_dihedral(grid, invert_dihedral(augmentation["transform"]))]


def answer_record(generated_text: str, encoder, stop_reason: str | None, augmentation: dict,
                  expected: np.ndarray | None) -> dict:
    """samples.jsonl's `answer`: {grid (task frame) | None, reason, correct (None if unknown)}."""
    parsed = parse_answer(generated_text, encoder, stop_reason)
    if parsed.grid is None:
        return {"grid": None, "reason": parsed.reason, "correct": None if expected is None else False}
    grid = undo_augmentation(parsed.grid, augmentation)
    correct = None if expected is None else bool(grid.shape == expected.shape and (grid == expected).all())
    return {"grid": grid.tolist(), "reason": None, "correct": correct}


# --------------------------------------------------------------------------- voting


@dataclass(frozen=True)
class Vote:
    """A test input's ranked distinct grids: (grid, votes, correct or None if unknown)."""

    task_id: str
    test_index: int
    ranked: tuple[tuple[list, int, bool | None], ...]
    known: bool  # the test output is known (some sample carries `correct`)

    def attempts(self) -> dict:
        first = self.ranked[0][0] if self.ranked else NO_ANSWER
        second = self.ranked[1][0] if len(self.ranked) > 1 else first
        return {"attempt_1": first, "attempt_2": second}

    def correct_at(self, k: int) -> bool | None:
        """Whether one of the top k grids is the test output (None when it is unknown)."""
        if not self.known:
            return None
        return any(correct for _, _, correct in self.ranked[:k])


def vote(samples: Iterable[dict]) -> list[Vote]:
    """Votes per (task id, test index), from ARC samples.jsonl records.

    Every sample of a test input counts, parsed or not, and so does one with no `answer`
    (its prompt was skipped), so a test input with no parsed answer still appears (and
    submits NO_ANSWER). Order: task id, then test index.
    """
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for record in samples:
        groups[(str(record["task_id"]), int(record["test_index"]))].append(record)
    votes = []
    for (task_id, test_index), records in sorted(groups.items()):
        tally: dict[str, list] = {}  # grid key -> [grid, votes, first prediction, correct]
        known = False
        for record in sorted(records, key=lambda r: r.get("prediction", 0)):
            answer = record.get("answer") or {}
            known |= answer.get("correct") is not None
            if answer.get("grid") is None:
                continue
            entry = tally.setdefault(repr(answer["grid"]), [answer["grid"], 0, record.get("prediction", 0),
                                                              answer.get("correct")])
            entry[1] += 1
        ranked = sorted(tally.values(), key=lambda e: (-e[1], e[2]))
        votes.append(Vote(task_id, test_index, tuple((g, n, c) for g, n, _, c in ranked), known))
    return votes


def submission(votes: Iterable[Vote]) -> dict:
    """ARC Prize layout: {task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]} with one
    entry per test input, in test-index order."""
    out: dict[str, list] = {}
    for v in sorted(votes, key=lambda v: (v.task_id, v.test_index)):
        out.setdefault(v.task_id, []).append(v.attempts())
    return out


def accuracy(samples: list[dict]) -> dict:
    """The accuracy summary of a generation run, from its samples.jsonl records.

    `samples` counts every record, `parsed` the answers read; `stop_reasons` counts
    "stop_token", "max_new_tokens" and "skipped" (a prompt with no room to generate: no
    answer, and no parse failure either). Test inputs count every test input, skipped ones
    included; pass@k counts those with known outputs.
    """
    answered = [s for s in samples if s.get("answer") is not None]
    known = [s for s in answered if s["answer"].get("correct") is not None]
    votes = vote(samples)
    known_votes = [v for v in votes if v.known]
    by_task: dict[str, list[Vote]] = defaultdict(list)
    for v in known_votes:
        by_task[v.task_id].append(v)
    failures = Counter(s["answer"]["reason"].split(":")[0] for s in answered if s["answer"].get("reason"))
    return {
        "samples": len(samples),
        "parsed": sum(s["answer"]["grid"] is not None for s in answered),
        "samples_known": len(known),
        "samples_correct": sum(bool(s["answer"]["correct"]) for s in known),
        "test_inputs": len(votes),
        "test_inputs_known": len(known_votes),
        "pass_at_1": sum(bool(v.correct_at(1)) for v in known_votes),
        "pass_at_2": sum(bool(v.correct_at(2)) for v in known_votes),
        "tasks_known": len(by_task),
        "tasks_solved": sum(all(v.correct_at(2) for v in vs) for vs in by_task.values()),
        "stop_reasons": dict(Counter(s.get("stop_reason") or "skipped" for s in samples)),
        "parse_failures": dict(failures),
    }

