"""ARC answers: parsing generated grids, undoing augmentations, voting, submission, accuracy."""

import itertools

import numpy as np
import pytest
from data_fixtures import HAND_TASK, tokenizer, tokenizer_dir, write_jsonl  # noqa: F401

from actex.data import DataConfig, arc, build_plan
from actex.data.arc_answers import accuracy, answer_record, parse_answer, submission, undo_augmentation, vote

ENCODERS = ["minimal", "row_numbers", "shape", "shape+row_numbers"]
GRID = np.array([[0, 1, 2], [3, 4, 5]], np.int8)


def answer_text(grid, encoder_name: str, tail: str = "<|im_end|>") -> str:
    """What a model that answers `grid` generates after the prompt's answer prefix."""
    block = arc.get_encoder(encoder_name).encode(np.asarray(grid))
    assert block.startswith(arc.ANSWER_PREFIX[arc.ANSWER_PREFIX.rfind("```grid"):])
    return block[len("```grid"):] + tail


@pytest.mark.parametrize("name", ENCODERS)
def test_parse_inverts_every_encoder(name):
    parsed = parse_answer(answer_text(GRID, name), arc.get_encoder(name))
    assert parsed.reason is None
    np.testing.assert_array_equal(parsed.grid, GRID)


@pytest.mark.parametrize(
    "name, text, stop_reason, reason",
    [
        ("minimal", "\n012\n34\n```", None, "ragged rows"),
        ("minimal", "\n012\n3a5\n```", None, "non-digits"),
        ("minimal", "\n012\n\n```", None, "non-digits"),  # a blank row
        ("minimal", "\n012\n345\n", None, "missing closing fence"),
        ("minimal", "\n012\n34", "max_new_tokens", "cut at max_new_tokens"),
        ("minimal", "\n```", None, "empty grid"),
        ("minimal", " shape: 2x3\n012\n345\n```", None, "bad fence"),
        ("shape", " shape: 3x3\n012\n345\n```", None, "shape mismatch"),
        ("shape", "\n012\n345\n```", None, "bad shape header"),
        ("row_numbers", "\n1 012\n3 345\n```", None, "bad row number"),
        ("row_numbers", "\n012\n345\n```", None, "bad row number"),
        ("shape+row_numbers", " shape: 2x3\n1 012\n2 3x5\n```", None, "non-digits"),
        ("minimal", "\n٣45\n```", None, "non-digits"),  # a non-ASCII digit
        ("minimal", "", "stop_token", "missing closing fence"),
    ],
)
def test_malformed_answers_give_a_reason_and_never_raise(name, text, stop_reason, reason):
    parsed = parse_answer(text, arc.get_encoder(name), stop_reason)
    assert parsed.grid is None
    assert parsed.reason.split(":")[0] == reason, parsed.reason


def test_an_answer_after_a_missing_prompt_fence_needs_the_models_own(monkeypatch):
    """A prefix that does not open the fence: the model must open it, or no grid."""
    from actex.data import arc_answers

    monkeypatch.setattr(arc_answers, "ANSWER_PREFIX", "### Output\n\n")
    encoder = arc.get_encoder("minimal")
    assert parse_answer("012\n345\n```", encoder).reason.startswith("missing fence")
    np.testing.assert_array_equal(parse_answer("```grid\n012\n345\n```", encoder).grid, GRID)


@pytest.mark.parametrize("transform", arc.DIHEDRAL)
def test_augmentation_inverse_round_trips(transform):
    rng = np.random.default_rng(arc.DIHEDRAL.index(transform))
    source = rng.integers(0, 10, (3, 5)).astype(np.int8)
    for colour_map in (tuple(range(10)), tuple(int(c) for c in rng.permutation(10))):
        aug = arc.Augmentation(transform, colour_map, (0,))
        task = arc.ArcTask("t", ((source, source),), ((source, None),))
        _, shown = aug.apply(task, 0)  # what the prompt shows, transformed and recoloured
        for name in ENCODERS:
            record = answer_record(answer_text(shown, name), arc.get_encoder(name), "stop_token",
                                   aug.to_meta(), source)
            assert record == {"grid": source.tolist(), "reason": None, "correct": True}, (transform, name)
        np.testing.assert_array_equal(undo_augmentation(shown, aug.to_meta()), source)


def sample(task, test, prediction, grid, correct=None):
    answer = {"grid": grid, "reason": None if grid is not None else "non-digits: x", "correct": correct}
    return {"task_id": task, "test_index": test, "prediction": prediction, "answer": answer, "stop_reason": "stop_token"}


A, B, C = [[1]], [[2, 2]], [[3], [3]]


def test_voting_and_submission_on_hand_made_predictions():
    samples = [
        # task x, test 0: B twice, A twice (A first at prediction 0 wins the tie), C once
        sample("x", 0, 3, B), sample("x", 0, 0, A), sample("x", 0, 1, B), sample("x", 0, 2, A), sample("x", 0, 4, C),
        # task x, test 1: one answer only -> both attempts are it
        sample("x", 1, 0, C), sample("x", 1, 1, None),
        # task w: nothing parsed -> the placeholder grid
        sample("w", 0, 0, None), sample("w", 0, 1, None),
        # task y: C outvotes A
        sample("y", 0, 0, A), sample("y", 0, 1, C), sample("y", 0, 2, C),
    ]
    votes = vote(samples)
    assert [(v.task_id, v.test_index) for v in votes] == [("w", 0), ("x", 0), ("x", 1), ("y", 0)]
    assert [n for _, n, _ in votes[1].ranked] == [2, 2, 1]
    assert submission(votes) == {
        "w": [{"attempt_1": [[0]], "attempt_2": [[0]]}],
        "x": [{"attempt_1": A, "attempt_2": B}, {"attempt_1": C, "attempt_2": C}],
        "y": [{"attempt_1": C, "attempt_2": A}],
    }


def test_accuracy_from_injected_generations_with_known_answers(tmp_path, tokenizer):
    """Real prompts of a task with a known output (4 augmented predictions); the injected
    generations answer in each prompt's own frame, right or wrong, so scoring has to undo
    every augmentation to count them."""
    second = {**HAND_TASK, "id": "second", "test": [HAND_TASK["test"][0], {"input": [[1]], "output": [[2]]}]}
    no_output = {**HAND_TASK, "id": "unknown", "test": [{"input": [[1, 2]]}]}
    cfg = DataConfig(dataset=str(write_jsonl(tmp_path / "t.jsonl", [HAND_TASK, second, no_output])),
                     predictions_per_task=4, encoder="shape+row_numbers", colour_all_prob=0.5)
    plan = build_plan(cfg, tokenizer, chunk_size=100)
    encoder = arc.get_encoder(cfg.encoder)
    wrong = np.array([[9, 9]], np.int8)
    # Which (task, test, prediction) answers right: swap12 right twice, wrong twice (wrong
    # outvotes nothing: the two wrong ones differ); second: test 0 right once (but another
    # wrong answer twice wins attempt 1, so pass@1 misses, pass@2 hits), test 1 never.
    right = {("swap12", 0, 0), ("swap12", 0, 3), ("second", 0, 2)}
    records = []
    for s in plan.samples(0):
        key = (s.meta["task_id"], s.meta["test_index"], s.meta["prediction"])
        expected = s.task.test[key[1]][1]
        aug = arc.Augmentation(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.meta["augmentation"].items()})
        if key in right:
            shown = aug.apply(arc.ArcTask("t", s.task.train, ((expected, None),)), 0)[1]
        elif key[0] == "second" and key[1] == 0 and key[2] in (0, 1):
            # The same wrong grid twice, shown in each prompt's frame.
            shown = arc.apply_dihedral(np.asarray(aug.colour_map, np.int8)[wrong], aug.transform)
        else:
            shown = np.full((1, 1 + key[2]), 7, np.int8)  # all different
        text = answer_text(shown, cfg.encoder)
        records.append({**s.meta, "stop_reason": "stop_token",
                        "answer": answer_record(text, encoder, "stop_token", s.meta["augmentation"], expected)})
    records.append({**records[-1], "answer": answer_record("\n1 0", encoder, "max_new_tokens",
                                                           records[-1]["augmentation"], None),
                    "stop_reason": "max_new_tokens", "prediction": 9})
    summary = accuracy(records)
    assert summary == {
        "samples": 17, "parsed": 16, "samples_known": 12, "samples_correct": 3,
        "test_inputs": 4, "test_inputs_known": 3, "pass_at_1": 1, "pass_at_2": 2,
        "tasks_known": 2, "tasks_solved": 1,
        "stop_reasons": {"stop_token": 16, "max_new_tokens": 1},
        "parse_failures": {"cut at max_new_tokens": 1},
    }
    assert sorted(submission(vote(records))) == ["second", "swap12", "unknown"]


def test_vote_counts_equal_grids_across_transforms():
    """Two augmented predictions of the same answer land on one grid once un-augmented."""
    source = np.array([[1, 2, 3]], np.int8)
    records = []
    for p, (transform, colours) in enumerate(itertools.product(("rot90", "flip"), ((0, 5, 1, 2, 3, 4, 6, 7, 8, 9),))):
        meta = arc.Augmentation(transform, colours, (0,)).to_meta()
        shown = arc.apply_dihedral(np.asarray(colours, np.int8)[source], transform)
        records.append({"task_id": "t", "test_index": 0, "prediction": p,
                        "answer": answer_record(answer_text(shown, "minimal"), arc.get_encoder("minimal"),
                                                "stop_token", meta, None)})
    (v,) = vote(records)
    assert v.ranked == ((source.tolist(), 2, None),) and v.correct_at(2) is None
