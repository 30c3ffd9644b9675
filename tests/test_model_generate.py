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


# ----------------------------------------------------------- continuous batching, sampling

from actex.model.generate import Sampling, make_continuous_fn, sample_keys  # noqa: E402


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """A 2-layer random Qwen2 whose greedy continuations vary, and 9 left-padded prompts."""
    path = tmp_path_factory.mktemp("varied")
    save_random_qwen2(path, seed=5, scale=VARIED, num_hidden_layers=2)
    loaded = load_model(path, dtype="float32", lm_head=True)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 256, n).tolist() for n in (9, 4, 12, 6, 3, 11, 8, 5, 10)]
    return loaded, left_pad(prompts)


@pytest.fixture(scope="module")
def greedy24(varied):
    """The greedy static decoder of 24 tokens and its free-running continuations (three
    stop slots of -1: the rigged stops below fit the same compile), compiled once here."""
    loaded, (ids, mask) = varied
    generate = make_generate_fn(loaded.config, 24)
    return generate, continuations(generate(loaded.params, ids, mask, np.int32([-1, -1, -1])), len(ids))


def continuations(result, n_rows):
    tokens, n_generated = np.asarray(result[0]), np.asarray(result[1])
    return [tokens[r, : n_generated[r]].tolist() for r in range(n_rows)]


def test_continuous_batching_gives_the_static_tokens_with_busy_slots(varied, greedy24):
    """Stops rigged at chosen steps (a token each row emits at a different point of its
    free run) make answers of very different lengths; every slot count gives the static
    path's tokens per prompt, and the measured occupancy beats the static batch's."""
    loaded, (ids, mask) = varied
    n, rows = 24, len(ids)
    generate, free = greedy24
    stops = np.int32(sorted({free[0][2], free[3][9], free[6][15]}))
    static = generate(loaded.params, ids, mask, stops)
    expected = continuations(static, rows)
    lengths = [len(t) for t in expected]
    assert min(lengths) <= 4 and max(lengths) == n, lengths  # the rig gives short and long answers
    keys = np.zeros((rows, 2), np.uint32)
    results = {}
    for slots in (1, 3, 16):  # one at a time, a few, more slots than prompts
        results[slots] = make_continuous_fn(loaded.config, slots, n)(loaded.params, ids, mask, stops, keys,
                                                                     np.int32(rows))
        assert continuations(results[slots], rows) == expected, f"{slots} slots"
        steps, busy, prefills, waiting, drained = (int(v) for v in results[slots][3])
        assert busy == sum(lengths) and prefills == rows  # every wanted token, each prompt once
        assert busy + waiting + drained == steps * slots  # every idle slot-step has a cause
    # 3 slots: the static path (3 rows at a time) would run each trio to its longest answer.
    static_steps = sum(max(lengths[i:i + 3]) for i in range(0, rows, 3))
    occupancy = int(results[3][3].busy) / (3 * int(results[3][3].steps))
    # (The last long answer runs alone at the end: a queue of 9 cannot be fully busy.)
    assert occupancy > sum(lengths) / (3 * static_steps) + 0.1 and occupancy >= 0.8, occupancy


def test_sampled_tokens_depend_only_on_seed_and_sample_id(varied, greedy24):
    loaded, (ids, mask) = varied
    rows, n = len(ids), 12
    hot = Sampling(temperature=1.5, top_k=50, top_p=0.95)
    keys = sample_keys(7, np.arange(100, 100 + rows))
    sampled = make_generate_fn(loaded.config, n, hot)
    static = continuations(sampled(loaded.params, ids, mask, np.int32([-1]), keys), rows)
    for slots in (2, 5):  # another batch composition, as another mesh or a resumed chunk has
        result = make_continuous_fn(loaded.config, slots, n, hot)(loaded.params, ids, mask, np.int32([-1]), keys,
                                                                 np.int32(rows))
        assert continuations(result, rows) == static
    # One prompt alone, with its own key, draws what it drew in the batch.
    alone = sampled(loaded.params, ids[2:3], mask[2:3], np.int32([-1]), keys[2:3])
    assert continuations(alone, 1)[0] == static[2]
    other = continuations(sampled(loaded.params, ids, mask, np.int32([-1]), sample_keys(8, np.arange(100, 100 + rows))),
                          rows)
    assert other != static
    greedy = [tokens[:n] for tokens in greedy24[1]]  # greedy: the first n of 24 free-running tokens
    cold = continuations(make_generate_fn(loaded.config, n, Sampling(temperature=0.0))(
        loaded.params, ids, mask, np.int32([-1]), keys), rows)
    assert cold == greedy and static != greedy


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.3, 5, 0.8)])
def test_first_sampled_token_follows_the_warped_softmax(tmp_path, temperature, top_k, top_p):
    """4,000 draws of the first token of one prompt (a vocabulary of 12) against
    softmax(logits / T) cut to top-k / top-p: a chi-square test, and the same test rejects
    draws made at another temperature (so it can fail)."""
    from scipy.stats import chisquare

    from actex.model.generate import choose_tokens, prefill

    save_random_qwen2(tmp_path, seed=6, scale=0.4, num_hidden_layers=1, vocab_size=12)
    loaded = load_model(tmp_path, dtype="float32", lm_head=True)
    prompt = np.int32([[3, 1, 4, 1, 5]])
    draws = 4000
    ids, mask = np.repeat(prompt, draws, axis=0), np.ones((draws, 5), np.int32)
    sampling = Sampling(temperature, top_k, top_p)
    keys = sample_keys(11, np.arange(draws))
    tokens = np.asarray(make_generate_fn(loaded.config, 1, sampling)(loaded.params, ids, mask, np.int32([-1]), keys)[0])
    raw = np.asarray(prefill(loaded.params, loaded.config, prompt, np.ones_like(prompt), 6)[0], np.float64)[0]
    probs = warped_softmax(raw, temperature, top_k, top_p)
    support = probs > 0
    counts = np.bincount(tokens[:, 0], minlength=12)
    assert counts[~support].sum() == 0  # nothing outside top-k / top-p
    assert chisquare(counts[support], draws * probs[support]).pvalue > 1e-3
    # Draws made at twice the temperature fail the same test.
    hotter = Sampling(2 * temperature, top_k, top_p)
    wrong = np.asarray(choose_tokens(np.repeat(raw[None].astype(np.float32), draws, 0), keys,
                                     np.zeros(draws, np.int32), hotter))
    wrong_counts = np.bincount(wrong, minlength=12)
    assert wrong_counts[~support].sum() > 0 or chisquare(wrong_counts[support], draws * probs[support]).pvalue < 1e-6


def warped_softmax(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' order: temperature, then top-k, then top-p; float64 probabilities."""
    logits = logits / temperature
    if top_k:
        logits = np.where(logits < np.sort(logits)[-top_k], -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p
        probs[order[~keep]] = 0.0
        probs /= probs.sum()
    return probs
