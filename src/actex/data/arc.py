"""ARC tasks as LLM prompts: validation, barc conversion, grid encoders, templates, augmentations.

A prompt shows the train pairs as "## Example k" with "### Input" / "### Output" sections,
then "## Test case" with its "### Input", rendered through the tokenizer's chat template;
the text stops at the assistant's answer prefix (ANSWER_PREFIX) so the activations are
those of a model about to write the output grid. Every augmentation is drawn from a seed
derived from (seed, row, test index, prediction index), never from global state, so any
process on any machine renders the same prompt.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

ANSWER_PREFIX = "### Output\n\n```grid"
NUM_COLOURS = 10
MAX_SIDE = 30  # ARC grids are 1..30 cells high and wide


class BadRow(ValueError):
    """A source row that cannot become samples; the message is the reason, without location."""


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class ArcTask:
    """One ARC task; grids are int8 arrays [height, width]. A test output may be unknown."""

    task_id: str
    train: tuple[tuple[np.ndarray, np.ndarray], ...]
    test: tuple[tuple[np.ndarray, np.ndarray | None], ...]

    def to_dict(self) -> dict:
        """The standard ARC JSON shape ({id, train, test}) with plain lists."""
        return {
            "id": self.task_id,
            "train": [{"input": i.tolist(), "output": o.tolist()} for i, o in self.train],
            "test": [
                {"input": i.tolist(), **({} if o is None else {"output": o.tolist()})}
                for i, o in self.test
            ],
        }


def validate_grid(value: Any, what: str) -> np.ndarray:
    """A rectangular list of 1..30 lists of 1..30 ints 0-9, else BadRow naming `what`."""
    # Fast path: numpy checks shape and range in C; only a failing grid walks the cells in
    # Python to name the first bad one (counting 200k barc rows must stay quick). The cell
    # types are checked first, also in C: numpy would silently turn True into colour 1.
    if isinstance(value, list) and value and isinstance(value[0], list) and _all_ints(value):
        try:
            grid = np.asarray(value)
        except ValueError:
            grid = None
        if grid is not None and grid.ndim == 2 and grid.size and grid.dtype.kind == "i":
            if grid.min() >= 0 and grid.max() < NUM_COLOURS and max(grid.shape) <= MAX_SIDE:
                return grid.astype(np.int8)
    return _validate_grid_slowly(value, what)


def _all_ints(rows: list) -> bool:
    """Every cell's type is exactly int (bool, an int subclass, is not)."""
    try:
        return set(map(type, chain.from_iterable(rows))) == {int}
    except TypeError:  # a row that is not iterable: the slow path names it
        return False


def _validate_grid_slowly(value: Any, what: str) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise BadRow(f"{what}: expected a non-empty list of rows, got {_short(value)}")
    width = None
    for r, row in enumerate(value):
        if not isinstance(row, list) or not row:
            raise BadRow(f"{what}: row {r} is not a non-empty list: {_short(row)}")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise BadRow(f"{what}: ragged grid, row {r} has {len(row)} cells, row 0 has {width}")
        for c, cell in enumerate(row):
            # bool is an int subclass; a True cell is a data bug, not colour 1.
            if not isinstance(cell, int) or isinstance(cell, bool):
                raise BadRow(f"{what}: cell ({r},{c}) is not an integer: {_short(cell)}")
            if not 0 <= cell < NUM_COLOURS:
                raise BadRow(f"{what}: cell ({r},{c}) = {cell} is outside 0-9")
    if max(len(value), width) > MAX_SIDE:
        raise BadRow(f"{what}: grid is {len(value)}x{width}; ARC grids have 1 to {MAX_SIDE} cells per side")
    return np.asarray(value, dtype=np.int8)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _pair(value: Any, what: str, need_output: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """A pair as {"input", "output"} or [input, output] (barc style)."""
    if isinstance(value, dict):
        if "input" not in value:
            raise BadRow(f"{what}: missing 'input'")
        raw_in, raw_out = value["input"], value.get("output")
    elif isinstance(value, list) and len(value) == 2:
        raw_in, raw_out = value
    else:
        raise BadRow(f"{what}: expected {{input, output}} or [input, output], got {_short(value)}")
    if raw_out is None and need_output:
        raise BadRow(f"{what}: missing 'output'")
    grid_out = None if raw_out is None else validate_grid(raw_out, f"{what} output")
    return validate_grid(raw_in, f"{what} input"), grid_out


def task_from_row(data: Any, row_index: int, examples_column: str = "examples") -> ArcTask:
    """Standard ARC rows ({train, test}) or barc rows (a list of pairs, the last one the test).

    The task id comes from a `task_id` or `id` field, else the row index.
    """
    if not isinstance(data, dict):
        raise BadRow(f"expected a JSON object, got {type(data).__name__}")
    raw_id = data.get("task_id", data.get("id"))
    task_id = str(row_index) if raw_id is None else str(raw_id)
    if "train" in data or "test" in data:
        train, test = data.get("train"), data.get("test")
        if not isinstance(train, list) or not train:
            raise BadRow("'train' must be a non-empty list of pairs")
        if not isinstance(test, list) or not test:
            raise BadRow("'test' must be a non-empty list of pairs")
        return ArcTask(
            task_id,
            tuple(_pair(p, f"train[{k}]", need_output=True) for k, p in enumerate(train)),
            tuple(_pair(p, f"test[{k}]", need_output=False) for k, p in enumerate(test)),
        )
    if examples_column in data:
        examples = data[examples_column]
        if not isinstance(examples, list) or len(examples) < 2:
            n = len(examples) if isinstance(examples, list) else _short(examples)
            raise BadRow(f"'{examples_column}' needs at least 2 pairs (train + test), got {n}")
        pairs = [_pair(p, f"{examples_column}[{k}]", need_output=True) for k, p in enumerate(examples)]
        return ArcTask(task_id, tuple(pairs[:-1]), (pairs[-1],))
    raise BadRow(f"no 'train'/'test' and no '{examples_column}' field (keys: {sorted(data)[:8]})")


def refuse_duplicate_ids(rows: Iterable[tuple[Any, ArcTask | str]]) -> None:
    """Raise ValueError (one line, both rows named) when two rows hold tasks of one id.

    `rows`: (row, parsed task) pairs as data.plan.valid_rows yields them (row.where names
    the row). A generation run votes, scores and submits answers per task id, so two tasks
    of one id would be pooled silently into one predictions.json entry.
    """
    first: dict[str, str] = {}
    for row, task in rows:
        if not isinstance(task, ArcTask):
            continue
        if task.task_id in first:
            raise ValueError(
                f"{row.where}: ARC task id {task.task_id!r} is also the id of {first[task.task_id]}; answers are "
                "voted and submitted per task id, so give each task its own id (a 'task_id' or 'id' field)")
        first[task.task_id] = row.where


# --------------------------------------------------------------------------- dihedral group

# Each transform is "flip left-right (or not), then rotate counter-clockwise k quarter turns".
DIHEDRAL = ("identity", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270")


def apply_dihedral(grid: np.ndarray, name: str) -> np.ndarray:
    """grid [h, w] -> transformed grid ([h, w] or [w, h])."""
    index = DIHEDRAL.index(name)
    flipped = np.fliplr(grid) if index >= 4 else grid
    return np.ascontiguousarray(np.rot90(flipped, k=index % 4))


def invert_dihedral(name: str) -> str:
    """The transform that undoes `name` (map an activation's grid cell back to the source)."""
    index = DIHEDRAL.index(name)
    # Rotations invert to the opposite turn; flip-then-rotate transforms are reflections,
    # which are their own inverses.
    return DIHEDRAL[(-index) % 4] if index < 4 else name


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Augmentation:
    """What was done to a task before rendering: recorded in each sample's meta."""

    transform: str
    colour_map: tuple[int, ...]  # colour c in the source is shown as colour_map[c]
    pair_order: tuple[int, ...]  # prompt example k is source train pair pair_order[k]

    def to_meta(self) -> dict:
        return {"transform": self.transform, "colour_map": list(self.colour_map), "pair_order": list(self.pair_order)}

    def apply(self, task: ArcTask, test_index: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """(train pairs in prompt order, test input), transformed and recoloured."""
        lut = np.asarray(self.colour_map, dtype=np.int8)

        def view(grid: np.ndarray) -> np.ndarray:
            return apply_dihedral(lut[grid], self.transform)

        train = [(view(task.train[k][0]), view(task.train[k][1])) for k in self.pair_order]
        return train, view(task.test[test_index][0])


def identity_augmentation(n_train: int) -> Augmentation:
    return Augmentation("identity", tuple(range(NUM_COLOURS)), tuple(range(n_train)))


def draw_augmentation(cfg, row_index: int, test_index: int, prediction: int, n_train: int) -> Augmentation:
    """The augmentation of one prediction; prediction 0 is always the task as given.

    Over a task's predictions the dihedral transforms follow a seeded permutation of the
    group that starts at identity, so predictions_per_task = 8 shows each transform once.
    Random draws happen in a fixed order whatever the switches, so turning one switch off
    leaves the other choices unchanged.
    """
    if prediction == 0:
        return identity_augmentation(n_train)
    task_rng = np.random.default_rng([cfg.seed, row_index, test_index])
    transform_order = [0, *(1 + task_rng.permutation(len(DIHEDRAL) - 1))]
    rng = np.random.default_rng([cfg.seed, row_index, test_index, prediction])
    shuffle_all = rng.random() < cfg.colour_all_prob
    all_colours = rng.permutation(NUM_COLOURS)
    keep_black = np.concatenate([[0], 1 + rng.permutation(NUM_COLOURS - 1)])
    order = rng.permutation(n_train)
    return Augmentation(
        transform=DIHEDRAL[transform_order[prediction % len(DIHEDRAL)]] if cfg.dihedral else "identity",
        colour_map=tuple(int(c) for c in (all_colours if shuffle_all else keep_black))
        if cfg.colour
        else tuple(range(NUM_COLOURS)),
        pair_order=tuple(int(k) for k in order) if cfg.shuffle_pairs else tuple(range(n_train)),
    )


# --------------------------------------------------------------------------- grid encoders


@dataclass(frozen=True)
class GridEncoder:
    """Grid -> fenced text block. Parts compose by name: "minimal", "row_numbers", "shape".

    minimal:      one line per row, digits without separators ("0120")
    row_numbers:  each line prefixed with its 1-based row number ("1 0120")
    shape:        the fence's info string carries the shape ("```grid shape: 3x4")
    """

    row_numbers: bool = False
    shape: bool = False

    def encode(self, grid: np.ndarray) -> str:
        lines = ["".join(str(int(c)) for c in row) for row in grid]
        if self.row_numbers:
            lines = [f"{r + 1} {line}" for r, line in enumerate(lines)]
        header = f"```grid shape: {grid.shape[0]}x{grid.shape[1]}" if self.shape else "```grid"
        return "\n".join([header, *lines, "```"])


ENCODER_PARTS = ("minimal", "row_numbers", "shape")

# The default: shape header + row numbers + minimal digits, the format the legacy system
# and arc24's Qwen models use (arc24 found it best for Qwen); models fine-tuned on it
# should see it by default.
DEFAULT_ENCODER = "shape+row_numbers"

# arc24's composite encoder names (its encoders.py), accepted so its configs run
# unchanged; each renders exactly the text of the actex name it maps to.
ARC24_ENCODERS = {
    "GridCodeBlockEncoder(MinimalGridEncoder())": "minimal",
    "GridCodeBlockEncoder(RowNumberEncoder(MinimalGridEncoder()))": "row_numbers",
    "GridShapeEncoder(MinimalGridEncoder())": "shape",
    "GridShapeEncoder(RowNumberEncoder(MinimalGridEncoder()))": "shape+row_numbers",
}


def canonical_encoder_name(name: str) -> str:
    """The actex name of an encoder given by actex name or arc24 composite name."""
    compact = "".join(name.split())
    if compact in ARC24_ENCODERS:
        return ARC24_ENCODERS[compact]
    if "(" in compact:
        raise ValueError(f"unknown grid encoder {name!r}: the arc24 names accepted are {', '.join(ARC24_ENCODERS)}")
    get_encoder(name)  # validates
    return name


def get_encoder(name: str) -> GridEncoder:
    """Parse "shape+row_numbers" style names (order free, "minimal" implied), or an arc24 alias."""
    name = ARC24_ENCODERS.get("".join(name.split()), name)
    parts = name.split("+")
    unknown = [p for p in parts if p not in ENCODER_PARTS]
    if unknown or not name:
        raise ValueError(f"unknown grid encoder {name!r}: compose with '+' from {', '.join(ENCODER_PARTS)}")
    return GridEncoder(row_numbers="row_numbers" in parts, shape="shape" in parts)


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    system: str
    intro: str


_TASK_INTRO = (
    "Here is an Abstraction and Reasoning Corpus (ARC) task. The examples below show input "
    "grids and the output grids they are turned into by one hidden rule. Find the rule and "
    "apply it to the test input. Answer with the output grid in the same format as the examples."
)

TEMPLATES = {
    "output-from-examples-v0": Template(
        system=(
            "You are an expert at solving puzzles from the Abstraction and Reasoning Corpus (ARC). "
            "Each puzzle shows a few pairs of grids. A grid is a rectangle of cells of at most "
            "30 by 30, and every cell holds a colour written as a digit from 0 to 9, where 0 is "
            "usually the black background. Every pair applies the same transformation to an "
            "input grid to produce its output grid. Transformations draw on core knowledge: "
            "objects and their persistence, counting and sorting, symmetry, rotation and "
            "reflection, repetition of patterns, filling, drawing lines between points, and "
            "moving or recolouring objects. The output may have a different size from the "
            "input. Study every example, state the rule to yourself, check that it explains all "
            "of the examples, and then produce the output of the test input exactly, cell by cell."
        ),
        intro=_TASK_INTRO,
    ),
    "output-from-examples-v1": Template(system="You are a helpful assistant.", intro=_TASK_INTRO),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}: choose from {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def user_message(
    train: list[tuple[np.ndarray, np.ndarray]], test_input: np.ndarray, encoder: GridEncoder, template: Template
) -> str:
    """The user turn: intro, "## Example k" sections, then "## Test case" with its input."""
    sections = [template.intro]
    for k, (grid_in, grid_out) in enumerate(train, start=1):
        sections.append(
            f"## Example {k}\n\n### Input\n\n{encoder.encode(grid_in)}\n\n### Output\n\n{encoder.encode(grid_out)}"
        )
    sections.append(f"## Test case\n\n### Input\n\n{encoder.encode(test_input)}")
    return "\n\n".join(sections)


def render_chat(tokenizer, template: Template, user: str) -> str:
    """System + user through the tokenizer's chat template, ending at the answer prefix."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; ARC prompts need one")
    messages = [{"role": "system", "content": template.system}, {"role": "user", "content": user}]
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return head + ANSWER_PREFIX


# --------------------------------------------------------------------------- task -> prompts


@dataclass(frozen=True)
class ArcPrompt:
    test_index: int
    prediction: int
    augmentation: Augmentation
    user: str


def samples_per_task(task: ArcTask, cfg) -> int:
    return len(task.test) * cfg.predictions_per_task


def task_prompt(task: ArcTask, row_index: int, cfg, local_index: int) -> ArcPrompt:
    """The task's `local_index`-th sample (test index major, prediction minor)."""
    test_index, prediction = divmod(local_index, cfg.predictions_per_task)
    aug = draw_augmentation(cfg, row_index, test_index, prediction, len(task.train))
    train, test_input = aug.apply(task, test_index)
    user = user_message(train, test_input, get_encoder(cfg.encoder), get_template(cfg.template))
    return ArcPrompt(test_index, prediction, aug, user)
