"""int8 storage and overflow, on the engine's own runs of a small Qwen2 with planted outliers.

The model (`outlier_model`) carries what real Qwen and Llama residuals have: an outlier
feature (one residual channel 100x the others on every token), a massive activation on
each sample's first token (3000x), and one output channel 100x the others in the attention
and MLP outputs and in the MLP's gated activation. The same rows are extracted as float32,
bfloat16 and int8; the int8 values that every reader path returns are compared with the
float32 run's and with numpy's own dequantization of the stored codes (written here from
docs/store.md, not with actex's decoder).
"""

from __future__ import annotations

import gzip
import json
import logging
import pickle

import numpy as np
import pytest
import safetensors.numpy
from engine_fixtures import TEXT_ROWS, jax_cache  # noqa: F401
from typer.testing import CliRunner

from actex import open_run
from actex.cli import app
from actex.store.commits import read_commits
from actex.store.stats import HookStats

HOOKS = ["hook_embed", "blocks.0.hook_attn_out", "blocks.0.hook_resid_mid", "blocks.0.mlp.hook_post",
         "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post", "ln_final.hook_normalized"]
HIDDEN, MLP = 128, 256
TYPICAL = 0.02  # the random checkpoint's weight scale
OUTLIER, MASSIVE = 5, 9  # residual channels


def extract_run(model, dataset, output, dtype: str, hooks=HOOKS) -> str:
    from actex.engine.worker import extract
    from actex.engine.prepare import prepare_run
    from actex.engine.work import StaticChunks

    run = prepare_run({
        "model": str(model), "hooks": hooks, "dtype": dtype, "output": str(output), "run_name": dtype,
        "chunk_size": 4, "batch_tokens": 256,
        "data": {"dataset": str(dataset), "format": "text", "max_seq_len": 64, "long_policy": "split"},
    })
    extract(run, StaticChunks(run.plan.num_chunks), worker="w0")
    return run.config.run_url


def plant(model, change) -> None:
    """Edit the checkpoint's tensors in place: change({name: array}) mutates them."""
    path = model / "model.safetensors"
    tensors = {k: v.copy() for k, v in safetensors.numpy.load_file(str(path)).items()}
    change(tensors)
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def random_model(path, hidden: int, mlp: int):
    from actex.data import build_tokenizer
    from actex.model.random_checkpoint import tiny_hf_config, write_random_checkpoint

    tokenizer = build_tokenizer(path, vocab_size=384)
    write_random_checkpoint(path, tiny_hf_config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                                                 num_hidden_layers=2), seed=3)
    return tokenizer


@pytest.fixture(scope="module")
def runs(tmp_path_factory, jax_cache):  # noqa: F811
    root = tmp_path_factory.mktemp("quantized")
    model = root / "model"
    tokenizer = random_model(model, HIDDEN, MLP)
    firsts = sorted({tokenizer(text)["input_ids"][0] for text in TEXT_ROWS})

    def outliers(t):
        t["model.embed_tokens.weight"][:, OUTLIER] = 100 * TYPICAL
        t["model.embed_tokens.weight"][firsts, MASSIVE] = 3000 * TYPICAL
        for layer in range(2):
            t[f"model.layers.{layer}.mlp.up_proj.weight"][7] *= 100
            t[f"model.layers.{layer}.self_attn.o_proj.weight"][11] *= 100
            t[f"model.layers.{layer}.mlp.down_proj.weight"][13] *= 100

    plant(model, outliers)
    dataset = root / "text.jsonl"
    dataset.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXT_ROWS))
    return {dtype: extract_run(model, dataset, root / "out", dtype) for dtype in ("float32", "bfloat16", "int8")}


def in_order(url: str, hook: str, **kwargs) -> np.ndarray:
    return np.concatenate([b.activations for b in open_run(url).iter_batches(hook, 100, shuffle=False, **kwargs)])


def relative_l2(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    reference = reference.astype(np.float64)
    return np.linalg.norm(values - reference, axis=1) / np.linalg.norm(reference, axis=1)


def per_token_scales(x: np.ndarray) -> np.ndarray:
    """Symmetric int8 with one scale per token: what blocks of channels are there to beat."""
    step = np.abs(x).max(1, keepdims=True) / 127
    return np.round(x / step) * step


def test_int8_error_is_within_one_percent_for_every_hook_kind_where_per_token_scales_fail(runs):
    samples = np.concatenate([b.sample_ids for b in open_run(runs["float32"]).iter_batches(HOOKS[0], 100, shuffle=False)])
    first_tokens = np.unique(samples, return_index=True)[1]  # each sample's first row (in order)
    int8 = open_run(runs["int8"])
    failing = []
    for hook in HOOKS:
        exact = in_order(runs["float32"], hook)
        error = relative_l2(in_order(runs["int8"], hook), exact)
        assert error.max() <= 0.01, hook
        # The run's stats carry the same measured error (of the stored values, per token).
        stats = int8.stats(hook)
        assert stats.quant_error_max == pytest.approx(error.max(), rel=1e-3)
        assert stats.quant_error_mean == pytest.approx(error.mean(), rel=1e-3)
        if relative_l2(per_token_scales(exact), exact).max() > 0.01:
            failing.append(hook)
    # The planted outliers are there: a channel 40x the median or more, the first token 1000x.
    resid = np.abs(in_order(runs["float32"], "blocks.1.hook_resid_post"))
    assert np.median(resid[:, OUTLIER]) > 40 * np.median(resid)
    assert resid[first_tokens, MASSIVE].min() > 1000 * np.median(resid)
    assert failing == HOOKS  # per-token scales alone exceed 1% on every hook kind of this model


def test_int8_bytes_per_token_are_at_most_0_56_of_bfloat16(runs):
    sizes = {dtype: open_run(url).num_bytes for dtype, url in runs.items()}
    tokens = open_run(runs["int8"]).num_tokens
    assert sizes["int8"] / sizes["bfloat16"] <= 0.56, (sizes, tokens)


def numpy_dequantized(url: str, hook: str) -> np.ndarray:
    """docs/store.md's recipe: code * (scale * 2 ** (-e / 2)), e the 4-bit exponent of each
    block of 8 channels, two per byte, low nibble first; parts in commit-record order."""
    out = []
    for chunk, record in sorted(read_commits(open_run(url).store).items()):
        for part in record.parts:
            t = safetensors.numpy.load_file(f"{url}/{part.path}")
            codes, scale, packed = t[hook], t[f"{hook}/scale"], t[f"{hook}/block_exp"]
            exps = np.stack([packed & 15, packed >> 4], -1).reshape(len(codes), -1)[:, : codes.shape[1] // 8].astype(int)
            steps = scale[:, None] * (2.0 ** (-exps / 2)).astype(np.float32)
            out.append(codes.astype(np.float32) * np.repeat(steps, 8, axis=1))
    return np.concatenate(out)


def test_reader_adapters_and_exports_return_numpy_dequantized_values(runs, tmp_path):
    import torch

    from actex.reader.exports.legacy import export_legacy
    from actex.reader.exports.saelens import export_saelens
    from actex.reader.jax_data import device_batches
    from actex.reader.torch_data import ActivationDataset

    url, hook = runs["int8"], "blocks.1.hook_resid_post"
    expected = numpy_dequantized(url, hook)
    run = open_run(url)
    np.testing.assert_array_equal(in_order(url, hook), expected)
    bf16 = in_order(url, hook, dtype="bfloat16")
    assert bf16.dtype.name == "bfloat16"
    np.testing.assert_array_equal(bf16, expected.astype(bf16.dtype))
    shuffled = list(run.iter_batches(hook, 64, seed=1))
    assert shuffled[0].activations.dtype == np.float32
    assert sorted(map(tuple, np.concatenate([b.activations for b in shuffled]).tolist())) == sorted(map(tuple, expected.tolist()))
    torch_rows = torch.cat([b["activations"] for b in ActivationDataset(url, hook, 100, shuffle=False)])
    np.testing.assert_array_equal(torch_rows.numpy(), expected)
    jax_rows = np.concatenate([np.asarray(b["activations"]) for b in device_batches(run.iter_batches(hook, 100, shuffle=False))])
    np.testing.assert_array_equal(jax_rows, expected)

    export_legacy(run, tmp_path / "legacy", hooks=[hook], decode=lambda ids: "")
    with gzip.open(tmp_path / "legacy" / "shard_0000.pkl.gz") as f:
        legacy = np.concatenate([e["activation"] for e in next(iter(pickle.load(f).values()))])
    np.testing.assert_array_equal(legacy, expected[: len(legacy)])
    from datasets import load_from_disk

    result = export_saelens(run, tmp_path / "sae", hook, context_size=8, seed=None)
    assert result.dtype == "float32"
    rows = load_from_disk(str(tmp_path / "sae")).with_format("numpy")[:][hook].reshape(-1, HIDDEN)
    assert set(map(tuple, rows.tolist())) <= set(map(tuple, expected.tolist())) and len(rows) == result.rows * 8


def test_float16_overflow_is_counted_warned_inspected_and_failed_by_verify(tmp_path, jax_cache, caplog):  # noqa: F811
    from actex.reader.verify import verify

    model = tmp_path / "model"
    random_model(model, 32, 48)

    def big(t):
        t["model.embed_tokens.weight"][:, 3] = 7e4  # beyond float16's 65504

    plant(model, big)
    dataset = tmp_path / "text.jsonl"
    dataset.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXT_ROWS[:4]))
    hook = "blocks.0.hook_resid_pre"
    with caplog.at_level(logging.WARNING):
        url = extract_run(model, dataset, tmp_path / "out", "float16", hooks=[hook])
    run = open_run(url)
    stats = run.stats(hook)
    assert stats.nonfinite == stats.count  # one channel of every token
    records = run.commits
    assert {c: r.overflow for c, r in records.items()} == {c: {hook: r.tokens} for c, r in records.items()}
    warned = [r.getMessage() for r in caplog.records if "overflow" in r.getMessage()]
    assert warned and all(hook in line and "float16" in line for line in warned)
    assert f"{records[0].tokens} value(s)" in warned[0] and "chunk 0" in warned[0]
    shown = json.loads(CliRunner().invoke(app, ["inspect", url, "--json"]).output)
    assert shown["overflow"] == {hook: stats.count}
    report = verify(run, 2, model=str(model))
    assert not report.ok and report.overflow == (f"{hook}: {stats.count} value(s) not finite as stored float16 "
                                                 f"in {len(records)} chunk(s), first chunk 0",)


def test_stats_without_the_new_fields_read_as_before():
    from actex.store.stats import decode_stats, encode_stats

    old = HookStats.from_array(np.ones((3, 2), np.float32))
    data = bytearray(encode_stats({"h": old}))
    tensors = safetensors.numpy.load(bytes(data))
    del tensors["h/nonfinite"]
    back = decode_stats(safetensors.numpy.save(tensors))["h"]
    assert back.nonfinite == 0 and back.quant_error_max is None and back.count == 3
