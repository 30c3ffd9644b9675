"""`actex streams`: barc rows -> ARC task streams with unique ids, bad rows reported, CLI."""

import json

from data_fixtures import tokenizer, tokenizer_dir, write_jsonl  # noqa: F401
from typer.testing import CliRunner

from actex.cli import app
from actex.data import DataConfig, build_plan
from actex.data.streams import stream_name, write_streams

BARC = [
    {"examples": [[[[1, 0]], [[0, 1]]], [[[2, 2]], [[2, 2]]], [[[3, 0]], [[0, 3]]]], "seeds": ["a"]},
    {"examples": [[[[4]], [[5]]], [[[6]], [[7]]]]},
    {"examples": [[[[1]], [[2]]], [[[1]], [[2]]], [[[8, 8], [8, 8]], [[1, 1], [1, 1]]]]},
]


def _read_streams(folder, n):
    return [[json.loads(line) for line in (folder / stream_name(i, n)).read_text().splitlines()] for i in range(n)]


def test_barc_streams_round_trip(tmp_path, tokenizer):  # noqa: F811
    source = write_jsonl(tmp_path / "barc.jsonl", BARC)
    cfg = DataConfig(dataset=str(source), predictions_per_task=3)
    report = write_streams(cfg, str(tmp_path / "one"), 1)
    (tasks,) = _read_streams(tmp_path / "one", 1)
    assert [t["id"] for t in tasks] == ["0", "1", "2"] and report["rows"] == [3]
    assert tasks[0]["test"] == [{"input": [[3, 0]], "output": [[0, 3]]}] and len(tasks[0]["train"]) == 2
    # The converted stream renders exactly the prompts of the barc source.
    converted = DataConfig(dataset=str(tmp_path / "one" / stream_name(0, 1)), predictions_per_task=3)
    original, again = build_plan(cfg, tokenizer, 4), build_plan(converted, tokenizer, 4)
    assert original.num_samples == again.num_samples == 9
    for k in range(original.num_chunks):
        assert [s.text for s in original.samples(k)] == [s.text for s in again.samples(k)]


def test_streams_balance_prefix_and_report_skips(tmp_path):
    source = write_jsonl(tmp_path / "barc.jsonl", [*BARC, {"examples": [[[[1]], [[2]]]]}, *BARC])
    cfg = DataConfig(dataset=str(source), on_bad_row="skip")
    report = write_streams(cfg, str(tmp_path / "out"), 4, id_prefix="barc-")
    streams = _read_streams(tmp_path / "out", 4)
    ids = [t["id"] for stream in streams for t in stream]
    assert sorted(ids) == sorted(f"barc-{i}" for i in (0, 1, 2, 4, 5, 6)) and len(set(ids)) == 6
    assert report["rows"] == [2, 2, 1, 1]
    assert [(r["row"], "at least 2 pairs" in r["reason"]) for r in report["skipped_rows"]] == [(3, True)]
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report


def test_streams_cli_text_and_errors(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"body": "a"}, {"body": "b"}, {"body": 7}])
    runner = CliRunner()
    ok = runner.invoke(app, ["streams", str(source), str(tmp_path / "s"), "-n", "2", "--format", "text", "--text-column", "body", "--on-bad-row", "skip"])
    assert ok.exit_code == 0, ok.output
    assert _read_streams(tmp_path / "s", 2) == [[{"text": "a", "source_row": 0}], [{"text": "b", "source_row": 1}]]
    bad = runner.invoke(app, ["streams", str(source), str(tmp_path / "t"), "-n", "2", "--format", "text", "--text-column", "body"])
    # The same prefix and exit code as every other command's user errors.
    assert bad.exit_code == 2
    assert bad.stderr == f"actex: error: {source}:row 2 (line 3): column 'body' is int, not a string\n"
    wrong = runner.invoke(app, ["streams", str(source), str(tmp_path / "u"), "-n", "2", "--format", "csv"])
    assert wrong.exit_code == 2 and wrong.stderr.startswith("actex: error: --format:")
    assert len(wrong.stderr.splitlines()) == 1
