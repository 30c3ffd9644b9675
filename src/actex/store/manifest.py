"""run.json: what a run contains, written once, checked by every worker before any work.

The first worker to arrive creates run.json with a conditional create; every later worker
(and every rerun) reads it back and refuses to run unless its own manifest has the same
identity: config hash, model / tokenizer / plan fingerprints, hooks and plan. The error
names each differing field as a dotted path with both values, on one line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from actex import __version__
from actex.store import layout
from actex.store.folder import Store


# Config fields that say where a run lives, not what it is (the config hash leaves them out
# too: actex.config.NOT_HASHED, not imported here to keep the store free of the model's
# imports). `--output gs://b/runs/` and `gs://b/runs`, or no --run-name and the name it
# derives, reach the same run.
LOCATION_FIELDS = frozenset({"output", "run_name"})
# What run.json lists of the skipped rows: enough to find them, small enough for every worker to read.
SKIPPED_ROWS_LISTED = 1000
PROVENANCE = ("created_at", "actex_version", "skipped_rows", "skipped_row_list")


class ManifestMismatchError(ValueError):
    """This worker's run identity differs from the stored run.json. Message: one line."""


@dataclass(frozen=True)
class HookSpec:
    name: str
    width: int
    dtype: str          # stored dtype: bfloat16 | float16 | float32


@dataclass(frozen=True)
class PlanSummary:
    num_samples: int
    chunk_size: int
    num_chunks: int
    fingerprint: str


@dataclass(frozen=True)
class RunManifest:
    config: dict[str, Any]            # the full canonical config
    config_hash: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    hooks: tuple[HookSpec, ...]
    plan: PlanSummary
    kind: str = "extract"             # "extract" or "generate" (greedy decoding, then capture)
    format_version: int = layout.FORMAT_VERSION
    # Provenance only: excluded from the identity check.
    created_at: float = field(default_factory=time.time)
    actex_version: str = __version__
    skipped_rows: dict[str, int] = field(default_factory=dict)  # rows skipped by --on-bad-row skip, by reason
    # ... and the first SKIPPED_ROWS_LISTED of them, each {source, row, index, reason}, so a
    # user can find them again (the counts above blank the numbers to group alike reasons).
    skipped_row_list: tuple[dict[str, Any], ...] = ()

    def identity(self) -> dict[str, Any]:
        """Everything that must agree between workers of one run."""
        full = self.to_dict()
        full["config"] = {k: v for k, v in self.config.items() if k not in LOCATION_FIELDS}
        return {k: v for k, v in full.items() if k not in PROVENANCE}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "kind": self.kind,
            "config": self.config,
            "config_hash": self.config_hash,
            "model_fingerprint": self.model_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "hooks": [{"name": h.name, "width": h.width, "dtype": h.dtype} for h in self.hooks],
            "plan": {
                "num_samples": self.plan.num_samples,
                "chunk_size": self.plan.chunk_size,
                "num_chunks": self.plan.num_chunks,
                "fingerprint": self.plan.fingerprint,
            },
            "created_at": self.created_at,
            "actex_version": self.actex_version,
            "skipped_rows": self.skipped_rows,
            "skipped_row_list": list(self.skipped_row_list),
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = layout.MANIFEST) -> RunManifest:
        version = d.get("format_version")
        if version not in layout.READABLE_FORMATS:
            raise ValueError(f"{where}: format_version {version!r}, this actex reads "
                             f"{', '.join(map(str, layout.READABLE_FORMATS))}")
        try:
            return cls(
                config=dict(d["config"]),
                config_hash=str(d["config_hash"]),
                model_fingerprint=str(d["model_fingerprint"]),
                tokenizer_fingerprint=str(d["tokenizer_fingerprint"]),
                hooks=tuple(HookSpec(str(h["name"]), int(h["width"]), str(h["dtype"])) for h in d["hooks"]),
                plan=PlanSummary(**{k: d["plan"][k] for k in ("num_samples", "chunk_size", "num_chunks", "fingerprint")}),
                kind=str(d.get("kind", "extract")),
                format_version=version,
                created_at=float(d.get("created_at", 0.0)),
                actex_version=str(d.get("actex_version", "")),
                skipped_rows={str(k): int(v) for k, v in d.get("skipped_rows", {}).items()},
                skipped_row_list=tuple(dict(row) for row in d.get("skipped_row_list", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: not a run manifest ({type(exc).__name__}: {exc})") from None


def diff_fields(ours: Any, stored: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, ours, stored) for every leaf where two JSON values differ; lists by index."""
    if isinstance(ours, Mapping) and isinstance(stored, Mapping):
        out = []
        for key in sorted(set(ours) | set(stored), key=str):
            out += diff_fields(ours.get(key), stored.get(key), f"{prefix}{key}.")
        return out
    if isinstance(ours, list) and isinstance(stored, list) and len(ours) == len(stored):
        out = []
        for i, (a, b) in enumerate(zip(ours, stored)):
            out += diff_fields(a, b, f"{prefix}{i}.")
        return out
    return [] if ours == stored else [(prefix.rstrip("."), ours, stored)]


def mismatch_message(url: str, diffs: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """One line a person can read: the config fields that differ first (the hashes and
    fingerprints after them follow from those), long hex digests cut to 12 characters."""
    diffs = sorted(diffs, key=lambda diff: not diff[0].startswith("config."))
    shown = "; ".join(f"{path}: ours {_short(a)!r} vs stored {_short(b)!r}" for path, a, b in diffs[:limit])
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return f"{url} holds a different run: {shown}{more}. Use another --output or --run-name, or the stored config."


def _short(value: Any) -> Any:
    """A sha256 hex digest as its first 12 characters (enough to tell two apart)."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    return value


def read_manifest(store: Store) -> RunManifest:
    """The stored run.json; FileNotFoundError if the run was never started."""
    data = store.read_bytes(layout.MANIFEST)
    try:
        raw = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{store.url_of(layout.MANIFEST)}: bad JSON ({exc.msg} at line {exc.lineno})") from None
    return RunManifest.from_dict(raw, where=store.url_of(layout.MANIFEST))


def check_manifest(store: Store, ours: RunManifest, stored: RunManifest) -> None:
    diffs = diff_fields(ours.identity(), stored.identity())
    if diffs:
        raise ManifestMismatchError(mismatch_message(store.url, diffs))


def open_or_create_manifest(store: Store, ours: RunManifest) -> RunManifest:
    """Create run.json from `ours`, or validate `ours` against the one already there.

    Returns the stored manifest (ours if we created it). Raises ManifestMismatchError
    before any work is done when the identities differ.
    """
    if store.create_exclusive(layout.MANIFEST, ours.to_json()):
        return ours
    stored = read_manifest(store)
    check_manifest(store, ours, stored)
    return stored
