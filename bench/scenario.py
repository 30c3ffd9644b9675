"""Issue 12's CPU scenario, side by side in one run: `actex extract` end to end against a
plain transformers script, float32 and bfloat16.

    .venv/bin/python bench/scenario.py [--dtypes float32,bfloat16] [--reps 1] [--copies 1]

Both sides get the same random checkpoint of Qwen2.5-0.5B's shape (float32; the bfloat16
runs cast it on load), the same 16 text samples of about 400 tokens (6,383 tokens in all,
with the ARC-trained BPE tokenizer stored next to the weights), and write every one of the
24 `blocks.{l}.hook_resid_post` of every token in the run's dtype:

    actex         `actex extract ... --chunk-size 16` in a fresh process (load, tokenize,
                  pack, compile, forward, write + commit parts), compile cache empty.
    transformers  a fresh process: Qwen2ForCausalLM.from_pretrained (sdpa), then for each
                  sample alone: forward with output_hidden_states under inference_mode and
                  safetensors.torch.save_file of its 24 residuals, synchronously.

tokens/s = 6,383 / the process's wall time, start to exit, for both. Runs alternate
(actex, transformers, actex, ...) so that a machine shared with other work loads both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from actex.data import build_tokenizer
from actex.model.random_checkpoint import tiny_hf_config, write_random_checkpoint

QWEN25_05B = tiny_hf_config(
    vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
)
MODEL_DIR = Path(tempfile.gettempdir()) / "actex-bench-scenario-0.5b"
N_SAMPLES, TOKENS = 16, 6383
HOOKS = ",".join(f"blocks.{layer}.hook_resid_post" for layer in range(24))

TRANSFORMERS_SCRIPT = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2ForCausalLM
    model_dir, dataset, out, dtype = sys.argv[1:5]
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    Path(out).mkdir(parents=True, exist_ok=True)
    tokens = 0
    with torch.inference_mode():
        for i, line in enumerate(open(dataset)):
            ids = torch.tensor([tokenizer(json.loads(line)["text"])["input_ids"]])
            hidden = model(ids, output_hidden_states=True).hidden_states
            # hidden_states[l + 1] is block l's output (the last one after the final norm).
            save_file({f"blocks.{l}.hook_resid_post": h[0].contiguous() for l, h in enumerate(hidden[1:])},
                      f"{out}/sample-{i}.safetensors")
            tokens += ids.shape[1]
    print(json.dumps({"tokens": tokens}))
''')


def prepare(work: Path, copies: int = 1) -> tuple[Path, Path, int]:
    """Checkpoint + tokenizer (cached across runs) and the 16-sample dataset, `copies` times
    over (more chunks of the same samples: start-up and a lone chunk's tail amortised)."""
    if not (MODEL_DIR / "model.safetensors").exists():
        build_tokenizer(MODEL_DIR, vocab_size=384)
        write_random_checkpoint(MODEL_DIR, QWEN25_05B, seed=0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    rng = np.random.default_rng(0)
    lengths = rng.integers(300, 500, N_SAMPLES)
    lengths = np.floor(lengths * TOKENS / lengths.sum()).astype(int)
    lengths[0] += TOKENS - lengths.sum()
    rows, total = [], 0
    for n in lengths:
        # ARC-like grid text; cut to n tokens by decoding the first n ids.
        text = " ".join(" ".join(map(str, rng.integers(0, 10, 12))) for _ in range(n))
        ids = tokenizer(text)["input_ids"][:n]
        text = tokenizer.decode(ids)
        total += len(tokenizer(text)["input_ids"])
        rows.append(json.dumps({"text": text}))
    dataset = work / "scenario.jsonl"
    dataset.write_text("\n".join(rows * copies) + "\n")
    return MODEL_DIR, dataset, total * copies


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_process(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and its children, its output)."""
    start, cpu = time.perf_counter(), _children_cpu_s()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{cmd[:3]} failed ({result.returncode}): {result.stderr[-2000:]}")
    return seconds, _children_cpu_s() - cpu, result.stdout + result.stderr


def run_actex(model_dir: Path, dataset: Path, work: Path, dtype: str, tag: str, extra: list[str]) -> tuple[float, float, str]:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(work / f"jax-cache-{tag}"))
    cmd = [str(Path(sys.executable).parent / "actex"), "extract", "--model", str(model_dir), "--dataset", str(dataset),
           "--format", "text", "--hooks", HOOKS, "--dtype", dtype, "--compute-dtype", dtype,
           "--chunk-size", str(N_SAMPLES), "--output", str(work / "runs"), "--run-name", tag, "--no-progress", *extra]
    return timed_process(cmd, env)


def run_transformers(model_dir: Path, dataset: Path, work: Path, dtype: str, tag: str) -> tuple[float, float, str]:
    cmd = [sys.executable, "-c", TRANSFORMERS_SCRIPT, str(model_dir), str(dataset), str(work / tag), dtype]
    return timed_process(cmd, dict(os.environ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--copies", type=int, default=1, help="the 16 samples this many times over (16 per chunk)")
    parser.add_argument("--mesh", default="auto", help="actex --mesh (default auto: one CPU device)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="actex-scenario-") as tmp:
        work = Path(tmp)
        model_dir, dataset, tokens = prepare(work, args.copies)
        load = os.getloadavg()[0]
        print(f"{N_SAMPLES * args.copies} samples, {tokens} tokens; Qwen2.5-0.5B shape, 24 hook_resid_post; "
              f"{os.cpu_count()} CPUs, load average {load:.1f} at start")
        for dtype in args.dtypes.split(","):
            ours, theirs = [], []
            for rep in range(args.reps):
                seconds, cpu, log = run_actex(model_dir, dataset, work, dtype, f"{dtype}-{rep}", ["--mesh", args.mesh])
                ours.append(seconds)
                their_s, their_cpu, _ = run_transformers(model_dir, dataset, work, dtype, f"hf-{dtype}-{rep}")
                theirs.append(their_s)
                # CPU seconds: on a machine shared with other work, the figure load distorts least.
                print(f"  {dtype} rep {rep}: actex {tokens / ours[-1]:.0f} tokens/s ({ours[-1]:.1f} s wall, "
                      f"{cpu:.1f} CPU s), transformers {tokens / theirs[-1]:.0f} tokens/s ({theirs[-1]:.1f} s wall, "
                      f"{their_cpu:.1f} CPU s); actex log: {log.strip().splitlines()[-1][:160]}")
            a, t = tokens / min(ours), tokens / min(theirs)
            print(f"{dtype}: actex extract {a:.0f} tokens/s, transformers script {t:.0f} tokens/s, "
                  f"ratio {a / t:.2f}x (best of {args.reps}; load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
