"""Greedy decoding with the KV cache vs transformers' generate(do_sample=False)."""

import numpy as np
import pytest
import torch

from actex.model import load_model
from actex.model.generate import kv_cache_bytes, make_generate_fn
from model_fixtures import save_random_qwen2

N_NEW = 10
PROMPT_LENGTHS = (5, 9, 2)
VARIED = 0.25  # weight scale at which greedy continuations vary (a repeated token hides position bugs)


def left_pad(prompts):
    length = max(map(len, prompts))
    ids, mask = np.zeros((len(prompts), length), np.int32), np.zeros((len(prompts), length), np.int32)
    for r, prompt in enumerate(prompts):
        ids[r, length - len(prompt):], mask[r, length - len(prompt):] = prompt, 1
    return ids, mask


def hf_greedy(model, prompt, stop_ids):
    """transformers' greedy continuation of one prompt, cut after its first stop token."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=N_NEW, do_sample=False, eos_token_id=stop_ids or None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def ours(generate, params, prompts, stop_ids):
    tokens, n_generated, stopped = generate(params, *left_pad(prompts), np.asarray(stop_ids or [-1], np.int32))
    return [t[:n].tolist() for t, n in zip(np.asarray(tokens), np.asarray(n_generated))], np.asarray(stopped)


def pick_stop(free: list[list[int]]) -> int:
    """A token the first row's free continuation emits after step 0 and some row never
    emits: rows then stop at different steps, or run to the budget."""
    return next(t for i, t in enumerate(free[0]) if i and t not in free[0][:i] and any(t not in f for f in free))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4),
        dict(tie_word_embeddings=False, num_attention_heads=8, num_key_value_heads=1, rope_theta=1e6),
    ],
    ids=["tied-mha", "untied-mqa8"],
)
def test_greedy_tokens_match_transformers_batched_with_stops(tmp_path, overrides):
    model = save_random_qwen2(tmp_path, seed=3, scale=VARIED, num_hidden_layers=2, **overrides)
    loaded = load_model(tmp_path, dtype="float32", lm_head=True)
    assert ("lm_head" in loaded.params) != overrides["tie_word_embeddings"]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in PROMPT_LENGTHS]
    free = [hf_greedy(model, p, []) for p in prompts]
    stop = pick_stop(free)
    expected = [hf_greedy(model, p, [stop]) for p in prompts]
    got, stopped = ours(make_generate_fn(loaded.config, N_NEW), loaded.params, prompts, [stop])
    assert got == expected
    assert got[0][-1] == stop and len(got[0]) == free[0].index(stop) + 1 > 1
    for row, tokens in enumerate(got):
        assert stopped[row] == (stop in tokens)
        assert stopped[row] or len(tokens) == N_NEW
    assert not stopped.all(), "some row must run to the token budget"


def test_batched_equals_one_at_a_time_and_transformers_gqa(tmp_path):
    """Rows padded in a batch give what they give alone (unpadded), and both what
    transformers gives (untied, 2 query heads per kv head), each run to the budget."""
    model = save_random_qwen2(tmp_path, seed=3, scale=VARIED, num_hidden_layers=2, tie_word_embeddings=False,
                              num_attention_heads=4, num_key_value_heads=2)
    loaded = load_model(tmp_path, dtype="float32", lm_head=True)
    generate = make_generate_fn(loaded.config, N_NEW)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, n).tolist() for n in (7, 3, 3)]
    batched, stopped = ours(generate, loaded.params, prompts, [])
    assert not stopped.any() and all(len(t) == N_NEW for t in batched)
    # The two short prompts (left-padded by 4 in the batch) alone: one program for both.
    assert [ours(generate, loaded.params, [p], [])[0][0] for p in prompts[1:]] == batched[1:]
    assert batched == [hf_greedy(model, p, []) for p in prompts]


def test_kv_cache_bytes_of_the_05b_shape():
    from actex.model.config import ModelConfig

    qwen05 = ModelConfig(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
                         d_mlp=4864, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)
    # 2 (k, v) x 24 layers x 2 kv heads x 64 x 2 bytes = 12 KiB per token.
    assert kv_cache_bytes(qwen05, rows=1, length=16384) == 16384 * 12288
