"""Export one hook as a SAELens cached-activations dataset that SAELens trains from by config.

    <out>/                    Hugging Face dataset (`save_to_disk`): SAELens's
                              `cached_activations_path`; one row per context of C tokens:
        <hook column>         Array2D (C, d_in), float16 or float32 (Arrow has no bfloat16)
        token_ids             Sequence(int32, C)
        sample_id             int64: the sample the context comes from
        offset                int64: its first token's index in the sample (0 = the sample's first)
        position              int32: its first token's position in its forward window (0 = the window's first)
    <out>/text/train.parquet  a `text` column, each row's tokens decoded: SAELens's
                              `dataset_path` (it loads one even when training from a cache)
    <out>/saelens.json        the SAELens config fields the export fixes, and provenance

Contexts. actex stores variable-length samples, and a long sample is several forward
windows whose positions restart at 0. Each window is cut into contexts of C tokens, aligned
to its start (positions 0, C, 2C, ...; the shorter tail dropped) or to its end (`align=
"end"`: the last C tokens, the C before them, ...; the shorter head dropped, so a prompt's
end, e.g. an ARC test grid and answer region, is always kept). Only a window's first
context (position 0) is a whole context: later ones are slices whose activations saw the
tokens before them in the window, so recomputing them from their own tokens alone (what
SAELens's evals do) gives other values. `contexts="first"` keeps only whole contexts;
`contexts="all"` keeps every slice, labelled by `position` (> 0 for slices).

Rows are globally shuffled with a seed (SAELens's mixing buffer holds only a few
contexts, so rows in store order would give batches from two or three prompts).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from actex.reader.batch import Batch
from actex.reader.exports.saelens_target import SaeLensTarget
from actex.reader.run import Run

DTYPES = ("float32", "float16")
CONTEXTS = ("all", "first")
ALIGNS = ("start", "end")
TEXT_DIR = "text"
CONFIG_FILE = "saelens.json"
# Rows decoded (and re-tokenized to check the round trip) per batch for the text dataset.
TEXT_BATCH = 256


@dataclass(frozen=True)
class SaeLensExport:
    path: str
    hook: str
    column: str  # the hook's name in the dataset: SAELens's hook_name
    context_size: int
    rows: int
    tokens_dropped: int  # tokens in no exported context (window tails, or heads, or slices)
    dtype: str
    contexts: str
    align: str
    seed: int | None  # of the row shuffle; None: store order
    retokenized_differently: int | None = None  # rows whose decoded text tokenizes to other ids


@dataclass(frozen=True)
class Contexts:
    """Rows of one part: whole or sliced contexts of one hook."""

    activations: np.ndarray  # [rows, C, width]
    token_ids: np.ndarray  # [rows, C]
    sample_ids: np.ndarray  # [rows]
    offsets: np.ndarray  # [rows]: index of each row's first token in its sample
    positions: np.ndarray  # [rows]: position of each row's first token in its window


def context_starts(positions: np.ndarray, sample_ids: np.ndarray, context_size: int, *, align: str = "start",
                   first_only: bool = False) -> np.ndarray:
    """Indices i where tokens [i, i + C) are one exported context.

    A forward window is a run of tokens of one sample whose positions rise by exactly 1.
    Contexts lie inside one window, aligned to its first position (align="start":
    position % C == 0) or to its last (align="end": C divides the distance to its end);
    first_only keeps only each window's first context (position 0: a whole context).
    """
    n = len(positions)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    pos = positions.astype(np.int64)
    new_window = np.ones(n, dtype=bool)
    new_window[1:] = (pos[1:] != pos[:-1] + 1) | (sample_ids[1:] != sample_ids[:-1])
    starts = np.flatnonzero(new_window)
    last = np.append(starts[1:], n) - 1  # each window's last token
    end = pos[last][np.cumsum(new_window) - 1] + 1  # per token: its window's end position
    left = end - pos  # tokens from here to the window's end
    anchor = pos if align == "start" else left
    keep = (left >= context_size) & (anchor % context_size == 0)
    if first_only:
        keep &= pos < context_size
    return np.flatnonzero(keep)


def context_rows(part: Batch, context_size: int, *, align: str = "start", first_only: bool = False) -> Contexts:
    """One part's exported contexts."""
    starts = context_starts(part.positions, part.sample_ids, context_size, align=align, first_only=first_only)
    index = starts[:, None] + np.arange(context_size)  # [rows, C]
    return Contexts(part.activations[index], part.token_ids[index], part.sample_ids[starts],
                    token_offsets(part.sample_ids)[starts], part.positions[starts])


def token_offsets(sample_ids: np.ndarray) -> np.ndarray:
    """Each token's index in its sample (a part holds each sample's tokens contiguously)."""
    n = len(sample_ids)
    first = np.ones(n, dtype=bool)
    first[1:] = sample_ids[1:] != sample_ids[:-1]
    return np.arange(n) - np.maximum.accumulate(np.where(first, np.arange(n), 0))


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


def default_dtype(run: Run) -> str:
    """float16 for a run stored in 16 bits: it holds every bfloat16 value of magnitude
    7.6e-6 to 65504 exactly (its 10 mantissa bits cover bfloat16's 7) in the same bytes;
    float32 otherwise."""
    return "float16" if run.dtype in ("bfloat16", "float16") else "float32"


def check_options(run: Run, hook: str, *, context_size: int | None, dtype: str | None, contexts: str,
                  align: str) -> None:
    """Refuse bad options in one line (ValueError) before anything is read or written."""
    run.check_hook(hook)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)} (Arrow has no bfloat16), got {dtype!r}")
    if contexts not in CONTEXTS:
        raise ValueError(f"--contexts must be one of {', '.join(CONTEXTS)}, got {contexts!r}")
    if align not in ALIGNS:
        raise ValueError(f"--align must be one of {', '.join(ALIGNS)}, got {align!r}")
    if contexts == "first" and align == "end":
        raise ValueError("--contexts first keeps each window's first context (position 0), which --align end "
                         "does not cut: use one or the other")
    if context_size is not None and context_size < 1:
        raise ValueError(f"--context-size must be >= 1, got {context_size}")


def export_saelens(run: Run, out: str | Path, hook: str, *, context_size: int | None = None,
                   dtype: str | None = None, contexts: str = "all", align: str = "start", seed: int | None = 0,
                   target: SaeLensTarget | None = None) -> SaeLensExport:
    """Write `hook`'s contexts as a SAELens dataset at `out` (see the module docstring).

    seed: rows are shuffled with it (None keeps store order). target: the model SAELens
    will load; with it the column takes its hook name and the text dataset and
    saelens.json are written (without it, only the activations, under actex's hook name).
    Nothing appears at `out` until the export is complete.
    """
    check_options(run, hook, context_size=context_size, dtype=dtype, contexts=contexts, align=align)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: output exists and is not an empty directory")
    context_size = context_size or infer_context_size(run)
    dtype = dtype or default_dtype(run)
    column = target.hook_name if target else hook
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".actex-export-") as tmp:
        ordered = Path(tmp) / "ordered.arrow"
        rows, dropped = _write_contexts(run, hook, column, ordered, context_size, dtype, contexts, align)
        if rows == 0:
            raise ValueError(f"{run.url}: no window of {hook} holds {context_size} contiguous tokens")
        staged = Path(tmp) / "export"
        _save_shuffled(ordered, staged, seed)
        result = SaeLensExport(str(out), hook, column, context_size, rows, dropped, dtype, contexts, align, seed)
        if target is not None:
            mismatched = _write_text(staged, target.tokenizer)
            result = SaeLensExport(**{**asdict(result), "retokenized_differently": mismatched})
            _write_config(staged, out, run, result, target)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staged, out)
    return result


def _write_contexts(run: Run, hook: str, column: str, path: Path, context_size: int, dtype: str, contexts: str,
                    align: str) -> tuple[int, int]:
    """Every part's contexts, in store order, into one Arrow file: (rows, tokens dropped)."""
    from datasets import Array2D, Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({
        column: Array2D(shape=(context_size, run.hooks[hook]), dtype=dtype),
        "token_ids": Sequence(Value("int32"), length=context_size),
        "sample_id": Value("int64"),
        "offset": Value("int64"),
        "position": Value("int32"),
    })
    rows = dropped = 0
    with ArrowWriter(features=features, path=str(path)) as writer:
        for part in _parts_in_order(run, hook):
            found = context_rows(part, context_size, align=align, first_only=contexts == "first")
            rows += len(found.token_ids)
            dropped += len(part) - found.token_ids.size
            if len(found.token_ids):
                writer.write_batch({
                    column: _converted(found.activations, dtype, hook),
                    "token_ids": found.token_ids.astype(np.int32),
                    "sample_id": found.sample_ids.astype(np.int64),
                    "offset": found.offsets.astype(np.int64),
                    "position": found.positions.astype(np.int32),
                })
        writer.finalize()
    return rows, dropped


def _converted(activations: np.ndarray, dtype: str, hook: str) -> np.ndarray:
    """Activations in the export dtype; a finite value float16 cannot hold is refused."""
    converted = activations.astype(dtype)
    if dtype == "float16" and np.isinf(converted).any() and np.isfinite(activations.astype(np.float32)).all():
        raise ValueError(f"{hook}: values beyond float16's range (65504); export with --dtype float32")
    return converted


def _save_shuffled(ordered: Path, staged: Path, seed: int | None) -> None:
    """save_to_disk the rows, permuted by `seed` (a global shuffle over every row)."""
    from datasets import Dataset

    dataset = Dataset.from_file(str(ordered))
    if seed is not None:
        dataset = dataset.select(np.random.default_rng(seed).permutation(len(dataset)))
    dataset.save_to_disk(str(staged))


def _write_text(staged: Path, tokenizer) -> int:
    """text/train.parquet: each row's tokens decoded, in row order. Returns how many rows'
    text tokenizes back to other ids (SAELens's evals tokenize the text, without adding
    special tokens, and see those ids instead)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import load_from_disk

    token_ids = load_from_disk(str(staged)).select_columns(["token_ids"]).with_format("numpy")
    texts, mismatched = [], 0
    for start in range(0, len(token_ids), TEXT_BATCH):
        ids = token_ids[start : start + TEXT_BATCH]["token_ids"].tolist()
        decoded = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        again = tokenizer(decoded, add_special_tokens=False)["input_ids"]
        mismatched += sum(a != b for a, b in zip(again, ids))
        texts += decoded
    (staged / TEXT_DIR).mkdir()
    pq.write_table(pa.table({"text": texts}), staged / TEXT_DIR / "train.parquet")
    return mismatched


def _write_config(staged: Path, out: Path, run: Run, result: SaeLensExport, target: SaeLensTarget) -> None:
    """saelens.json: the LanguageModelSAERunnerConfig fields fixed by this export ("runner"),
    d_in for the SAE's config, and where the rows came from ("actex")."""
    final = out.resolve()
    runner = {
        "model_name": target.model_name,
        "model_class_name": target.model_class_name,
        "model_from_pretrained_kwargs": target.model_from_pretrained_kwargs,
        "hook_name": target.hook_name,
        "context_size": result.context_size,
        "prepend_bos": target.prepend_bos,
        "use_cached_activations": True,
        "cached_activations_path": str(final),
        # Text, not token ids: SAELens checks a tokenized local dataset's tokenizer on the
        # hub by the dataset's path, which fails for a local path. Each row is one context:
        # tokenized alone, not concatenated with the next.
        "dataset_path": str(final / TEXT_DIR),
        "is_dataset_tokenized": False,
        "streaming": False,
        "disable_concat_sequences": True,
    }
    provenance = {
        "run": run.url,
        "config_hash": run.manifest.config_hash,
        "hook": result.hook,
        "rows": result.rows,
        "tokens": result.rows * result.context_size,
        "tokens_dropped": result.tokens_dropped,
        "contexts": result.contexts,
        "align": result.align,
        "shuffle_seed": result.seed,
        "dtype": result.dtype,
        "stored_dtype": run.dtype,
        "retokenized_differently": result.retokenized_differently,
        "whole_contexts": "rows with position 0" if result.contexts == "all" else "every row",
    }
    document = {"d_in": run.hooks[result.hook], "runner": runner, "actex": provenance}
    (staged / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")


def _parts_in_order(run: Run, hook: str) -> Iterator[Batch]:
    for part in run.parts():
        yield run.read_part(part, hook)

