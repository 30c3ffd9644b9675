"""RunConfig: the validated description of one extraction run, its canonical JSON and hash.

A run is identified by what defines its result (model, data, hooks, dtypes, packing, shard
size). Where the result goes (`output`), what the run is called and which worker computes
which chunk do not change a single byte of it, so they stay out of the hash: every worker of
a fleet, wherever it was started from, computes the same hash and the same run name.

Users give fields in a YAML/JSON file and/or as CLI flags (flags win). Two fields need the
checkpoint to be resolved: `layers` + `activation` become hook names (validated against the
model's depth) and a missing `compute_dtype` becomes the checkpoint's own dtype.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actex.data.config import DataConfig
from actex.model.hooks import hooks_for_layers, parse_hooks

StoredDtype = Literal["bfloat16", "float16", "float32"]
ComputeDtype = Literal["bfloat16", "float16", "float32"]

# Fields that say where/how a run is written or named, not what it contains. The model
# revision is pinned by run.json instead (the commit it resolved to when the run was
# created, see engine/extract.py): `--revision <that commit>`, a branch that still points
# there, or no --revision at all name the same run.
NOT_HASHED = frozenset({"output", "run_name", "revision"})


class ConfigError(ValueError):
    """A user-facing configuration problem; its message is one line."""


class RunConfig(BaseModel):
    """Everything that defines an extraction run. Frozen: derive, never mutate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="HF repo id or local checkpoint dir")
    revision: str | None = None
    data: DataConfig
    hooks: tuple[str, ...] = Field(min_length=1, description="canonical hook names")
    dtype: StoredDtype = "bfloat16"
    compute_dtype: ComputeDtype
    batch_tokens: int = Field(default=16384, ge=16, description="tokens per packed batch")
    chunk_size: int = Field(default=64, ge=1, description="samples per chunk")
    shard_size: int = Field(default=1_000_000_000, ge=1, description="max bytes per part")
    output: str = Field(description="store URL under which the run directory is created")
    run_name: str | None = None

    def canonical(self) -> dict:
        """JSON-ready dict of every field (defaults included), stable across processes."""
        return json.loads(canonical_json(self.model_dump(mode="json")))

    @property
    def config_hash(self) -> str:
        defining = {k: v for k, v in self.canonical().items() if k not in NOT_HASHED}
        return hashlib.sha256(canonical_json(defining).encode()).hexdigest()

    @property
    def name(self) -> str:
        """The run directory's name: given, or derived from the hash (same config, same name)."""
        return self.run_name or f"run-{self.config_hash[:12]}"

    @property
    def run_url(self) -> str:
        # "gs://bucket/" -> "gs://bucket/<name>"; a bare "memory://" keeps its slashes.
        base = self.output if self.output.endswith("://") else self.output.rstrip("/") + "/"
        return base + self.name


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace: equal values give equal strings (and equal hashes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def load_config_file(path: str | Path) -> dict:
    """Fields from a YAML or JSON file (JSON is YAML); a one-line ConfigError if unreadable."""
    path = Path(path)
    try:
        fields = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"config file {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML/JSON") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"config file {path}: expected a mapping of fields at the top level")
    return fields


def merge_fields(base: dict, overrides: dict) -> dict:
    """`overrides` win over `base`, recursively for nested dicts; None means 'not given'."""
    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            base_value = merged.get(key)
            merged[key] = merge_fields(base_value if isinstance(base_value, dict) else {}, value)
        else:
            merged[key] = value
    return merged


# Input-only fields: resolved into `hooks` by resolve_config.
HOOK_SELECTORS = ("layers", "activation")


def check_field_names(fields: dict) -> None:
    """Refuse unknown field names before anything slow (a model download) happens."""
    known = set(RunConfig.model_fields) | set(HOOK_SELECTORS)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    data_unknown = sorted(set(fields.get("data") or {}) - set(DataConfig.model_fields))
    if data_unknown:
        raise ConfigError(f"unknown data field(s) {', '.join(data_unknown)}; see DataConfig in actex.data.config")


def resolve_config(fields: dict, *, n_layers: int, checkpoint_dtype: str) -> RunConfig:
    """Turn user fields into a RunConfig for a checkpoint with `n_layers` blocks.

    `hooks` (list or comma-separated) or `layers` + `activation` (default residual) name the
    hook points; a missing `compute_dtype` is the checkpoint's. Raises ConfigError (one line).
    """
    fields = dict(fields)
    layers = fields.pop("layers", None)
    activation = fields.pop("activation", None)
    try:
        if fields.get("hooks") and layers is not None:
            raise ConfigError("give either hooks or layers/activation, not both")
        if layers is not None:
            fields["hooks"] = hooks_for_layers(layers, activation or "residual", n_layers)
        elif not fields.get("hooks"):
            raise ConfigError("no hooks given: pass --hooks NAMES or --layers RANGE")
        fields["hooks"] = parse_hooks(fields["hooks"], n_layers)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    fields.setdefault("compute_dtype", None)
    if fields["compute_dtype"] is None:
        fields["compute_dtype"] = checkpoint_dtype
    try:
        return RunConfig.model_validate(fields)
    except ValidationError as error:
        raise ConfigError(one_line(error)) from None


def one_line(error: ValidationError) -> str:
    """A pydantic error as one line: the first problem, with the field it is about."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "config"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"invalid config field {where}: {first['msg']}{more}"
