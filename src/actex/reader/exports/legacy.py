"""Export a run in the legacy pickle layout, for downstream code that still reads it.

    <out>/shard_0000.pkl.gz   gzip'd pickle of {layer: [{sample_idx, activation, shape, text_preview}]}
    <out>/metadata.json       what the shards hold and where they came from

`layer` is the block index for `blocks.{l}.*` hooks (one hook kind per layer, as the
legacy worker stored one activation type) and the hook name for `hook_embed` /
`ln_final.hook_normalized`. `activation` is a numpy array [n_tokens, width].

Unpickling runs arbitrary code: these files are for trusted use only. This is the one
place in actex that writes pickle or gzip; the store never does.
"""

from __future__ import annotations

import gzip
import json
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actex.model.hooks import parse_hook
from actex.reader.run import Run

PREVIEW_CHARS = 200


@dataclass(frozen=True)
class LegacyExport:
    path: str
    shards: int
    samples: int


def layer_keys(hooks: list[str]) -> dict[str, int | str]:
    """hook -> legacy key; two hooks may not share a layer (the legacy format keeps one kind)."""
    keys: dict[str, int | str] = {}
    for hook in hooks:
        # Stored hooks were checked against the model's depth at extraction: any bound will do.
        point = parse_hook(hook, n_layers=sys.maxsize)
        key = hook if point.layer is None else point.layer
        clash = [h for h, k in keys.items() if k == key]
        if clash:
            raise ValueError(f"hooks {clash[0]} and {hook} both map to legacy layer {key}: the legacy layout keeps "
                             f"one hook kind per layer; choose hooks with --hook (repeatable), e.g. --hook {clash[0]}")
        keys[hook] = key
    return keys


def export_legacy(run: Run, out: str | Path, *, hooks: list[str] | None = None, samples_per_shard: int = 64,
                  dtype: str = "float32", decode: Callable[[list[int]], str] | None = None) -> LegacyExport:
    """Write the legacy layout at `out`; `decode` turns token ids into the text preview."""
    hooks = hooks or list(run.hooks)
    for hook in hooks:
        run.check_hook(hook)
    keys = layer_keys(hooks)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("shard_*.pkl.gz")):
        raise FileExistsError(f"{out}: already holds legacy shards")

    shard: dict = {key: [] for key in keys.values()}
    shards = samples = 0

    def flush() -> None:
        nonlocal shard, shards
        with gzip.open(out / f"shard_{shards:04d}.pkl.gz", "wb") as f:
            pickle.dump(shard, f, protocol=pickle.HIGHEST_PROTOCOL)
        shard, shards = {key: [] for key in keys.values()}, shards + 1

    for part in run.parts():
        data = {hook: run.read_part(part, hook) for hook in hooks}
        first = data[hooks[0]]
        ids, offsets = run.read_index(part)
        for sid, lo, hi in zip(ids.tolist(), offsets[:-1].tolist(), offsets[1:].tolist()):
            preview = decode(first.token_ids[lo:hi].tolist())[:PREVIEW_CHARS] if decode else ""
            for hook, key in keys.items():
                activation = np.asarray(data[hook].activations[lo:hi], dtype=dtype)  # [n_tokens, width]
                shard[key].append({"sample_idx": sid, "activation": activation,
                                   "shape": activation.shape, "text_preview": preview})
            samples += 1
            if samples % samples_per_shard == 0:
                flush()
    if samples % samples_per_shard:
        flush()
    metadata = {
        "format": "actex legacy-pickle export (trusted use only)",
        "source": run.url,
        "model": run.config.get("model"),
        "hooks": {hook: key for hook, key in keys.items()},
        "dtype": dtype,
        "num_samples": samples,
        "num_shards": shards,
        "samples_per_shard": samples_per_shard,
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return LegacyExport(str(out), shards, samples)
