"""Every family, every hook kind of every layer, against transformers' own model.

Per family (tests/family_fixtures.py): a packed row of two documents longer than the
sliding window and the original context length, plus an unpacked row; each document is
recomputed by transformers alone (eager attention, float32) and every token of every hook
compared by relative L2 (<= 1e-5). Greedy generation equals `transformers.generate`,
logits (Gemma 2's final soft-cap included) equal transformers', and the config fields a
family needs are refused when actex could not honour them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from actex.model import ModelConfig, load_model, make_capture_fn, parse_hooks
from actex.model.capture import attention_for
from actex.model.decoder import embed, lm_logits, run_layers
from actex.model.generate import make_generate_fn
from actex.model.hooks import BLOCK_HOOKS, hook_width
from actex.reference import reference_activations
from family_fixtures import FAMILIES, WINDOW, save_family

TOL = 1e-5  # worst per-token relative L2 error, float32
DOCS = (40, 24)  # two documents packed into one 64-token row: both longer than the window


def every_hook(config: ModelConfig) -> list[str]:
    kinds = []
    for kind in BLOCK_HOOKS:
        try:
            hook_width(config, f"blocks.0.{kind}")
            kinds.append(kind)
        except ValueError:  # not this family's (dense vs routed MLP)
            pass
    return ["hook_embed", "ln_final.hook_normalized", "ln_final.hook_out"] + [
        f"blocks.{l}.{k}" for l in range(config.n_layers) for k in kinds]


def per_token_error(actual: np.ndarray, expected: np.ndarray) -> float:
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    return float((np.linalg.norm(a - e, axis=-1) / np.maximum(np.linalg.norm(e, axis=-1), 1e-30)).max())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = save_family(path, request.param, seed=1)
    return request.param, path, model


def test_every_hook_matches_transformers_on_packed_rows(family):
    name, path, model = family
    loaded = load_model(path, dtype="float32")
    config = loaded.config
    hooks = parse_hooks(every_hook(config), config.n_layers)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in DOCS]
    solo = rng.integers(0, config.vocab_size, sum(DOCS)).astype(np.int32)
    token_ids = np.stack([np.concatenate(docs), solo])
    positions = np.stack([np.concatenate([np.arange(n) for n in DOCS]), np.arange(sum(DOCS))]).astype(np.int32)
    segment_ids = np.stack([np.repeat([1, 2], DOCS), np.ones(sum(DOCS))]).astype(np.int32)
    out = make_capture_fn(config, hooks, "float32")(loaded.params, token_ids, positions, segment_ids)

    references = [(0, 0, DOCS[0]), (0, DOCS[0], sum(DOCS)), (1, 0, sum(DOCS))]  # (row, start, stop)
    failures = []
    for row, start, stop in references:
        ref = reference_activations(model.model, list(hooks), token_ids[row, start:stop], positions[row, start:stop])
        for hook in hooks:
            error = per_token_error(np.asarray(out[hook][row, start:stop]), ref[hook])
            if not error <= TOL:
                failures.append(f"{hook} (row {row}, tokens {start}-{stop}): {error:.2e}")
    assert not failures, f"{name}: " + "; ".join(failures[:8])


def test_logits_and_greedy_generation_match_transformers(family):
    name, path, model = family
    loaded = load_model(path, dtype="float32", lm_head=True)
    config = loaded.config
    prompts = [list(range(3, 3 + 21)), [7, 1, 9, 4, 2]]  # one prompt longer than the window
    # Logits of a whole prompt's last position (Gemma 2's final soft-cap included).
    ids = np.asarray([prompts[0]], np.int32)
    attend = attention_for(config)
    x, _ = run_layers(loaded.params["layers"], config, embed(loaded.params, config, ids),
                      np.arange(ids.shape[1], dtype=np.int32)[None], config.n_layers,
                      lambda i, q, k, v, w, s: attend(q, k, v, np.ones_like(ids), window=w),
                      lambda i, values, s: s, None)
    ours = np.asarray(lm_logits(loaded.params, config, x[:, -1]))
    with torch.no_grad():
        theirs = model(torch.tensor(ids, dtype=torch.long)).logits[:, -1].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())

    n_new = 12
    generate = make_generate_fn(config, n_new)
    length = max(map(len, prompts))
    token_ids = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros_like(token_ids)
    for r, prompt in enumerate(prompts):
        token_ids[r, length - len(prompt):], mask[r, length - len(prompt):] = prompt, 1
    tokens, n_generated, _ = generate(loaded.params, token_ids, mask, np.asarray([-1], np.int32))
    for r, prompt in enumerate(prompts):
        expected = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=n_new, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert np.asarray(tokens)[r, : int(n_generated[r])].tolist() == expected, f"{name} row {r}"


def _hf_config(name: str, tmp_path, **overrides) -> dict:
    save_family(tmp_path, name, **overrides)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("name, edit, message", [
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("qwen3_moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ("llama3", {"mlp_bias": True}, "mlp_bias"),
    ("llama3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
    ("mistral", {"attn_logit_softcapping": 30.0}, "attn_logit_softcapping"),
    ("gemma2", {"hidden_activation": "relu"}, "hidden_activation"),
])
def test_fields_actex_cannot_honour_are_refused_in_one_line(tmp_path, name, edit, message):
    hf = _hf_config(name, tmp_path) | edit
    with pytest.raises(ValueError, match=message) as error:
        ModelConfig.from_hf_config(hf)
    assert "\n" not in str(error.value)


def test_family_fields_are_read_not_assumed(tmp_path):
    gemma2 = ModelConfig.from_hf_config(_hf_config("gemma2", tmp_path / "g2"))
    assert (gemma2.attn_softcap, gemma2.final_softcap) == (2.0, 3.0)
    assert gemma2.attn_scale == pytest.approx(32 ** -0.5) and gemma2.gemma and gemma2.activation == "gelu_tanh"
    assert gemma2.layer_types == ("sliding_attention", "full_attention") and gemma2.windows() == (0, WINDOW)
    gemma3 = ModelConfig.from_hf_config(_hf_config("gemma3", tmp_path / "g3"))
    assert len(gemma3.rope_tables()) == 2 and gemma3.qk_norm and gemma3.attn_softcap is None
    moe = ModelConfig.from_hf_config(_hf_config("qwen3_moe", tmp_path / "moe"))
    assert (moe.moe.n_experts, moe.moe.top_k, moe.moe.norm_topk_prob) == (8, 2, True)
    mistral = ModelConfig.from_hf_config(_hf_config("mistral", tmp_path / "m"))
    assert set(mistral.layer_windows()) == {WINDOW}
    qwen = ModelConfig.from_hf_config(_hf_config("qwen2_sliding", tmp_path / "q"))
    assert qwen.layer_windows().tolist() == [0, WINDOW]  # max_window_layers=1: layer 1 slides


def test_moe_layers_refuse_dense_mlp_hooks_and_vice_versa(tmp_path):
    moe = ModelConfig.from_hf_config(_hf_config("qwen3_moe", tmp_path / "moe"))
    with pytest.raises(ValueError, match="route tokens to experts"):
        make_capture_fn(moe, ["blocks.0.mlp.hook_post"])
    dense = ModelConfig.from_hf_config(_hf_config("llama3", tmp_path / "llama"))
    with pytest.raises(ValueError, match="router logits"):
        make_capture_fn(dense, ["blocks.0.mlp.hook_router_logits"])


def test_transformer_lens_3_names_are_stored_under_the_canonical_ones():
    hooks = parse_hooks(["blocks.1.hook_out", "blocks.0.attn.o.hook_in", "blocks.0.ln2.hook_out",
                         "blocks.0.hook_in", "embed.hook_out", "blocks.1.hook_resid_post"], 2)
    assert hooks == ("hook_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_in",
                     "blocks.1.hook_resid_post")


MESH_FAMILIES = ("gemma2", "gemma3", "mistral", "qwen3_moe", "mixtral")


def test_meshes_equal_one_device_for_every_new_block_kind(tmp_path):
    """data=2,model=2 and data=1,model=4 (simulated devices, in a subprocess) against one
    device: heads, MLP and expert widths split over "model", windows and post-norms intact."""
    for name in MESH_FAMILIES:
        save_family(tmp_path / "families" / name, name, seed=2)
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(tests / "mesh_runs.py"), str(tmp_path), "families"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])["families"]
    assert sorted(report) == sorted(MESH_FAMILIES)
    # Not bit-identical: a split model axis sums partial products over devices in another order.
    worst = {f"{name}@{mesh}": error for name, by_mesh in report.items() for mesh, error in by_mesh.items()}
    assert all(error <= 4e-6 for error in worst.values()), worst


def test_a_40k_token_prompt_through_yarn_qwen2_matches_transformers(tmp_path):
    """Past the original context (32 here) by 1,250x: YaRN's table and attention factor at
    every position, the blockwise kernel over 80 key blocks. transformers runs sdpa here
    (eager's [40k, 40k] scores would need 13 GB); it equals eager to float32 rounding."""
    model = save_family(tmp_path, "qwen2_yarn", seed=3, num_hidden_layers=1, hidden_size=32,
                        num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
    model.set_attn_implementation("sdpa")
    loaded = load_model(tmp_path, dtype="float32")
    length, edge = 40_000, 512
    token_ids = np.random.default_rng(3).integers(0, loaded.config.vocab_size, (1, length)).astype(np.int32)
    positions = np.arange(length, dtype=np.int32)[None]
    hooks = ["blocks.0.attn.hook_z", "blocks.0.hook_resid_post"]
    ours = make_capture_fn(loaded.config, hooks, "float32")(loaded.params, token_ids, positions, np.ones_like(token_ids))
    theirs = reference_activations(model.model, hooks, token_ids[0], positions[0])
    for hook in hooks:
        for span in (slice(0, edge), slice(length - edge, length)):
            error = per_token_error(np.asarray(ours[hook][0, span]), theirs[hook][span])
            assert error <= TOL, f"{hook} positions {span.start}-{span.stop}: {error:.2e}"


@pytest.mark.parametrize("name", ["gemma2", "qwen3_moe"])
def test_extract_then_verify_against_transformers(tmp_path, name):
    """The whole path for a new family: config and weights through the engine into the
    store, then `verify` recomputes stored samples with transformers' own model."""
    from actex.data import build_tokenizer
    from actex.engine.worker import extract
    from actex.engine.prepare import prepare_run
    from actex.engine.work import StaticChunks
    from actex.reader.run import open_run
    from actex.reader.verify import verify

    model = tmp_path / "model"
    tokenizer = build_tokenizer(model, vocab_size=300)
    save_family(model, name, seed=4, vocab_size=len(tokenizer))
    rows = [{"text": f"row {i} " + "the quick brown fox jumps over " * (i + 2)} for i in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mlp_kind = "mlp.hook_router_logits" if name == "qwen3_moe" else "mlp.hook_post"
    hooks = ["blocks.0.attn.hook_z", "blocks.0.mlp.hook_in", f"blocks.1.{mlp_kind}", "blocks.1.hook_mlp_out",
             "blocks.1.hook_out"]  # the last: TransformerLens 3's name of hook_resid_post
    fields = {"model": str(model), "hooks": hooks, "dtype": "float32", "output": str(tmp_path / "out"),
              "chunk_size": 2, "data": {"dataset": str(tmp_path / "data.jsonl"), "format": "text", "max_seq_len": 64}}
    run = prepare_run(fields)
    extract(run, StaticChunks(run.plan.num_chunks), worker="w0")
    stored = open_run(run.config.run_url)
    assert "blocks.1.hook_resid_post" in stored.hooks
    # Read back by the name it was asked for, too.
    alias, canonical = (next(stored.iter_batches(name, 16, shuffle=False)).activations
                        for name in ("blocks.1.hook_out", "blocks.1.hook_resid_post"))
    np.testing.assert_array_equal(alias, canonical)
    report = verify(stored, 4)
    assert report.ok and report.tokens > 0, report
    assert {check.hook for check in report.checks} == set(stored.hooks)


def test_gemma3_multimodal_checkpoints_run_their_language_model(tmp_path):
    """Gemma 3 4B-27B ship as Gemma3ForConditionalGeneration (model_type gemma3, the text
    model's config under text_config, its tensors under language_model.): actex runs the
    language model and ignores the vision tower; verify's reference finds the same model."""
    import transformers

    from actex.reference import load_reference
    from family_fixtures import family_config

    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=family_config("gemma3").to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # Gemma's (1 + w) gains, away from the identity
                param.copy_(0.2 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype="float32")
    assert loaded.config.model_type == "gemma3_text" and loaded.config.windows() == (0, WINDOW)
    hooks = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_post", "ln_final.hook_out"]
    ids = np.arange(3, 43, dtype=np.int32)[None]
    positions = np.arange(40, dtype=np.int32)[None]
    ours = make_capture_fn(loaded.config, hooks, "float32")(loaded.params, ids, positions, np.ones_like(ids))
    theirs = reference_activations(load_reference(str(tmp_path)), hooks, ids[0], positions[0])
    for hook in hooks:
        assert per_token_error(np.asarray(ours[hook][0]), theirs[hook]) <= TOL, hook
