"""Token selection (`--positions`): which positions of each sample are stored.

    all            every token (the default)
    skip-first:K   drop positions 0..K-1 of every forward window: the attention-sink
                   tokens SAE trainers usually exclude (each window of a split long
                   sample restarts at position 0 and has its own sink)
    sample:R       keep a fraction R (0 < R <= 1) of the positions, chosen at random

The random choice is a pure function of (seed, sample id, token index in the sample):
a 64-bit splitmix hash of the three, kept where hash / 2^64 < R. It never depends on how
samples were packed into batches, so a rerun, a resumed chunk and another mesh or slice
store exactly the same tokens, and another tool can recompute the choice (docs/store.md).
Every forward still sees the whole window: selection only decides which rows are stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from actex.data.packing import PackedBatch

ALL = "all"
_SPELLING = re.compile(r"^(?:(all)|skip-first:(\d+)|sample:(\d*\.?\d+(?:e-?\d+)?))$")

# splitmix64's constants (Steele, Lea, Flood 2014): a golden-ratio increment and two
# multipliers of its finaliser; any good 64-bit mixer would do, this one is well known.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def check_positions(text: str) -> str:
    """`text` in its canonical spelling ('sample:0.250' -> 'sample:0.25'), or ValueError
    (one line) saying the accepted forms."""
    match = _SPELLING.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a token selection: use all, skip-first:K (K >= 1) or sample:R (0 < R <= 1)")
    if match.group(1):
        return ALL
    if match.group(2) is not None:
        first = int(match.group(2))
        if first < 1:
            raise ValueError(f"{text!r}: skip-first needs K >= 1 (all keeps every position)")
        return f"skip-first:{first}"
    rate = float(match.group(3))
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"{text!r}: sample needs a fraction R with 0 < R <= 1")
    return f"sample:{rate!r}"


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, sample_id: int, index: np.ndarray) -> np.ndarray:
    """[n] float64 in [0, 1): the hash of (seed, sample id, index) for each token index."""
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed], np.uint64) * _GOLDEN + np.array([sample_id], np.uint64))
        values = _mix(key + (np.asarray(index, np.uint64) + np.uint64(1)) * _GOLDEN)
    return (values >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class PositionSelection:
    """A parsed `--positions` with the run's seed (data.seed): `keep` says which tokens of a
    window are stored."""

    spelling: str = ALL
    seed: int = 0

    @property
    def everything(self) -> bool:
        return self.spelling == ALL

    def keep(self, sample_id: int, window_start: int, length: int) -> np.ndarray | None:
        """[length] bool: the stored tokens of the window starting at `window_start` in the
        sample (positions 0..length-1 of that window); None where every one is stored."""
        kind, _, value = self.spelling.partition(":")
        if kind == "skip-first":
            return np.arange(length) >= int(value)
        if kind == "sample":
            return uniform(self.seed, sample_id, window_start + np.arange(length)) < float(value)
        return None

    def mask(self, batch: PackedBatch) -> np.ndarray:
        """[rows, seq] bool: the tokens of a packed batch that are stored (padding never is)."""
        stored = batch.segment_ids > 0
        if self.everything:
            return stored
        for placement in batch.placements:
            keep = self.keep(placement.sample_id, placement.start_in_sample, placement.length)
            if keep is not None:
                stored[placement.row, placement.col : placement.col + placement.length] = keep
        return stored


EVERY_POSITION = PositionSelection()
