"""From a fresh extraction to SAELens: the export trains with SAELens's own runner from its
documented config alone, its rows are what they say they are, and the shuffle loses nothing.

SAELens is a test dependency (the `saelens` extra, inside `test`): it installs into this
environment beside torch, jax and transformers without moving any of them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import load_from_disk
from engine_fixtures import TEXT_ROWS, jax_cache, run_fields, tiny_model_dir, write_jsonl  # noqa: F401 - fixtures
from reader_fixtures import write_run
from typer.testing import CliRunner

from actex import open_run
from actex.cli import app
from actex.reader.exports.saelens import context_starts, export_saelens

sae_lens = pytest.importorskip("sae_lens")

HOOK = "blocks.1.hook_resid_post"
COLUMN = "model.layers.1"  # the transformers module SAELens hooks for it
CONTEXT = 8
WINDOW = 32
# Per-token relative L2 error between the JAX extraction and transformers, both float32.
PARITY = 1e-4


@pytest.fixture(scope="module")
def run_url(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny random Qwen2 over text rows of many lengths, long ones split into 32-token
    windows, in float32."""
    from actex.engine.worker import extract
    from actex.engine.prepare import prepare_run
    from actex.engine.work import StaticChunks

    root = tmp_path_factory.mktemp("saelens")
    dataset = write_jsonl(root / "text.jsonl", [{"text": text} for text in TEXT_ROWS])
    run = prepare_run(run_fields(tiny_model_dir, dataset, str(root / "out"), hooks=[HOOK], chunk_size=2,
                                         data={"max_seq_len": WINDOW}))
    extract(run, StaticChunks(run.plan.num_chunks), worker="w0")
    return run.config.run_url


def cli_export(run_url: str, out, *flags: str) -> dict:
    result = CliRunner().invoke(app, ["export", run_url, str(out), "--to", "saelens", "--hook", HOOK,
                                      "--context-size", str(CONTEXT), *flags])
    assert result.exit_code == 0, result.output
    return json.loads((out / "saelens.json").read_text())


def rows_of(path) -> dict[str, np.ndarray]:
    return load_from_disk(str(path)).with_format("numpy")[:]


def saelens_model(runner: dict):
    """The model exactly as SAELens's runner loads it from the config."""
    from sae_lens.load_model import load_model

    return load_model(runner["model_class_name"], runner["model_name"], device="cpu",
                      model_from_pretrained_kwargs=runner["model_from_pretrained_kwargs"],
                      hook_names=[runner["hook_name"]])


def recomputed(model, hook_name: str, token_ids: np.ndarray) -> np.ndarray:
    import torch

    _, cache = model.run_with_cache(torch.as_tensor(token_ids, dtype=torch.long), names_filter=[hook_name])
    return cache[hook_name].float().numpy()


def relative_error(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per token: ||got - want|| / ||want||."""
    return np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)


def stored_tokens(run_url: str) -> dict[tuple[int, int], int]:
    """(sample id, token index in the sample) -> token id over the run."""
    run, found = open_run(run_url), {}
    for batch in run.iter_batches(HOOK, 4096, shuffle=False):
        for sample in np.unique(batch.sample_ids):
            ids = batch.token_ids[batch.sample_ids == sample]
            found.update({(int(sample), i): int(t) for i, t in enumerate(ids)})
    return found


def sample_lengths(run_url: str) -> dict[int, int]:
    return {int(s): int(n) for s, n in zip(*np.unique(
        np.concatenate([b.sample_ids for b in open_run(run_url).iter_batches(HOOK, 4096, shuffle=False)]),
        return_counts=True))}


def test_whole_contexts_recompute_to_the_stored_rows_with_saelens_model(run_url, tmp_path):
    config = cli_export(run_url, tmp_path / "first", "--contexts", "first")
    runner = config["runner"]
    assert runner["hook_name"] == COLUMN and runner["context_size"] == CONTEXT and runner["prepend_bos"] is False
    rows = rows_of(tmp_path / "first")
    assert len(rows["position"]) >= 6 and (rows["position"] == 0).all()
    error = relative_error(recomputed(saelens_model(runner), COLUMN, rows["token_ids"]), rows[COLUMN])
    assert error.max() < PARITY


def test_slices_are_labelled_with_their_window_and_position(run_url, tmp_path):
    runner = cli_export(run_url, tmp_path / "all")["runner"]
    rows = rows_of(tmp_path / "all")
    slices = np.flatnonzero(rows["position"] > 0)
    assert len(slices) >= 4 and (rows["position"] % CONTEXT == 0).all()
    model, tokens = saelens_model(runner), stored_tokens(run_url)
    for row in slices[:6]:
        sample, offset, position = (int(rows[k][row]) for k in ("sample_id", "offset", "position"))
        window = [tokens[sample, i] for i in range(offset - position, offset + CONTEXT)]  # from the window's start
        assert window[-CONTEXT:] == rows["token_ids"][row].tolist()
        with_prefix = recomputed(model, COLUMN, np.array([window]))[0, -CONTEXT:]
        assert relative_error(with_prefix, rows[COLUMN][row]).max() < PARITY
        alone = recomputed(model, COLUMN, rows["token_ids"][row][None])[0]
        assert relative_error(alone, rows[COLUMN][row]).max() > 100 * PARITY  # not a whole context


def test_shuffled_export_holds_every_exported_token_once(run_url, tmp_path):
    run = open_run(run_url)
    ordered = export_saelens(run, tmp_path / "ordered", HOOK, context_size=CONTEXT, seed=None)
    shuffled = export_saelens(run, tmp_path / "shuffled", HOOK, context_size=CONTEXT, seed=3)
    again = export_saelens(run, tmp_path / "again", HOOK, context_size=CONTEXT, seed=3)
    a, b, c = (rows_of(tmp_path / name) for name in ("ordered", "shuffled", "again"))

    def tokens(rows):
        return [(int(s), int(o) + j) for s, o in zip(rows["sample_id"], rows["offset"]) for j in range(CONTEXT)]

    assert ordered.rows == shuffled.rows and len(set(tokens(b))) == len(tokens(b)) == ordered.rows * CONTEXT
    assert sorted(tokens(a)) == sorted(tokens(b)) and tokens(a) != tokens(b)
    order = {key: i for i, key in enumerate(zip(a["sample_id"].tolist(), a["offset"].tolist()))}
    moved = [order[key] for key in zip(b["sample_id"].tolist(), b["offset"].tolist())]
    np.testing.assert_array_equal(b[HOOK], a[HOOK][moved])  # each row carries its own values
    np.testing.assert_array_equal(b["token_ids"], a["token_ids"][moved])
    np.testing.assert_array_equal(c[HOOK], b[HOOK])  # the seed fixes the order


def test_align_end_keeps_each_windows_end(run_url, tmp_path):
    run = open_run(run_url)
    result = export_saelens(run, tmp_path / "end", HOOK, context_size=CONTEXT, align="end", seed=None)
    rows = rows_of(tmp_path / "end")
    ends = {(int(s), int(o) + CONTEXT) for s, o in zip(rows["sample_id"], rows["offset"])}
    windows = 0
    for sample, count in sample_lengths(run_url).items():
        for stop in range(WINDOW, count + WINDOW, WINDOW):  # the end of each window of the sample
            stop = min(stop, count)
            if stop - (stop - 1) // WINDOW * WINDOW >= CONTEXT:  # the window holds a whole context
                assert (sample, stop) in ends
                windows += 1
    assert windows >= 6
    starts = context_starts(np.arange(20), np.zeros(20), CONTEXT, align="end")
    assert starts.tolist() == [4, 12] and result.tokens_dropped > 0


def test_saelens_runner_trains_from_the_documented_config_alone(run_url, tmp_path):
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens import TopKTrainingSAEConfig

    config = cli_export(run_url, tmp_path / "sae-cache", "--contexts", "first")
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=config["d_in"], d_sae=64, k=4),
        **config["runner"],
        training_tokens=4 * 16, train_batch_size_tokens=16, store_batch_size_prompts=2, n_batches_in_buffer=4,
        device="cpu", logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None,
        output_path=str(tmp_path / "sae"),
    )
    sae = LanguageModelSAETrainingRunner(cfg).run()  # no override_model / override_dataset
    saved = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert (saved["hook_name"], saved["context_size"], saved["prepend_bos"]) == (COLUMN, CONTEXT, False)
    assert saved["model_name"] == config["runner"]["model_name"]
    assert all(np.isfinite(p.detach().numpy()).all() for p in sae.parameters())


def test_cli_refuses_in_one_line_before_writing(run_url, tmp_path):
    runner = CliRunner()

    def refused(url, *flags) -> str:
        result = runner.invoke(app, ["export", url, str(tmp_path / "x"), "--to", "saelens", *flags])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "x").exists()
        return result.output

    assert "--align end does not cut" in refused(run_url, "--hook", HOOK, "--contexts", "first", "--align", "end")
    assert "--contexts must be one of" in refused(run_url, "--hook", HOOK, "--contexts", "some")
    assert "--dtype must be one of" in refused(run_url, "--hook", HOOK, "--dtype", "bfloat16")
    no_model = write_run(str(tmp_path / "nomodel"), lengths=[[[8]]])
    assert "pass --model DIR" in refused(no_model.url, "--hook", "blocks.0.hook_resid_post")
    assert "--model-class HookedTransformer" in refused(no_model.url, "--hook", "blocks.1.mlp.hook_post", "--model",
                                                         str(open_run(run_url).config["model"]))
