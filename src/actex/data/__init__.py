"""The input side: source rows -> samples (prompt text + identity) -> token ids -> packed batches."""

from actex.data.config import DataConfig
from actex.data.packing import DEFAULT_BATCH_TOKENS, SEQ_STEP, PackedBatch, Placement, ShapeBudget, pack, seq_buckets, useful_fraction
from actex.data.plan import Plan, Sample, build_plan
from actex.data.tokenize import TokenizedSample, tokenize_samples
from actex.data.tokenizer_build import build_tokenizer

__all__ = [
    "DEFAULT_BATCH_TOKENS",
    "DataConfig",
    "PackedBatch",
    "Placement",
    "Plan",
    "SEQ_STEP",
    "Sample",
    "ShapeBudget",
    "TokenizedSample",
    "build_plan",
    "build_tokenizer",
    "pack",
    "seq_buckets",
    "tokenize_samples",
    "useful_fraction",
]
