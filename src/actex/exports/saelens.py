"""Export one hook as a SAELens cached-activations dataset.

SAELens (`cached_activations_path`) loads a Hugging Face dataset saved with
`save_to_disk` whose rows are whole contexts: a column named after the hook holding
Array2D (context_size, d_in) and a `token_ids` column of context_size int32.

Rows must be complete, contiguous contexts. actex stores variable-length samples (and a
long sample may consist of several forward windows whose positions restart at 0), so each
forward window is cut at positions 0, C, 2C, ... into rows of C = context_size tokens and
the shorter tail of every window is dropped (counted in the summary). For a run extracted
with a fixed context size (every sample exactly C tokens, e.g. text cut into C-token
windows) nothing is dropped and the export holds every stored token; that C is the
default. Otherwise the default C is the largest power of two that fits the shortest
forward window (see `infer_context_size`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actex.store.reader import Batch, Run

DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class SaeLensExport:
    path: str
    hook: str
    context_size: int
    rows: int
    tokens_dropped: int


def window_starts(positions: np.ndarray, sample_ids: np.ndarray, context_size: int) -> np.ndarray:
    """Indices i where rows [i, i + C) form one aligned, contiguous context of one window.

    Positions rise by exactly 1 inside a forward window and restart at 0 in the next, so
    positions[i + C - 1] - positions[i] == C - 1 (within one sample) holds iff no restart
    lies between: that, and positions[i] % C == 0, picks the aligned full contexts.
    """
    n = len(positions) - context_size + 1
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    first, last = positions[:n].astype(np.int64), positions[context_size - 1 :].astype(np.int64)
    same = sample_ids[:n] == sample_ids[context_size - 1 :]
    return np.flatnonzero((first % context_size == 0) & (last - first == context_size - 1) & same)


def context_rows(part: Batch, context_size: int) -> tuple[np.ndarray, np.ndarray]:
    """([rows, C, width] activations, [rows, C] token ids) of one part's aligned contexts."""
    starts = window_starts(part.positions, part.sample_ids, context_size)
    index = starts[:, None] + np.arange(context_size)  # [rows, C]
    return part.activations[index], part.token_ids[index]


def infer_context_size(run: Run) -> int:
    """The default context size C: the common n_tokens of a fixed-length run (nothing is
    dropped), else the largest power of two that fits the shortest forward window, so every
    sample gives at least one row (ARC prompts, text of varying length)."""
    lengths = {int(n) for part in run.parts() for n in np.diff(run.read_index(part)[1]) if n > 0}
    if not lengths:
        raise ValueError(f"{run.url}: no committed sample has tokens to export")
    if len(lengths) == 1:
        return lengths.pop()
    max_window = (run.config.get("data") or {}).get("max_seq_len") or max(lengths)
    shortest = min(min(lengths), max_window)
    return 1 << (shortest.bit_length() - 1)


def export_saelens(run: Run, out: str | Path, hook: str, *, context_size: int | None = None,
                   dtype: str = "float32") -> SaeLensExport:
    """Write `hook` of every committed chunk (in chunk order) as a SAELens dataset at `out`."""
    from datasets import Array2D, Dataset, Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)} (Arrow has no bfloat16), got {dtype!r}")
    if hook not in run.hooks:
        raise ValueError(f"{run.url}: no hook {hook!r}; stored hooks: {', '.join(run.hooks)}")
    context_size = context_size or infer_context_size(run)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: output directory exists and is not empty")
    features = Features({
        hook: Array2D(shape=(context_size, run.hooks[hook]), dtype=dtype),
        "token_ids": Sequence(Value("int32"), length=context_size),
    })
    rows = dropped = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".actex-export-") as tmp:
        arrow = str(Path(tmp) / "data.arrow")
        with ArrowWriter(features=features, path=arrow) as writer:
            for part in _parts_in_order(run, hook):
                acts, tokens = context_rows(part, context_size)
                rows += len(tokens)
                dropped += len(part) - tokens.size
                if len(tokens):
                    writer.write_batch({hook: acts.astype(dtype), "token_ids": tokens.astype(np.int32)})
            writer.finalize()
        if rows == 0:
            raise ValueError(f"{run.url}: no window of {hook} holds {context_size} contiguous tokens")
        Dataset.from_file(arrow).save_to_disk(str(out))
    return SaeLensExport(str(out), hook, context_size, rows, dropped)


def _parts_in_order(run: Run, hook: str) -> Iterator[Batch]:
    for part in run.parts():
        yield run.read_part(part, hook)
