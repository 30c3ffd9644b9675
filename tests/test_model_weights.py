"""Checkpoint loading: single/sharded safetensors, hub cache offline, errors, fingerprint."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from actex.model import ModelConfig, load_model, load_tokenizer, write_random_checkpoint
from actex.model.random_checkpoint import tiny_hf_config
from model_fixtures import reference_hooks, save_random_qwen2
from test_model_parity import F32_TOL, assert_close, capture_all, tokens


def write_tokenizer(path):
    vocab = {f"w{i}": i for i in range(100)} | {"[UNK]": 100}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def test_sharded_checkpoint_loads_same_params(tmp_path):
    model = save_random_qwen2(tmp_path / "one", seed=5)
    model.save_pretrained(tmp_path / "many", max_shard_size="40KB")
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 2
    assert (tmp_path / "many" / "model.safetensors.index.json").exists()
    one, many = load_model(tmp_path / "one"), load_model(tmp_path / "many")
    # Every leaf, by path: same tree, same shapes and dtypes, same values (no zip that
    # stops at the shorter side).
    leaves_one = dict(jax.tree_util.tree_leaves_with_path(one.params))
    leaves_many = dict(jax.tree_util.tree_leaves_with_path(many.params))
    assert sorted(map(jax.tree_util.keystr, leaves_one)) == sorted(map(jax.tree_util.keystr, leaves_many))
    assert len(leaves_one) >= 10
    for path, leaf in leaves_one.items():
        other = leaves_many[path]
        assert (leaf.shape, leaf.dtype) == (other.shape, other.dtype), jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(other), err_msg=jax.tree_util.keystr(path))
    assert one.fingerprint != many.fingerprint  # different files, headers and index


def test_fingerprint_is_stable_and_tracks_config(tmp_path):
    write_random_checkpoint(tmp_path, seed=1)
    first = load_model(tmp_path).fingerprint
    assert load_model(tmp_path).fingerprint == first and len(first) == 64
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-5}))
    assert load_model(tmp_path).fingerprint != first


def test_numpy_random_checkpoint_is_a_valid_transformers_checkpoint(tmp_path):
    write_random_checkpoint(tmp_path, tiny_hf_config(tie_word_embeddings=False), seed=2)
    model, info = Qwen2ForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    token_ids = tokens(1, 16, vocab=512, seed=2)
    assert_close(capture_all(tmp_path, token_ids), reference_hooks(model.eval(), token_ids),
                 F32_TOL)


def test_bfloat16_random_checkpoint_and_dtype_override(tmp_path):
    write_random_checkpoint(tmp_path, tiny_hf_config(dtype="bfloat16"), seed=3)
    assert load_model(tmp_path).params["embed"].dtype == np.dtype("bfloat16")
    assert load_model(tmp_path, dtype="float32").params["embed"].dtype == np.float32
    with pytest.raises(ValueError, match="dtype 'float16' not supported"):
        load_model(tmp_path, dtype="float16")


def _edit_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
         "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
        (lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", np.zeros(3, np.float32)),
         "unexpected tensor 'model.layers.0.mlp.extra.weight'"),
        (lambda t: t.__setitem__("model.layers.1.self_attn.k_proj.weight",
                                 np.zeros((64, 64), np.float32)),
         r"tensor 'model.layers.1.self_attn.k_proj.weight' has shape \[64, 64\], "
         r"expected \[32, 64\]"),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_bad_tensor_is_a_one_line_error_naming_it(tmp_path, edit, message):
    write_random_checkpoint(tmp_path, seed=4)
    _edit_tensors(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as error:
        load_model(tmp_path)
    assert "\n" not in str(error.value)


def test_config_forms_and_refusals():
    base = tiny_hf_config()
    del base["rope_theta"]
    modern = ModelConfig.from_hf_config(
        base | {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert modern.rope_theta == 5e5 and modern.qkv_bias and modern.head_dim == 16
    yarn = ModelConfig.from_hf_config(base | {"rope_scaling": {"type": "yarn", "factor": 4.0}})
    assert yarn.rope_tables()[0].attention_scaling > 1.0  # YaRN's mscale, read from the legacy spelling
    with pytest.raises(ValueError, match="longrope"):
        ModelConfig.from_hf_config(base | {"rope_scaling": {"type": "longrope", "factor": 4.0}})
    with pytest.raises(ValueError, match="model_type 'gpt2' not supported"):
        ModelConfig.from_hf_config(base | {"model_type": "gpt2"})
    windowed = ModelConfig.from_hf_config(base | {"use_sliding_window": True, "sliding_window": 64,
                                                  "max_window_layers": 1})
    assert windowed.layer_windows().tolist() == [0, 64]


def test_tokenizer_loads_fast_from_model_dir(tmp_path):
    write_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.is_fast
    assert tokenizer("w3 w7 zz")["input_ids"] == [3, 7, 100]


_HUB_SCRIPT = """
from actex.model import load_model, load_tokenizer
loaded = load_model("acme/tiny-qwen2")
assert loaded.path.name == {commit!r}, loaded.path
assert loaded.config.n_layers == 2
assert load_tokenizer(loaded.path).is_fast
print(loaded.fingerprint)
"""


def test_hub_repo_id_resolves_from_offline_cache(tmp_path):
    # The layout huggingface_hub writes: models--org--name/{snapshots/<commit>, refs/main}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-qwen2"
    snapshot = repo / "snapshots" / commit
    write_random_checkpoint(snapshot, seed=6)
    write_tokenizer(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"),
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _HUB_SCRIPT.format(commit=commit)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    local = load_model(snapshot, revision=commit)  # same files, same revision
    assert result.stdout.strip().splitlines()[-1] == local.fingerprint


def test_tokenizer_larger_than_embedding_is_refused(tmp_path):
    # JAX clamps out-of-range gather indices: a token id >= vocab_size would silently get
    # the last embedding row. A tokenizer that can emit such ids is refused at load.
    write_tokenizer(tmp_path)  # about 100 tokens
    write_random_checkpoint(tmp_path, tiny_hf_config(vocab_size=128), seed=0)
    assert load_tokenizer(tmp_path).is_fast
    write_random_checkpoint(tmp_path, tiny_hf_config(vocab_size=64), seed=0)
    with pytest.raises(ValueError, match="tokens but the model's embedding has 64 rows"):
        load_tokenizer(tmp_path)
