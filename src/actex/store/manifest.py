"""run.json: what a run contains, written once, checked by every worker before any work.

The first worker to arrive creates run.json with a conditional create; every later worker
(and every rerun) reads it back and refuses to run unless its own manifest has the same
identity: config hash, model / tokenizer / plan fingerprints, hooks and plan. The error
names each differing field of the config (else, when only derived fields differ, those) with
both values, one field per line. It also
refuses, in one line naming the file, a checkpoint whose weight files' checksums differ
from those the run recorded (a checkpoint overwritten mid-run must not mix two models).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import Field, field_validator

from actex.version import __version__
from actex.store import layout
from actex.store.folder import Store
from actex.store.records import MAX_MANIFEST_BYTES, Record, differing_fields, parse_record, record_bytes


# Config fields that say where a run lives, not what it is (the config hash leaves them out
# too: actex.config.NOT_HASHED, not imported here to keep the store free of the model's
# imports). `--output gs://b/runs/` and `gs://b/runs`, or no --run-name and the name it
# derives, reach the same run.
LOCATION_FIELDS = frozenset({"output", "run_name"})
# What run.json lists of the skipped rows: enough to find them, small enough for every worker to read.
SKIPPED_ROWS_LISTED = 1000
PROVENANCE = ("created_at", "actex_version", "skipped_rows", "skipped_row_list")


class ManifestMismatchError(ValueError):
    """This worker's run identity differs from the stored run.json. Message: one line per
    differing field. `url`: the run's; `diffs`: (path, stored, given) of the fields listed
    (see mismatch_diffs), for a caller that names them its own way (the CLI, by flag)."""

    def __init__(self, message: str, url: str = "", diffs: tuple[tuple[str, Any, Any], ...] = ()) -> None:
        super().__init__(message)
        self.url, self.diffs = url, diffs


class CheckpointMismatchError(ManifestMismatchError):
    """The checkpoint this worker loaded is not the one the run was made with. Message: one
    line naming the weight file."""


class HookSpec(Record):
    name: str
    width: int
    dtype: str          # stored dtype: bfloat16 | float16 | float32 | int8


class PlanSummary(Record):
    num_samples: int
    chunk_size: int
    num_chunks: int
    fingerprint: str


class RunManifest(Record):
    config: dict[str, Any]            # the full canonical config
    config_hash: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    hooks: tuple[HookSpec, ...]
    plan: PlanSummary
    kind: str = "extract"             # "extract" or "generate" (greedy decoding, then capture)
    format_version: int = layout.FORMAT_VERSION
    # Provenance only: excluded from the identity check.
    created_at: float = Field(default_factory=time.time)
    actex_version: str = __version__
    skipped_rows: dict[str, int] = {}  # rows skipped by --on-bad-row skip, by reason
    # ... and the first SKIPPED_ROWS_LISTED of them, each {source, row, index, reason}, so a
    # user can find them again (the counts above blank the numbers to group alike reasons).
    skipped_row_list: tuple[dict[str, Any], ...] = ()
    # {weight file: "crc32c:<8 hex>"} of the checkpoint the run was created from (see
    # model/checksums.py). Checked apart from the identity, so that runs created before it
    # existed (absent: {}) still resume.
    weights: dict[str, str] = {}

    @field_validator("format_version")
    @classmethod
    def _readable(cls, version: int) -> int:
        if version not in layout.READABLE_FORMATS:
            raise ValueError(f"format_version {version!r}, this actex reads {', '.join(map(str, layout.READABLE_FORMATS))}")
        return version

    def identity(self) -> dict[str, Any]:
        """Everything that must agree between workers of one run."""
        full = self.to_dict()
        full["config"] = {k: v for k, v in self.config.items() if k not in LOCATION_FIELDS}
        return {k: v for k, v in full.items() if k not in PROVENANCE and k != "weights"}

    def to_dict(self) -> dict[str, Any]:
        """The JSON object run.json holds (`weights` only when recorded)."""
        return self.model_dump(mode="json", exclude=set() if self.weights else {"weights"})

    def to_json(self) -> bytes:
        return record_bytes(self.to_dict(), indent=2) + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str = layout.MANIFEST) -> RunManifest:
        """run.json's bytes; ValueError naming `where` if over MAX_MANIFEST_BYTES, not a run
        manifest, or of a format this actex does not read."""
        return parse_record(cls, data, where, "run manifest", MAX_MANIFEST_BYTES)


def mismatch_diffs(ours: Mapping[str, Any], stored: Mapping[str, Any]) -> tuple[tuple[str, Any, Any], ...]:
    """(path, stored, given) of what differs between two identities: the config's own
    fields ("config.chunk_size", a list as a whole) when any differ, as those are what a
    user changes; else the fields derived from the config and checkpoint (hashes,
    fingerprints, hook widths), which then are what tells the runs apart."""
    config = differing_fields(ours.get("config"), stored.get("config"), "config.", whole_lists=True)
    diffs = config or differing_fields(ours, stored)
    return tuple((path, theirs, given) for path, given, theirs in diffs)


def mismatch_message(url: str, diffs: tuple[tuple[str, Any, Any], ...], *,
                     name: Callable[[str], str] = lambda path: path,
                     shown: Callable[[str, Any], str] | None = None) -> str:
    """One line per differing field, `name: stored (stored) -> given (given)`, long hex
    digests cut to 12 characters. `name(path)` spells a field (the CLI: as its flag);
    `shown(path, value)` spells a value (the CLI: an omitted one as its default)."""
    shown = shown or (lambda path, value: spelt_value(value))
    lines = [f"  {name(path)}: {shown(path, stored)} (stored) -> {shown(path, given)} (given)"
             for path, stored, given in diffs]
    return "\n".join([f"{url} holds a different run ({len(diffs)} field(s) differ, stored -> given):", *lines,
                      "Use another --output or --run-name, or the stored config."])


def spelt_value(value: Any) -> str:
    """A stored JSON value as a user types it: 0.8, float32, a,b (a list), none."""
    value = _short(value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ",".join(map(spelt_value, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value) if value != "" else "''"


def _short(value: Any) -> Any:
    """A sha256 hex digest as its first 12 characters (enough to tell two apart)."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    return value


def read_manifest(store: Store) -> RunManifest:
    """The stored run.json; FileNotFoundError if the run was never started, ValueError
    naming it if it is not one (see RunManifest.from_json)."""
    return RunManifest.from_json(store.read_bytes(layout.MANIFEST), store.url_of(layout.MANIFEST))


def check_manifest(store: Store, ours: RunManifest, stored: RunManifest) -> None:
    """Raise CheckpointMismatchError (one line) if our checkpoint differs from the run's,
    else ManifestMismatchError (a line per field) if our identity differs from it."""
    check_weights(store.url_of(layout.MANIFEST), ours.weights, stored.weights)
    diffs = mismatch_diffs(ours.identity(), stored.identity())
    if diffs:
        raise ManifestMismatchError(mismatch_message(store.url, diffs), store.url, diffs)


def check_weights(where: str, ours: Mapping[str, str], stored: Mapping[str, str]) -> None:
    """Our weight files' checksums against those `where` (run.json) recorded. A run created
    before checksums were recorded (`stored` empty) accepts any checkpoint, as it did."""
    if not ours or not stored:
        return
    for name in sorted(set(ours) | set(stored)):
        if ours.get(name) != stored.get(name):
            got = "missing" if name not in ours else ours[name]
            raise CheckpointMismatchError(
                f"{name}: this checkpoint's file is {got}, but {where} records {stored.get(name, 'no such file')}: "
                "the weights changed since the run started (join it with the checkpoint it was made from, "
                "or start another run with --run-name)")


def open_or_create_manifest(store: Store, ours: RunManifest) -> RunManifest:
    """Create run.json from `ours`, or validate `ours` against the one already there.

    Returns the stored manifest (ours if we created it). Raises CheckpointMismatchError or
    ManifestMismatchError before any work is done when they differ.
    """
    if store.create_exclusive(layout.MANIFEST, ours.to_json()):
        return ours
    stored = read_manifest(store)
    check_manifest(store, ours, stored)
    return stored
