"""`actex generate`'s part of the loop: a chunk's prompts are decoded (greedy, or sampled
from a PRNG keyed by (seed, sample id)), then the chunk goes through the extraction
pipeline as prompt + generation.

Decoding is continuous batching (model/generate.py `continuous_generate`): per prompt
length bucket, a queue of the chunk's prompts runs through a fixed number of decode slots,
a slot taking the next prompt as soon as its row stops, so slots stay busy until the
queue runs out. `ChunkGenerator.figures` holds the last chunk's decode tokens, seconds
and slot occupancy (logged per chunk).

    generator = ChunkGenerator(run)          # run.config.generation is set
    tokenized = generator.chunk_tokens(k)    # what extract's chunk_tokens gives, plus answers

`GenerateStep` is extraction's step (engine/extract.py) with these tokens: the worker
(engine/worker.py) runs a generation run exactly as it runs an extraction.

Activations are captured by ONE teacher-forced forward over prompt + generated ids through
the same packed capture path as `extract` (not during decoding). So a stored activation is
exactly what `actex extract` computes for those token ids, and the hooks, packing, dtypes
and store format are shared. In float32 that equals the decode-time values to rounding;
in bfloat16 the decode (KV cache, one query at a time) and the recomputation round in
different places, so the recomputed activations can differ slightly from the ones the
tokens were chosen with, and at a near-tie of the top two logits a stored generated token
need not be the argmax of the recomputed forward.

Every sample's samples.jsonl record gains `n_prompt_tokens`, `n_generated_tokens`,
`generated_text`, `stop_reason` ("stop_token" | "max_new_tokens", None when skipped),
`stop_token`, and for ARC samples `answer` ({grid, reason, correct}; see
data/arc_answers.py). A prompt that leaves less than max_new_tokens of room under
max_seq_len is skipped (no tokens, `skipped` says "prompt too long: ...", answer None), as
the long-sample policy "skip" does: generating after a cut prompt is meaningless. Each
chunk logs one warning naming its skipped prompts, as extraction does for long samples;
the run's predictions.json still has the test input (voted from no grid: [[0]]).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from actex.data import arc
from actex.data.arc_answers import accuracy, answer_record, submission, vote
from actex.data.packing import seq_buckets
from actex.data.tokenize import TokenizedSample, long_samples, tokenize_samples
from actex.engine.extract import ExtractStep
from actex.engine.lockstep import split_shares
from actex.engine.work import SINGLE_PROCESS, ProcessRole
from actex.model.generate import Sampling, make_continuous_fn, sample_keys
from actex.model.mesh import process_local
from actex.reader.run import Run
from actex.store.folder import Store

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.json"  # ARC Prize submission layout, written once the run is complete
ACCURACY = "accuracy.json"  # arc_answers.accuracy of the whole run, beside it
TOO_LONG = "prompt too long"  # the category of a prompt's `skipped` reason: no room to generate


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
class DecodeQueue:
    """One length bucket's prompts, left-padded: token_ids, mask [Q, P] int32. `samples`
    fill the first rows; the rest pad Q to a power of two (one compile per shape) and hold
    one real token each. `slots` rows decode at once."""

    samples: tuple[TokenizedSample, ...]
    token_ids: np.ndarray
    mask: np.ndarray
    slots: int


def decode_queues(prompts: Sequence[TokenizedSample], max_new_tokens: int, batch_tokens: int,
                  max_seq_len: int) -> list[DecodeQueue]:
    """Prompts grouped by length bucket (longest first), one queue per bucket, decoded
    through `batch_tokens // (bucket + N)` slots (a power of two, at most the queue)."""
    buckets = seq_buckets(max_seq_len)
    by_bucket: dict[int, list[TokenizedSample]] = {}
    for t in sorted(prompts, key=lambda t: (-len(t.token_ids), t.sample_id)):
        by_bucket.setdefault(next(b for b in buckets if b >= len(t.token_ids)), []).append(t)
    queues = []
    for length, group in sorted(by_bucket.items(), reverse=True):
        rows = 1 << (len(group) - 1).bit_length()
        slots = min(rows, 1 << (max(1, batch_tokens // (length + max_new_tokens)).bit_length() - 1))
        token_ids = np.zeros((rows, length), np.int32)
        mask = np.zeros((rows, length), np.int32)
        mask[:, -1] = 1  # padding rows: one real token, so no row is all padding
        for r, t in enumerate(group):
            token_ids[r, length - len(t.token_ids):] = t.token_ids
            mask[r, length - len(t.token_ids):] = 1
        queues.append(DecodeQueue(tuple(group), token_ids, mask, slots))
    return queues


@dataclasses.dataclass
class DecodeFigures:
    """A chunk's decoding: tokens generated, decode steps x slots, busy slot-steps, seconds."""

    tokens: int = 0
    slot_steps: int = 0
    busy: int = 0
    seconds: float = 0.0

    @property
    def occupancy(self) -> float:
        return self.busy / self.slot_steps if self.slot_steps else 0.0


class ChunkGenerator:
    """Decodes a chunk's prompts and returns them as prompt + generation samples.

    On a pod slice (`role.count` > 1) each process decodes its own share of the chunk's
    prompts on its own devices (decoding needs no other process: each holds whole
    weights when the model axis stays within it), then every process receives every
    share's tokens (role.allgather), so each holds the whole chunk's prompt + generation
    samples exactly as one process would, and the capture runs in lockstep as for extract.
    Sampled tokens depend on (seed, sample id) alone, so the split changes nothing.
    """

    def __init__(self, run, role: ProcessRole = SINGLE_PROCESS):
        self.run = run
        self.role = role
        # The parameters on this process's devices: decoding is this process's own work.
        self.params = run.model.params if role.count == 1 else process_local(run.model.params, run.mesh)
        self.settings = run.config.generation
        self.data = run.config.data
        self.stop = stop_token_ids(run.tokenizer, self.settings.stop_tokens)
        self.stop_array = np.array(sorted(self.stop), np.int32)
        self.sampling = Sampling(self.settings.temperature, self.settings.top_k, self.settings.top_p)
        self.generators: dict[int, Callable] = {}  # slots -> jitted continuous decoder
        self.encoder = arc.get_encoder(self.data.encoder) if self.data.format == "arc" else None
        self.figures = DecodeFigures()  # of the last chunk

    def _decoder(self, slots: int) -> Callable:
        if slots not in self.generators:
            self.generators[slots] = make_continuous_fn(self.run.model.config, slots, self.settings.max_new_tokens,
                                                        self.sampling)
        return self.generators[slots]

    def chunk_tokens(self, chunk: int) -> list[TokenizedSample]:
        samples = self.run.plan.samples(chunk)
        # Whole prompts: the room check below replaces the long-sample policy.
        whole = self.data.model_copy(update={"long_policy": "skip", "max_seq_len": 2**31 - 1})
        prompts = tokenize_samples(samples, self.run.tokenizer, whole)
        room = self.data.max_seq_len - self.settings.max_new_tokens
        fits = [t for t in prompts if 0 < len(t.token_ids) <= room]
        mine = split_shares(fits, self.role.count)[self.role.index] if self.role.count > 1 else fits
        generated = self._decode(mine)
        if self.role.count > 1:
            generated = self._everyones(chunk, generated)
        return [self._sample(s, t, generated.get(t.sample_id), room) for s, t in zip(samples, prompts)]

    def _everyones(self, chunk: int, mine: dict[int, tuple[np.ndarray, bool]]) -> dict[int, tuple[np.ndarray, bool]]:
        """Every process's decoded tokens of `chunk`, from this process's own."""
        payload = json.dumps({str(sid): [ids.tolist(), stopped] for sid, (ids, stopped) in mine.items()})
        merged: dict[int, tuple[np.ndarray, bool]] = {}
        for value in self.role.allgather(f"decode/{chunk}", payload):
            merged |= {int(sid): (np.asarray(ids, np.int32), bool(stopped)) for sid, (ids, stopped) in json.loads(value).items()}
        return merged

    def _decode(self, prompts: list[TokenizedSample]) -> dict[int, tuple[np.ndarray, bool]]:
        """{sample id: (generated ids, ended by a stop token)} of `prompts`; sets self.figures."""
        queues = decode_queues(prompts, self.settings.max_new_tokens, self.run.config.batch_tokens,
                               self.data.max_seq_len)
        start = time.perf_counter()
        # Dispatch every queue before fetching any: the device runs while the host waits.
        pending = []
        for queue in queues:
            keys = np.zeros((len(queue.token_ids), 2), np.uint32)
            keys[: len(queue.samples)] = sample_keys(self.settings.sampling_seed, [t.sample_id for t in queue.samples])
            pending.append(self._decoder(queue.slots)(self.params, queue.token_ids, queue.mask,
                                                      self.stop_array, keys, np.int32(len(queue.samples))))
        generated: dict[int, tuple[np.ndarray, bool]] = {}
        figures = DecodeFigures()
        for queue, result in zip(queues, pending):
            tokens, n_generated, stopped, stats = jax.device_get(result)
            for r, t in enumerate(queue.samples):
                generated[t.sample_id] = (tokens[r, : n_generated[r]].astype(np.int32), bool(stopped[r]))
            figures.tokens += int(n_generated[: len(queue.samples)].sum())
            figures.slot_steps += int(stats.steps) * queue.slots
            figures.busy += int(stats.busy)
        figures.seconds = time.perf_counter() - start
        self.figures = figures
        return generated

    def _sample(self, sample, prompt: TokenizedSample, generation, room: int) -> TokenizedSample:
        meta = {**prompt.meta, "source_row": sample.source_row, "n_prompt_tokens": len(prompt.token_ids)}
        if generation is None:
            reason = "empty prompt" if len(prompt.token_ids) == 0 else (
                f"{TOO_LONG}: {len(prompt.token_ids)} tokens + max_new_tokens {self.settings.max_new_tokens} "
                f"> max_seq_len {self.data.max_seq_len}")
            meta.update(n_tokens=0, windows=0, skipped=reason, n_generated_tokens=0, generated_text=None,
                        stop_reason=None, stop_token=None, **({"answer": None} if self.encoder else {}))
            return TokenizedSample(prompt.sample_id, prompt.token_ids[:0], (), meta)
        ids, stopped = generation
        text = self.run.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        stop_reason = "stop_token" if stopped else "max_new_tokens"
        token_ids = np.concatenate([prompt.token_ids, ids])
        meta.update(n_tokens=len(token_ids), windows=1, n_generated_tokens=len(ids), generated_text=text,
                    stop_reason=stop_reason,
                    stop_token=self.stop[int(ids[-1])] if stopped else None)
        if self.encoder is not None:
            expected = sample.task.test[meta["test_index"]][1] if sample.task is not None else None
            meta["answer"] = answer_record(text, self.encoder, stop_reason, meta["augmentation"], expected)
        return TokenizedSample(prompt.sample_id, token_ids, ((0, len(token_ids)),), meta)


class GenerateStep(ExtractStep):
    """Extraction's step over a chunk's prompts + their generations (ChunkGenerator)."""

    def __init__(self, run, role: ProcessRole = SINGLE_PROCESS):
        super().__init__(run, role)
        self.generator = ChunkGenerator(run, role)

    def tokens(self, chunk: int) -> list[TokenizedSample]:
        tokenized = self.generator.chunk_tokens(chunk)
        settings = self.generator.settings
        warn_no_room(chunk, tokenized, self.generator.data.max_seq_len, settings.max_new_tokens)
        log_decoding(chunk, self.generator.figures, tokenized)
        return tokenized


def log_decoding(chunk: int, figures: DecodeFigures, tokenized: list) -> None:
    """One line per generated chunk: decode tokens/s, slot occupancy, ARC answers parsed."""
    answers = [t.meta["answer"] for t in tokenized if t.meta.get("answer") is not None]
    parsed = sum(answer["grid"] is not None for answer in answers)
    rate = figures.tokens / figures.seconds if figures.seconds else 0.0
    log.info("chunk %d: decoded %d tokens in %.1f s (%.0f tokens/s), slot occupancy %.0f%%%s", chunk,
             figures.tokens, figures.seconds, rate, 100 * figures.occupancy,
             f", {parsed}/{len(answers)} answers parsed" if answers else "",
             extra={"data": {"event": "decoded", "chunk": chunk, "tokens": figures.tokens,
                             "seconds": round(figures.seconds, 3), "tokens_per_s": round(rate, 1),
                             "occupancy": round(figures.occupancy, 4), "answers": len(answers),
                             "parsed": parsed}})


def warn_no_room(chunk: int, tokenized: list[TokenizedSample], max_seq_len: int, max_new_tokens: int,
                 shown: int = 3) -> None:
    """One warning naming the chunk's prompts skipped for having no room to generate."""
    metas = [{"sample_id": t.sample_id, **t.meta} for t in tokenized
             if str(t.meta.get("skipped") or "").startswith(TOO_LONG)]
    entry = long_samples(metas, limit=shown).get("skipped")
    if entry is None:
        return
    where = ", ".join(f"sample {m['sample_id']} ({m['source']}:row {m['row']}, {m['n_source_tokens']:,} tokens)"
                      for m in entry["samples"])
    more = f" and {entry['count'] - shown} more" if entry["count"] > shown else ""
    log.warning("chunk %d: %d prompt(s) skipped (%s: over --max-seq-len %d - --max-new-tokens %d = %d tokens; "
                "nothing generated or stored, an ARC answer counts as none): %s%s", chunk, entry["count"], TOO_LONG,
                max_seq_len, max_new_tokens, max_seq_len - max_new_tokens, where, more)


# --------------------------------------------------------------------------- run level


def run_samples(run) -> list[dict]:
    """Every committed chunk's samples.jsonl records, in chunk order (`run`: a reader Run)."""
    return [record for chunk in sorted(run.commits) for record in run.samples(chunk)]


def generated_tokens(record: dict) -> int:
    """Tokens a sample generated (records written before `n_generated_tokens` was kept
    stored every token, so n_tokens - n_prompt_tokens is the count there)."""
    if "n_generated_tokens" in record:
        return record["n_generated_tokens"]
    return record["n_tokens"] - record["n_prompt_tokens"]


def generation_totals(samples: list[dict]) -> dict:
    """A generation run's totals from its samples.jsonl records: samples decoded, tokens
    generated, how the answers ended, prompts skipped for room."""
    decoded = [s for s in samples if s.get("stop_reason") is not None]
    generated = sum(generated_tokens(s) for s in decoded)
    return {
        "samples": len(decoded),
        "generated_tokens": generated,
        "mean_tokens": generated / len(decoded) if decoded else 0.0,
        "stop_token": sum(s["stop_reason"] == "stop_token" for s in decoded),
        "max_new_tokens": sum(s["stop_reason"] == "max_new_tokens" for s in decoded),
        "skipped": len(samples) - len(decoded),
    }


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
    run = Run(store)
    if not arc_generation(run) or len(run.commits) < run.num_chunks:
        return None
    samples = run_samples(run)
    # Every sample votes, skipped ones too (with no grid), so every test input has its entry.
    store.write_bytes(PREDICTIONS, json.dumps(submission(vote(samples)), separators=(",", ":")).encode())
    summary = accuracy(samples)
    store.write_bytes(ACCURACY, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return summary
