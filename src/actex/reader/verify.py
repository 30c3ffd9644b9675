"""Check stored activations against the reference implementation (Hugging Face transformers).

`actex verify URL --samples N` picks N random committed samples, feeds their stored token
ids and positions to transformers' own implementation of the model's family (torch,
float32, eager attention, on CPU by default; actex/reference.py) with forward hooks at
the TransformerLens points, and compares with what the store holds,
token by token:

    error(hook)  = max over tokens t of ||stored_t - reference_t||_2 / ||reference_t||_2
    cosine(hook) = min over tokens t of cos(stored_t, reference_t)

and names the worst token (sample id, token index, position). A per-token measure, not
max |delta| / max |reference|: Qwen models put activations thousands of times larger
than the rest on the first token(s), and a ratio to that maximum hides real errors
elsewhere (a segment leaking into another of its packed row, say).

A stored sample may consist of several forward windows (long-text policies restart
positions at 0); each window is recomputed on its own, exactly as it was extracted.
Tolerances depend on the stored dtype (its rounding alone is ~2^-9 relative for bfloat16)
and on the compute dtype the run used; `--tolerance` overrides them.

int8 runs are compared after dequantization, like any reader sees them; each hook's line
also gives the quantization error the run's stats recorded for the chunks read (the
stored values against the float32 the model computed), so what int8 costs is told apart
from what the model computation differs by. The two are separate worst cases (the sampled
tokens vs transformers; every token of those chunks vs float32), so the int8 figure is no
part of the other and may exceed it: the CLI prints "error vs reference E (int8 rounding
alone Q)". A value that is not finite as stored (an
overflow of float16, say) anywhere in the run fails verify, named by hook and chunks.

Integrity comes first: every part whose samples are recomputed is read whole and checked
against the checksums recorded at write time (size and sha256 from the commit record,
CRC-32C of the header and of every tensor), and so is its chunk's samples.jsonl (CRC-32C from
the commit record, where recorded); each corrupt file is one line of the report
naming the file, the tensor and expected vs actual, and its samples are not recomputed.
`check_integrity(run, run.parts())` checks a whole run without a model.

Needs the optional torch extra for the recomputation: `pip install 'actex[torch]'`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from actex.reader.parts import Block, PartRef
from actex.reader.run import Run
from actex.reference import load_reference, reference_activations
from actex.store import layout
from actex.store.integrity import CorruptPartError

# Per-token relative L2 error allowed per dtype (stored or compute, whichever is looser).
# bfloat16 rounding alone is ~2^-9 relative per value, ~1e-3 over a token's vector.
# int8: its own error is at most ~1% per token (store/quantize.py), the rest is compute's.
TOLERANCE = {"float32": 1e-3, "float16": 5e-3, "bfloat16": 2e-2, "int8": 2e-2}


@dataclass(frozen=True)
class TokenErrors:
    """Worst token of one hook so far: its relative L2 error, and the lowest cosine."""

    error: float = 0.0  # ||stored - reference|| / ||reference|| of the worst token
    cosine: float = 1.0  # lowest cos(stored, reference) over the tokens
    sample_id: int = -1  # the worst token's sample
    index: int = -1  # its index among the sample's stored tokens
    position: int = -1  # its position in its forward window

    def merge(self, other: TokenErrors) -> TokenErrors:
        """The worse of two; NaN counts as worst (np.minimum keeps it), so it fails the check."""
        other_worse = not np.isnan(self.error) and (np.isnan(other.error) or other.error > self.error)
        worse = other if other_worse else self
        cosine = float(np.minimum(self.cosine, other.cosine))
        return TokenErrors(worse.error, cosine, worse.sample_id, worse.index, worse.position)


def token_errors(stored: np.ndarray, reference: np.ndarray, sample_id: int, positions: np.ndarray,
                 first_index: int = 0) -> TokenErrors:
    """Per-token relative L2 error and cosine of stored [tokens, width] against reference."""
    s, r = stored.astype(np.float64), reference.astype(np.float64)
    ref_norm = np.linalg.norm(r, axis=-1)
    rel = np.linalg.norm(s - r, axis=-1) / np.maximum(ref_norm, 1e-30)
    cos = np.sum(s * r, axis=-1) / np.maximum(np.linalg.norm(s, axis=-1) * ref_norm, 1e-30)
    worst = int(np.argmax(np.where(np.isnan(rel), np.inf, rel)))
    return TokenErrors(float(rel[worst]), float(cos.min()), sample_id, first_index + worst, int(positions[worst]))


@dataclass(frozen=True)
class HookCheck:
    hook: str
    error: float  # worst per-token ||stored - reference|| / ||reference||
    tolerance: float
    cosine: float = 1.0  # lowest per-token cosine similarity
    worst_sample: int = -1  # sample id of the worst token
    worst_index: int = -1  # its token index within the sample
    worst_position: int = -1  # its position in its forward window
    quant_error: float | None = None  # int8: worst stored-vs-float32 error the run's stats recorded

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


@dataclass(frozen=True)
class VerifyReport:
    url: str
    sample_ids: tuple[int, ...]
    tokens: int
    checks: tuple[HookCheck, ...]
    corrupt: tuple[str, ...] = ()  # one line per part that failed its checksums
    overflow: tuple[str, ...] = ()  # one line per hook with values not finite as stored

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and not self.corrupt and not self.overflow


def check_integrity(run: Run, parts: list[PartRef]) -> dict[str, str]:
    """Check every byte of `parts`, and their chunks' samples.jsonl: {path: one line naming
    file (and tensor), expected vs actual} for each corrupt part or samples.jsonl (empty when
    all are intact)."""
    problems = {}
    for part in parts:
        try:
            run.check_part(part)
        except CorruptPartError as error:
            problems[part.path] = str(error)
    for chunk in sorted({part.chunk for part in parts}):
        try:
            run.samples(chunk)
        except CorruptPartError as error:
            problems[run.record(chunk).samples_path] = str(error)
    return problems


# Where `set_aside` moves the commit records of corrupt chunks (outside commits/, so they
# no longer count as committed; kept, not deleted, to show what was repaired and when).
SET_ASIDE_DIR = "repaired"


def set_aside(run: Run, chunks: Iterable[int]) -> dict[int, str]:
    """Uncommit `chunks` by moving each commit record to repaired/<chunk>-<attempt>.json.

    A chunk exists only through its commit record, so the next `actex extract` of the run
    recomputes exactly these chunks (the plan and the computation are deterministic: the
    same bytes as before the damage) and `actex gc` later deletes their old attempts.
    Copy first, then delete: an interruption leaves the chunk committed, never lost.
    Returns {chunk: the record's new path}."""
    moved = {}
    for chunk in sorted(set(chunks)):
        record_path = layout.commit_path(chunk)
        aside = f"{SET_ASIDE_DIR}/{layout.chunk_name(chunk)}-{run.record(chunk).attempt}.json"
        run.store.create_exclusive(aside, run.store.read_bytes(record_path))  # False: set aside before
        run.store.delete(record_path)
        moved[chunk] = aside
    return moved


def default_tolerance(run: Run) -> float:
    compute = run.config.get("compute_dtype", "float32")
    return max(TOLERANCE[run.dtype], TOLERANCE.get(compute, TOLERANCE["bfloat16"]))


def pick_samples(run: Run, n: int, seed: int) -> list[tuple[PartRef, int, int, int]]:
    """n random committed samples with tokens, as (part, sample_id, token lo, token hi).

    Chunks are drawn first (a seeded permutation), then one random sample of each in turn,
    round after round until n are picked: only the drawn chunks' part indices are read,
    not every part of a run of thousands of chunks. Chunks hold about equal numbers of
    samples (--chunk-size), so the pick is close to uniform over samples. Raises
    ValueError when no committed sample has tokens.
    """
    rng = np.random.default_rng(seed)
    order = [int(c) for c in rng.permutation(run.chunks)]
    run.records(order[:n])  # the first round's commit records in one batched fetch, not one by one
    pools: dict[int, list[tuple[PartRef, int, int, int]]] = {}
    picked: list[tuple[PartRef, int, int, int]] = []
    while len(picked) < n:
        before = len(picked)
        for chunk in order:
            if len(picked) == n:
                break
            if chunk not in pools:
                pools[chunk] = _samples_with_tokens(run, chunk)
            if pools[chunk]:
                picked.append(pools[chunk].pop(int(rng.integers(len(pools[chunk])))))
        if len(picked) == before:  # every chunk's samples are taken
            break
    if not picked:
        raise ValueError(f"{run.url}: no committed sample has tokens to verify")
    return sorted(picked, key=lambda p: (p[0].chunk, p[0].index, p[2]))


def _samples_with_tokens(run: Run, chunk: int) -> list[tuple[PartRef, int, int, int]]:
    out = []
    for part in run.parts([chunk]):
        ids, offsets = run.read_index(part)
        out += [(part, sid, lo, hi) for sid, lo, hi in zip(ids.tolist(), offsets[:-1].tolist(), offsets[1:].tolist()) if hi > lo]
    return out


def forward_windows(positions: np.ndarray) -> list[tuple[int, int]]:
    """Split a sample's tokens where positions restart: each piece was one forward window."""
    starts = [0] + [i for i in range(1, len(positions)) if positions[i] != positions[i - 1] + 1]
    return list(zip(starts, starts[1:] + [len(positions)]))


def verify(run: Run, n_samples: int, *, seed: int = 0, tolerance: float | None = None,
           model: str | None = None, device: str = "cpu", reference=None) -> VerifyReport:
    """Recompute n_samples random stored samples and compare every stored hook.

    ValueError for a run that stores selected positions only (--positions): the dropped
    tokens were context its forward saw, and a window is recomputed from stored tokens."""
    selected = run.config.get("positions", "all")
    if selected != "all":
        raise ValueError(f"{run.url} stores --positions {selected}: verify recomputes each window from its stored "
                         "tokens, and the dropped ones were context the model saw; use --integrity-only")
    hooks = list(run.hooks)
    chosen = pick_samples(run, n_samples, seed)
    corrupt = check_integrity(run, list({part.path: part for part, _, _, _ in chosen}.values()))
    chosen = [c for c in chosen if c[0].path not in corrupt]  # their bytes are known bad
    if reference is None:
        reference = load_reference(model or run.config["model"], run.config.get("revision"), device)
    tol = default_tolerance(run) if tolerance is None else tolerance
    worst = dict.fromkeys(hooks, TokenErrors())
    tokens = 0
    for part, sid, lo, hi in chosen:
        stored = {hook: run.read_block(Block(part, lo, hi), hook) for hook in hooks}
        first = stored[hooks[0]]
        tokens += hi - lo
        for a, b in forward_windows(first.positions):
            ref = reference_activations(reference, hooks, first.token_ids[a:b], first.positions[a:b])
            for hook in hooks:
                window = token_errors(stored[hook].activations[a:b], ref[hook], sid, first.positions[a:b], a)
                worst[hook] = worst[hook].merge(window)
    quant = quantization_errors(run, sorted({part.chunk for part, _, _, _ in chosen}))
    checks = tuple(
        HookCheck(h, w.error, tol, w.cosine, w.sample_id, w.index, w.position, quant.get(h)) for h, w in worst.items()
    )
    return VerifyReport(run.url, tuple(sid for _, sid, _, _ in chosen), tokens, checks, tuple(corrupt.values()),
                        overflow_lines(run))


def quantization_errors(run: Run, chunks: list[int]) -> dict[str, float]:
    """{hook: worst per-token int8 error recorded in the stats of `chunks`} (empty unless int8)."""
    if not run.quantized or not chunks:
        return {}
    return {hook: run.stats(hook, chunks).quant_error_max for hook in run.hooks}


def overflow_lines(run: Run) -> tuple[str, ...]:
    """One line per hook whose stored values are not all finite, from the commit records."""
    chunks: dict[str, list[int]] = {}
    for chunk, record in sorted(run.commits.items()):
        for hook in record.overflow:
            chunks.setdefault(hook, []).append(chunk)
    return tuple(f"{hook}: {count} value(s) not finite as stored {run.dtype} in {len(chunks[hook])} chunk(s), "
                 f"first chunk {chunks[hook][0]}" for hook, count in run.overflow().items())
