"""Running statistics of one hook's activations, mergeable across chunks and workers.

The engine reduces every chunk it writes to one HookStats per hook and stores them in the
chunk's own object `chunks/<chunk>/<attempt>/stats.safetensors` (store format v2;
`encode_stats`), named by the commit record's `stats_path`, so commit records stay a few
KB whatever the hooks and widths. Format v1 records carried `{hook: stats.to_json()}`
inline under "stats"; both are read. Readers merge the committed chunks' statistics with
`HookStats.merge` (Chan et al.'s parallel update of the Welford sums), so the statistics
of a run never need a second pass over its data.

Everything is accumulated in float64 from the stored values, whatever their dtype. Two
counts ride along (absent from older stats objects, read as none): values that are not
finite as stored (`nonfinite`: a float16 overflow, say) and, for int8 runs, the per-token
relative L2 error of the stored values against the float32 the model computed
(`quant_error_max`, and `quant_error_sum` for its mean).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import safetensors.numpy

from actex.store.integrity import CorruptPartError

# Rows converted to float64 at a time: bounds the temporary memory of `from_array` to
# ROW_BLOCK * width * 8 bytes (32 MiB at width 512) whatever the chunk's size.
ROW_BLOCK = 8192

# Stored lists keep float32-like precision: enough for statistics, half the JSON of repr().
_JSON_DIGITS = 9


@dataclass(frozen=True)
class HookStats:
    """count, per-feature mean and sum of squared deviations (M2), and the sum of row L2 norms."""

    count: int
    mean: np.ndarray  # [width] float64
    m2: np.ndarray  # [width] float64: sum over rows of (x - mean)^2
    norm_sum: float  # sum over rows of ||x||_2
    nonfinite: int = 0  # values that are inf or NaN as stored (overflow of the stored dtype)
    quant_error_max: float | None = None  # int8: worst per-token ||stored - x|| / ||x||
    quant_error_sum: float | None = None  # int8: that error summed over rows (mean: / count)

    @property
    def width(self) -> int:
        return int(self.mean.shape[0])

    @property
    def variance(self) -> np.ndarray:
        """Population variance per feature, [width]."""
        return self.m2 / max(self.count, 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.variance)

    @property
    def quant_error_mean(self) -> float | None:
        return None if self.quant_error_sum is None else self.quant_error_sum / max(self.count, 1)

    @property
    def mean_l2_norm(self) -> float:
        return self.norm_sum / max(self.count, 1)

    @classmethod
    def empty(cls, width: int) -> HookStats:
        return cls(0, np.zeros(width), np.zeros(width), 0.0)

    @classmethod
    def from_array(cls, x: np.ndarray) -> HookStats:
        """Statistics of x [tokens, width] (any float dtype, bfloat16 included)."""
        if x.ndim != 2:
            raise ValueError(f"HookStats.from_array expects [tokens, width], got shape {x.shape}")
        if x.shape[0] == 0:
            return cls.empty(x.shape[1])
        return cls.merge_all(_block_stats(x[i : i + ROW_BLOCK]) for i in range(0, x.shape[0], ROW_BLOCK))

    def merge(self, other: HookStats) -> HookStats:
        """Statistics of the union of both sets of rows (Chan et al. pairwise update)."""
        if self.width != other.width:
            raise ValueError(f"cannot merge stats of width {self.width} with width {other.width}")
        counts = {"nonfinite": self.nonfinite + other.nonfinite,
                  "quant_error_max": _combine(max, self.quant_error_max, other.quant_error_max),
                  "quant_error_sum": _combine(sum, self.quant_error_sum, other.quant_error_sum)}
        if other.count == 0 or self.count == 0:
            return replace(self if other.count == 0 else other, **counts)
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return HookStats(n, mean, m2, self.norm_sum + other.norm_sum, **counts)

    @staticmethod
    def merge_all(parts: Iterable[HookStats]) -> HookStats:
        total = None
        for part in parts:
            total = part if total is None else total.merge(part)
        if total is None:
            raise ValueError("merge_all needs at least one HookStats")
        return total

    def to_json(self) -> dict:
        return {
            "count": self.count,
            "mean": _compact(self.mean),
            "m2": _compact(self.m2),
            "norm_sum": float(f"{self.norm_sum:.{_JSON_DIGITS + 6}g}"),
        }

    @classmethod
    def from_json(cls, record: dict) -> HookStats:
        try:
            mean = np.asarray(record["mean"], dtype=np.float64)
            m2 = np.asarray(record["m2"], dtype=np.float64)
            stats = cls(int(record["count"]), mean, m2, float(record["norm_sum"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"bad hook stats record: {err!r}") from None
        if mean.shape != m2.shape or mean.ndim != 1:
            raise ValueError(f"bad hook stats record: mean {mean.shape} and m2 {m2.shape} differ")
        return stats

    def summary(self) -> dict:
        """Scalars for `actex inspect` and logs."""
        summary = {
            "count": self.count,
            "mean_abs_mean": float(np.abs(self.mean).mean()) if self.width else 0.0,
            "mean_variance": float(self.variance.mean()) if self.width else 0.0,
            "mean_l2_norm": self.mean_l2_norm,
            "nonfinite": self.nonfinite,
        }
        if self.quant_error_max is not None:
            summary |= {"quant_error_max": self.quant_error_max, "quant_error_mean": self.quant_error_mean}
        return summary


def _combine(how, a: float | None, b: float | None) -> float | None:
    """max / sum of two optional figures (None: not recorded on that side)."""
    present = [v for v in (a, b) if v is not None]
    return how(present) if present else None


# Tensors per hook in a stats object: "<hook>/count" [1] int64, "<hook>/mean" and
# "<hook>/m2" [width] float64, "<hook>/norm_sum" [1] float64; "<hook>/nonfinite" [1] int64
# and, int8 runs only, "<hook>/quant_error_max" and "<hook>/quant_error_sum" [1] float64.
# Binary float64: exact, and ~8 bytes per value instead of ~17 of decimal JSON.
_FIELDS = ("count", "mean", "m2", "norm_sum", "nonfinite", "quant_error_max", "quant_error_sum")


def encode_stats(stats: Mapping[str, HookStats]) -> bytes:
    """A chunk's statistics as one safetensors object (any safetensors reader opens it)."""
    tensors = {}
    for hook, s in stats.items():
        tensors[f"{hook}/count"] = np.array([s.count], np.int64)
        tensors[f"{hook}/mean"] = np.ascontiguousarray(s.mean, np.float64)
        tensors[f"{hook}/m2"] = np.ascontiguousarray(s.m2, np.float64)
        tensors[f"{hook}/norm_sum"] = np.array([s.norm_sum], np.float64)
        tensors[f"{hook}/nonfinite"] = np.array([s.nonfinite], np.int64)
        if s.quant_error_max is not None:
            tensors[f"{hook}/quant_error_max"] = np.array([s.quant_error_max], np.float64)
            tensors[f"{hook}/quant_error_sum"] = np.array([s.quant_error_sum], np.float64)
    return safetensors.numpy.save(tensors)


def decode_stats(data: bytes, where: str = "stats.safetensors") -> dict[str, HookStats]:
    """Inverse of encode_stats; CorruptPartError (one line naming `where`) if it is not one."""
    try:
        tensors = safetensors.numpy.load(data)
        hooks = {name.rsplit("/", 1)[0] for name in tensors}
        return {hook: _decode_hook(tensors, hook) for hook in sorted(hooks)}
    except (safetensors.SafetensorError, KeyError, IndexError, ValueError) as err:
        raise CorruptPartError(f"{where}: not a stats object ({type(err).__name__}: {err})") from None


def _decode_hook(tensors: dict[str, np.ndarray], hook: str) -> HookStats:
    def scalar(field: str, kind=float):  # optional fields: None where an older writer left them out
        return kind(tensors[f"{hook}/{field}"][0]) if f"{hook}/{field}" in tensors else None

    return HookStats(int(tensors[f"{hook}/count"][0]), tensors[f"{hook}/mean"], tensors[f"{hook}/m2"],
                     scalar("norm_sum"), nonfinite=scalar("nonfinite", int) or 0,
                     quant_error_max=scalar("quant_error_max"), quant_error_sum=scalar("quant_error_sum"))


def _block_stats(x: np.ndarray) -> HookStats:
    x = x.astype(np.float64)  # [rows, width]
    mean = x.mean(axis=0)
    m2 = ((x - mean) ** 2).sum(axis=0)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # [rows]
    return HookStats(x.shape[0], mean, m2, float(norms.sum()))


def _compact(values: np.ndarray) -> list[float]:
    return [float(f"{v:.{_JSON_DIGITS}g}") for v in values.tolist()]
