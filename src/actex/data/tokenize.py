"""Token ids per sample, with the long-sample policy applied and recorded in its meta.

ARC prompts are already rendered through the chat template (special tokens included as
text), so they are encoded without extra special tokens and their markers parsed; text
documents get a BOS token when `add_bos` is set, and by default their text is plain text:
a document that contains the string "<|endoftext|>" or "<|im_end|>" is encoded as those
characters, not as the control token (`parse_special_tokens` turns parsing on). A sample longer than `max_seq_len` is truncated, split into windows
(one document, several segments whose positions each restart at 0), or skipped (kept with
no tokens so sample ids never shift).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from actex.data.config import DataConfig
from actex.data.sample import Sample

log = logging.getLogger(__name__)

# Texts per call of the Rust tokenizer, which parallelises over a batch's texts.
ENCODE_BATCH = 256


@dataclass(frozen=True)
class TokenizedSample:
    sample_id: int
    token_ids: np.ndarray  # [n_tokens] int32: every token stored for this sample
    windows: tuple[tuple[int, int], ...]  # (start, stop) into token_ids, each <= max_seq_len
    meta: dict[str, Any]  # the Sample's meta + n_tokens, n_source_tokens, truncated, windows, skipped


def apply_long_policy(ids: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, tuple[tuple[int, int], ...], dict]:
    """(kept ids, windows, meta additions) for one sample's full token ids."""
    n, limit = len(ids), cfg.max_seq_len
    info: dict[str, Any] = {"n_source_tokens": n, "truncated": False, "skipped": None}
    if n > limit and cfg.long_policy == "skip":
        ids = ids[:0]
        info["skipped"] = f"{n} tokens > max_seq_len {limit}"
    elif n > limit and cfg.long_policy == "truncate":
        ids = ids[:limit]
        info["truncated"] = True
    windows = tuple((start, min(start + limit, len(ids))) for start in range(0, len(ids), limit))
    info.update(n_tokens=len(ids), windows=len(windows))
    return ids, windows, info


def tokenize_samples(samples: Sequence[Sample], tokenizer, cfg: DataConfig) -> list[TokenizedSample]:
    """Encode in batches with the fast tokenizer, then apply the long-sample policy."""
    bos = bos_id(tokenizer) if cfg.add_bos and cfg.format == "text" else None
    out: list[TokenizedSample] = []
    for begin in range(0, len(samples), ENCODE_BATCH):
        batch = samples[begin : begin + ENCODE_BATCH]
        # verbose=False: transformers' "indexing errors" warning about the tokenizer's own
        # model_max_length means nothing here; the long policy below decides, and says so.
        encoded = tokenizer([s.text for s in batch], add_special_tokens=False, verbose=False,
                            split_special_tokens=_splits_special_tokens(cfg))["input_ids"]
        for sample, ids in zip(batch, encoded):
            full = np.asarray(([bos] if bos is not None else []) + list(ids), dtype=np.int32)
            kept, windows, info = apply_long_policy(full, cfg)
            out.append(TokenizedSample(sample.sample_id, kept, windows, {**sample.meta, **info}))
    _warn_long(out, cfg)
    return out


def long_samples(metas: Iterable[dict], limit: int = 20) -> dict[str, dict]:
    """Samples the long policy cut or dropped, from their metadata (samples.jsonl records):
    {"truncated" | "skipped": {"count": n, "samples": the first `limit`, each with its
    sample id, source, row and token counts}}; kinds with none are left out."""
    report: dict[str, dict] = {}
    for meta in metas:
        kind = "truncated" if meta.get("truncated") else "skipped" if meta.get("skipped") else None
        if kind is None:
            continue
        entry = report.setdefault(kind, {"count": 0, "samples": []})
        entry["count"] += 1
        if len(entry["samples"]) < limit:
            entry["samples"].append({key: meta.get(key) for key in LONG_SAMPLE_FIELDS})
    return report


LONG_SAMPLE_FIELDS = ("sample_id", "source", "row", "n_source_tokens", "n_tokens")


def _warn_long(tokenized: list[TokenizedSample], cfg: DataConfig, shown: int = 3) -> None:
    """One warning per call naming the samples cut or dropped for length, and their rows."""
    metas = [{"sample_id": t.sample_id, **t.meta} for t in tokenized]
    for kind, entry in long_samples(metas, limit=shown).items():
        where = ", ".join(f"sample {m['sample_id']} ({m['source']}:row {m['row']}, {m['n_source_tokens']:,} tokens)"
                          for m in entry["samples"])
        more = f" and {entry['count'] - shown} more" if entry["count"] > shown else ""
        action = f"cut to their first {cfg.max_seq_len}" if kind == "truncated" else "stored without tokens"
        log.warning("%d sample(s) over --max-seq-len %d %s (--long-policy %s): %s%s",
                    entry["count"], cfg.max_seq_len, action, cfg.long_policy, where, more)


def _splits_special_tokens(cfg: DataConfig) -> bool:
    """Documents are plain text unless asked otherwise; chat-rendered ARC prompts never are."""
    return cfg.format == "text" and not cfg.parse_special_tokens


def bos_id(tokenizer) -> int:
    """The tokenizer's BOS id for --add-bos; a one-line ValueError when it has none."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError(f"--add-bos: tokenizer {tokenizer.name_or_path!r} has no BOS token "
                         "(Qwen's, for one); run without --add-bos")
    return bos
