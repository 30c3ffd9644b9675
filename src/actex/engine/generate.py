"""`actex generate`'s part of the loop: a chunk's prompts are decoded greedily, then the
chunk goes through the extraction pipeline as prompt + generation.

    generator = ChunkGenerator(run)          # run.config.generation is set
    tokenized = generator.chunk_tokens(k)    # what extract's chunk_tokens gives, plus answers

Activations are captured by ONE teacher-forced forward over prompt + generated ids through
the same packed capture path as `extract` (not during decoding). So a stored activation is
exactly what `actex extract` computes for those token ids, and the hooks, packing, dtypes
and store format are shared. In float32 that equals the decode-time values to rounding;
in bfloat16 the decode (KV cache, one query at a time) and the recomputation round in
different places, so the recomputed activations can differ slightly from the ones the
tokens were chosen with, and at a near-tie of the top two logits a stored generated token
need not be the argmax of the recomputed forward.

Every sample's samples.jsonl record gains `n_prompt_tokens`, `generated_text`,
`stop_reason` ("stop_token" | "max_new_tokens", None when skipped), `stop_token`, and for
ARC samples `answer` ({grid, reason, correct}; see data/arc_answers.py). A prompt that
leaves less than max_new_tokens of room under max_seq_len is skipped (no tokens, with the
reason), as the long-sample policy "skip" does: generating after a cut prompt is meaningless.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence

import jax
import numpy as np

from actex.data import arc
from actex.data.arc_answers import accuracy, answer_record, submission, vote
from actex.data.packing import seq_buckets
from actex.data.tokenize import TokenizedSample, tokenize_samples
from actex.model.generate import make_generate_fn
from actex.store.folder import Store

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.json"  # ARC Prize submission layout, written once the run is complete
ACCURACY = "accuracy.json"  # arc_answers.accuracy of the whole run, beside it


def stop_token_ids(tokenizer, stop_tokens: Sequence[str]) -> dict[int, str]:
    """{token id: token string} of the tokenizer's EOS and the given stop tokens it has."""
    ids = {}
    if tokenizer.eos_token_id is not None:
        ids[int(tokenizer.eos_token_id)] = tokenizer.eos_token
    vocab = tokenizer.get_vocab()
    for token in stop_tokens:
        if token in vocab:
            ids[int(vocab[token])] = token
    if not ids:
        raise ValueError("generation: the tokenizer has no EOS token and none of generation.stop_tokens "
                         f"{list(stop_tokens)}; nothing could end a row before max_new_tokens")
    return ids


@dataclasses.dataclass(frozen=True)
class DecodeBatch:
    """Left-padded prompts: token_ids, mask [rows, prompt_len] int32; `samples` fill the first rows."""

    samples: tuple[TokenizedSample, ...]
    token_ids: np.ndarray
    mask: np.ndarray


def decode_batches(prompts: Sequence[TokenizedSample], max_new_tokens: int, batch_tokens: int,
                   max_seq_len: int) -> list[DecodeBatch]:
    """Prompts grouped by length bucket (longest first), `batch_tokens // (bucket + N)` rows
    per batch, row counts rounded up to powers of two, so few (rows, prompt_len) programs
    compile. Spare rows hold one real token and are ignored."""
    buckets = seq_buckets(max_seq_len)
    by_bucket: dict[int, list[TokenizedSample]] = {}
    for t in sorted(prompts, key=lambda t: (-len(t.token_ids), t.sample_id)):
        by_bucket.setdefault(next(b for b in buckets if b >= len(t.token_ids)), []).append(t)
    batches = []
    for length, group in sorted(by_bucket.items(), reverse=True):
        max_rows = max(1, batch_tokens // (length + max_new_tokens))
        for begin in range(0, len(group), max_rows):
            members = group[begin: begin + max_rows]
            rows = min(max_rows, 1 << (len(members) - 1).bit_length())
            token_ids = np.zeros((rows, length), np.int32)
            mask = np.zeros((rows, length), np.int32)
            mask[:, -1] = 1  # spare rows: one real token, so no row is all padding
            for r, t in enumerate(members):
                token_ids[r, length - len(t.token_ids):] = t.token_ids
                mask[r, length - len(t.token_ids):] = 1
            batches.append(DecodeBatch(tuple(members), token_ids, mask))
    return batches


class ChunkGenerator:
    """Decodes a chunk's prompts and returns them as prompt + generation samples."""

    def __init__(self, run):
        self.run = run
        self.settings = run.config.generation
        self.data = run.config.data
        self.stop = stop_token_ids(run.tokenizer, self.settings.stop_tokens)
        self.stop_array = np.array(sorted(self.stop), np.int32)
        self.generate = make_generate_fn(run.model.config, self.settings.max_new_tokens)
        self.encoder = arc.get_encoder(self.data.encoder) if self.data.format == "arc" else None

    def chunk_tokens(self, chunk: int) -> list[TokenizedSample]:
        samples = self.run.plan.samples(chunk)
        # Whole prompts: the room check below replaces the long-sample policy.
        whole = self.data.model_copy(update={"long_policy": "skip", "max_seq_len": 2**31 - 1})
        prompts = tokenize_samples(samples, self.run.tokenizer, whole)
        room = self.data.max_seq_len - self.settings.max_new_tokens
        fits = [t for t in prompts if 0 < len(t.token_ids) <= room]
        batches = decode_batches(fits, self.settings.max_new_tokens, self.run.config.batch_tokens,
                                 self.data.max_seq_len)
        # Dispatch every batch before fetching any: the device runs while the host waits.
        pending = [self.generate(self.run.model.params, b.token_ids, b.mask, self.stop_array) for b in batches]
        generated: dict[int, tuple[np.ndarray, bool]] = {}
        for batch, result in zip(batches, pending):
            tokens, n_generated, stopped = jax.device_get(result)
            for r, t in enumerate(batch.samples):
                generated[t.sample_id] = (tokens[r, : n_generated[r]].astype(np.int32), bool(stopped[r]))
        return [self._sample(s, t, generated.get(t.sample_id), room) for s, t in zip(samples, prompts)]

    def _sample(self, sample, prompt: TokenizedSample, generation, room: int) -> TokenizedSample:
        meta = {**prompt.meta, "source_row": sample.source_row, "n_prompt_tokens": len(prompt.token_ids)}
        if generation is None:
            reason = "empty prompt" if len(prompt.token_ids) == 0 else (
                f"prompt {len(prompt.token_ids)} tokens + max_new_tokens {self.settings.max_new_tokens} "
                f"> max_seq_len {self.data.max_seq_len}")
            meta.update(n_tokens=0, windows=0, skipped=reason, generated_text=None, stop_reason=None,
                        stop_token=None, **({"answer": None} if self.encoder else {}))
            return TokenizedSample(prompt.sample_id, prompt.token_ids[:0], (), meta)
        ids, stopped = generation
        text = self.run.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        stop_reason = "stop_token" if stopped else "max_new_tokens"
        token_ids = np.concatenate([prompt.token_ids, ids])
        meta.update(n_tokens=len(token_ids), windows=1, generated_text=text, stop_reason=stop_reason,
                    stop_token=self.stop[int(ids[-1])] if stopped else None)
        if self.encoder is not None:
            expected = sample.task.test[meta["test_index"]][1] if sample.task is not None else None
            meta["answer"] = answer_record(text, self.encoder, stop_reason, meta["augmentation"], expected)
        return TokenizedSample(prompt.sample_id, token_ids, ((0, len(token_ids)),), meta)


# --------------------------------------------------------------------------- run level


def run_samples(run) -> list[dict]:
    """Every committed chunk's samples.jsonl records, in chunk order (`run`: a reader Run)."""
    return [record for chunk in sorted(run.commits) for record in run.samples(chunk)]


def arc_generation(run) -> bool:
    """Whether a reader Run holds generated ARC answers."""
    return run.manifest.kind == "generate" and run.config["data"]["format"] == "arc"


def answers_summary(run) -> dict | None:
    """The accuracy summary of a generation run's committed ARC samples, else None."""
    return accuracy(run_samples(run)) if arc_generation(run) else None


def write_predictions(store: Store) -> dict | None:
    """Write predictions.json (ARC Prize layout) and accuracy.json once every chunk is committed.

    Any worker may call it: the content follows from the committed samples alone, so two
    workers finishing together write the same bytes. Returns the accuracy summary, or None
    when the run is not a complete ARC generation run.
    """
    from actex.store.reader import Run

    run = Run(store)
    if not arc_generation(run) or len(run.commits) < run.num_chunks:
        return None
    samples = run_samples(run)
    store.write_bytes(PREDICTIONS, json.dumps(submission(vote(s for s in samples if s.get("answer") is not None)),
                                              separators=(",", ":")).encode())
    summary = accuracy(samples)
    store.write_bytes(ACCURACY, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return summary
