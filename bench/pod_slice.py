"""Pod-slice overheads on local CPU processes (real jax.distributed, coordinator on 127.0.0.1).

    python bench/pod_slice.py commit [--processes 2] [--chunks 200]
    python bench/pod_slice.py steps WORKDIR [--rows 96] [--layouts data|model]

commit: the per-chunk cost of the distributed commit's coordination as the engine does
it: process 0 broadcasts the step and the attempt id, every process hands process 0 its
part records, process 0 waits for all of them. Milliseconds per chunk on process 0.

steps: the same run (random 4-layer Qwen2, text rows) as 1 process x 4 CPU devices and
as 2 processes x 2 devices (--layouts data); or with a model axis of 2 within one process
(1 x 2) against across two processes (2 x 1, --layouts model). Wall seconds and tokens/s
of each (process 0's final line).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

COMMIT_SCRIPT = """
import json, sys, time
from actex.config import WorkerOptions
from actex.engine.distributed import initialize
me, n, coordinator, chunks = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = initialize(WorkerOptions(coordinator=coordinator, num_processes=n, process_id=me, heartbeat_timeout_s=30))
parts = json.dumps([[{"path": f"chunks/000001/attempt/part-0000{me}.safetensors", "bytes": 123456789, "sha256": "0" * 64}, 4096]])
s.barrier("start")
started = time.perf_counter()
for chunk in range(chunks):
    s.broadcast(f"step/{chunk}", lambda: {"chunk": chunk})
    s.broadcast(f"attempt/{chunk}", lambda: "20261130T000000Z-w0-0123abcd")
    s.exchange(f"commit/{chunk}", parts, to=0)
elapsed = time.perf_counter() - started
s.barrier("end")
if me == 0:
    print(json.dumps({"processes": n, "chunks": chunks, "ms_per_chunk": round(1000 * elapsed / chunks, 3)}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with(devices: int) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def commit(processes: int, chunks: int) -> dict:
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", COMMIT_SCRIPT, str(i), str(processes), coordinator, str(chunks)],
                              env=env_with(1), stdout=subprocess.PIPE, text=True) for i in range(processes)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return json.loads(outs[0].strip().splitlines()[-1])


LAYOUTS = {  # name -> (processes, devices per process, --mesh)
    "data": {"1x4": (1, 4, "auto"), "2x2": (2, 2, "auto")},
    "model": {"1x2 model=2": (1, 2, "model=2"), "2x1 model=2": (2, 1, "model=2")},
}


def steps(work: Path, rows: int, layouts: str = "data") -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from actex.data import build_tokenizer
    from actex.model.random_checkpoint import tiny_hf_config, write_random_checkpoint

    model = work / "model"
    if not (model / "config.json").exists():
        tokenizer = build_tokenizer(model, vocab_size=384)
        write_random_checkpoint(model, tiny_hf_config(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4,
                                                      num_attention_heads=8, num_key_value_heads=2, intermediate_size=768), seed=0)
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"word{(i * 31 + j) % 97}" for j in range(40 + i % 200))}) + "\n"
                            for i in range(rows)))
    actex = str(Path(sys.executable).parent / "actex")
    base = ["extract", "--model", str(model), "--dataset", str(data), "--format", "text", "--layers", "0-3",
            "--max-seq-len", "512", "--batch-tokens", "4096", "--chunk-size", "16", "--dtype", "float32"]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(work / "jax-cache")}
    report = {}
    for name, (processes, devices, mesh) in LAYOUTS[layouts].items():
        for attempt in ("warm-up", "timed"):  # the first run fills the compilation cache
            output = work / f"out-{name.replace(' ', '-')}-{attempt}"
            shutil.rmtree(output, ignore_errors=True)  # a run left by an earlier call would only resume
            coordinator = f"127.0.0.1:{free_port()}"
            started = time.perf_counter()
            procs = []
            for i in range(processes):
                extra = [] if processes == 1 else ["--coordinator", coordinator, "--num-processes", str(processes), "--process-id", str(i)]
                procs.append(subprocess.Popen([actex, *base, "--output", str(output), "--run-name", "r", "--mesh", mesh,
                                               *extra],
                                              env={**env, **env_with(devices)}, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True))
            outs = [p.communicate(timeout=900)[0] for p in procs]
            wall = time.perf_counter() - started
            if any(p.returncode for p in procs):
                raise SystemExit(f"{name}: failed\n" + "\n".join(outs))
            rate = re.search(r"([\d,]+) tokens/s", outs[0])
            report[name] = {"wall_s": round(wall, 1), "tokens_per_s": int(rate.group(1).replace(",", "")) if rate else None}
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["commit", "steps"])
    parser.add_argument("work", nargs="?", type=Path)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--layouts", choices=sorted(LAYOUTS), default="data")
    args = parser.parse_args()
    if args.what == "commit":
        print(json.dumps(commit(args.processes, args.chunks)))
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(steps(args.work, args.rows, args.layouts)))


if __name__ == "__main__":
    main()
