"""RunConfig: the validated description of one extraction run, its canonical JSON and hash.

A run is identified by what defines its result (model, data, hooks, dtypes, packing, shard
size). Where the result goes (`output`), what the run is called and which worker computes
which chunk do not change a single byte of it, so they stay out of the hash: every worker of
a fleet, wherever it was started from, computes the same hash and the same run name.

Users give fields as CLI flags, ACTEX_* environment variables and/or a YAML/JSON file, in
that order of precedence. The models here are the one source of those flags and variables
(names, help, defaults; see cli/options.py): a new field is a new flag and variable. Two
fields need the checkpoint to be resolved: `layers` + `activation` become hook names
(validated against the model's depth) and a missing `compute_dtype` becomes the
checkpoint's own dtype.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel, BeforeValidator, ByteSize, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator,
)

from actex.data.config import DataConfig, without_later_defaults
from actex.data.positions import ALL as ALL_POSITIONS, check_positions
from actex.data.sources import canonical_location
from actex.flag import Flag
from actex.model.hooks import ACTIVATIONS, BLOCK_HOOKS, hooks_for_layers, parse_hooks, parse_layers
from actex.store.layout import SAFE_NAME
from actex.store.records import reason

# int8: codes with a step per token and per block of 8 channels (docs/store.md, "int8 parts").
StoredDtype = Literal["bfloat16", "float16", "float32", "int8"]
# No float16 forward: the weight loader has none (and massive activations risk overflowing it).
# Refused here, by config validation, before the slow plan rather than after it.
ComputeDtype = Literal["bfloat16", "float32"]

# Fields that say where/how a run is written or named, not what it contains. The model
# revision is pinned by run.json instead (the commit it resolved to when the run was
# created, see engine/extract.py): `--revision <that commit>`, a branch that still points
# there, or no --revision at all name the same run.
NOT_HASHED = frozenset({"output", "run_name", "revision"})


def check_run_name(name: str) -> str:
    """`name` if it is a safe run name, else ValueError saying the rule (its repr is one line).

    A run name is joined to `output` and reaches shells (a fleet VM's startup script) and
    terminals: the store's rule for ids (layout.SAFE_NAME), one directory name of plain characters."""
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(f"{name!r} must be one directory name under output: letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit, at most 128 characters")
    return name


class ConfigError(ValueError):
    """A user-facing configuration problem; its message is one line."""


_BYTE_SIZE = TypeAdapter(ByteSize)


def parse_size(value: Any) -> Any:
    """'1GB', '512MB', '1.5g', '4096' -> bytes (decimal units; KiB/MiB/GiB binary); ints pass.

    pydantic's ByteSize reads the text; ValueError (one line) for text that is not a size.
    """
    if not isinstance(value, str):
        return value
    try:
        return int(_BYTE_SIZE.validate_python(value))
    except ValidationError:
        raise ValueError(f"{value!r} is not a size (e.g. 1GB, 512MB, 4096)") from None


# GenerationConfig fields that came after the first generation runs, at their defaults
# (greedy): left out of the canonical config so those runs keep their hash.
SAMPLING_DEFAULTS = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "sampling_seed": 0}


class GenerationConfig(BaseModel):
    """`actex generate`: decoding (greedy, or sampled with temperature / top-k / top-p)
    before capture. Its presence makes a run a generation run (run.json `kind: generate`);
    its fields are part of the config hash."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: Annotated[int, Flag(panel="Generation")] = Field(
        default=1024, ge=1,
        description="Most tokens generated per prompt; a 30x30 ARC grid takes ~950 with minimal digits.")
    stop_tokens: Annotated[tuple[str, ...], Flag(panel="Generation")] = Field(
        default=("<|im_end|>", "<|endoftext|>"),
        description="Token strings that end a row besides the tokenizer's EOS (chat end-of-turn); "
                    "ones the tokenizer lacks are ignored.")
    temperature: Annotated[float, Flag(panel="Generation")] = Field(
        default=0.0, ge=0.0, description="0 decodes greedily; above 0, tokens are sampled from softmax(logits / T).")
    top_k: Annotated[int, Flag(panel="Generation")] = Field(
        default=0, ge=0, description="Sample only among the K most likely tokens (0: all).")
    top_p: Annotated[float, Flag(panel="Generation")] = Field(
        default=1.0, gt=0.0, le=1.0, description="Sample only among the most likely tokens whose mass reaches P (1: all).")
    sampling_seed: Annotated[int, Flag(panel="Generation")] = Field(
        default=0, ge=0, description="Sampling seed: a sample's tokens depend only on (seed, sample id), "
                                     "so reruns, resumes and other meshes draw the same.")

    @model_validator(mode="after")
    def _sampling_needs_temperature(self) -> GenerationConfig:
        if self.temperature == 0 and (self.top_k or self.top_p < 1.0):
            raise ValueError("top_k / top_p only act when sampling: set temperature above 0 (0 decodes greedily)")
        return self


class RunConfig(BaseModel):
    """Everything that defines an extraction run. Frozen: derive, never mutate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Annotated[str, Flag(panel="Run")] = Field(description="Hugging Face repo id or local checkpoint directory.")
    revision: Annotated[str | None, Flag(panel="Run")] = Field(None, description="Model revision (hub branch, tag or commit).")
    data: DataConfig
    hooks: Annotated[tuple[str, ...], Flag(panel="Hooks")] = Field(
        min_length=1, description="Comma-separated hook names, e.g. blocks.12.hook_resid_post,blocks.12.mlp.hook_post.")
    dtype: Annotated[StoredDtype, Flag(panel="Hooks")] = Field("bfloat16", description="Stored activation dtype (int8: 8-bit codes with per-token, per-8-channel scales).")
    positions: Annotated[str, Flag(panel="Hooks")] = Field(
        ALL_POSITIONS, description="Tokens stored: all | skip-first:K (drop positions 0..K-1 of every window: the "
        "attention sinks) | sample:R (a random fraction R of each sample's tokens, drawn from data.seed and the "
        "sample id: the same on every rerun, resume and mesh).")
    compute_dtype: Annotated[ComputeDtype, Flag(panel="Hooks")] = Field(description="Forward dtype (default: the checkpoint's).")
    batch_tokens: Annotated[int, Flag(panel="Performance")] = Field(16384, ge=16, description="Tokens per packed batch.")
    chunk_size: Annotated[int, Flag(panel="Performance")] = Field(64, ge=1, description="Samples per chunk, the unit of commit and of resume.")
    shard_size: Annotated[int, BeforeValidator(parse_size), Flag(panel="Performance", text=True)] = Field(
        1_000_000_000, ge=1, description="Max bytes per part file, e.g. 1GB, 256MB.")
    output: Annotated[str, Flag(panel="Run")] = Field(description="Where runs go: a local dir, file://, gs://, s3:// or memory:// URL.")
    run_name: Annotated[str | None, Flag(panel="Run")] = Field(
        None, description="Run directory name under --output (default: run-<config hash>); one path segment.")

    @field_validator("positions")
    @classmethod
    def _token_selection(cls, text: str) -> str:
        return check_positions(text)

    @field_validator("run_name")
    @classmethod
    def _one_path_segment(cls, name: str | None) -> str | None:
        return None if name is None else check_run_name(name)

    # A flag of `actex generate` only (cli/generate.py), never of extract.
    generation: Annotated[GenerationConfig | None, Flag(skip=True)] = Field(
        default=None, description="Greedy generation settings (actex generate); absent for extraction.")

    @model_validator(mode="after")
    def _samples_generated(self) -> RunConfig:
        if self.generation is None and self.data.samples_per_prompt > 1:
            raise ValueError(f"data.samples_per_prompt {self.data.samples_per_prompt}: samples of one prompt differ "
                             "only when generated; use actex generate (extraction would store the same values again)")
        return self

    @model_validator(mode="after")
    def _prompt_room(self) -> RunConfig:
        if self.generation is not None and self.generation.max_new_tokens >= self.data.max_seq_len:
            raise ValueError(
                f"generation.max_new_tokens {self.generation.max_new_tokens} leaves no room for a prompt "
                f"within data.max_seq_len {self.data.max_seq_len}")
        return self

    @property
    def kind(self) -> str:
        """"generate" or "extract": recorded in run.json."""
        return "extract" if self.generation is None else "generate"

    def canonical(self) -> dict:
        """JSON-ready dict of every field (defaults included), stable across processes.

        An extraction run leaves out `generation` (None), so its hash is what it was
        before generation existed and older runs still resume; likewise generation fields
        added later (sampling) and `positions` are left out at their defaults.
        """
        fields = self.model_dump(mode="json")
        fields["data"] = without_later_defaults(fields["data"])
        if fields["positions"] == ALL_POSITIONS:
            del fields["positions"]  # every token, as every run stored before the field existed
        if fields["generation"] is None:
            del fields["generation"]
        else:
            for name, default in SAMPLING_DEFAULTS.items():
                if fields["generation"][name] == default:
                    del fields["generation"][name]
        return json.loads(canonical_json(fields))

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


class HookSelection(BaseModel):
    """Input-only fields another way to name `hooks`: resolved into them by resolve_config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: Annotated[str | None, Flag(panel="Hooks")] = Field(None, description="Layers for --activation: 'all', '0-23', '0,4,8'.")
    activation: Annotated[Literal[(*ACTIVATIONS, *BLOCK_HOOKS)] | None, Flag(panel="Hooks", text=True)] = Field(
        None, description="residual (hook_resid_post) | mlp (hook_mlp_out) | attn (hook_attn_out), or any block "
        "hook kind: attn.hook_z, mlp.hook_in, ln1.hook_normalized, ... (docs/models.md; default: residual).")


HOOK_SELECTORS = tuple(HookSelection.model_fields)


class WorkerOptions(BaseModel):
    """How this process takes part in a run: none of it changes what the run stores."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    worker_index: Annotated[int | None, Flag(panel="Workers")] = Field(
        None, ge=0, description="This worker's index (default: $TPU_WORKER_ID, $CLOUD_TPU_TASK_ID, $JOB_COMPLETION_INDEX or 0).")
    num_workers: Annotated[int, Flag(panel="Workers")] = Field(1, ge=1, description="Static split: chunk k goes to worker k mod N.")
    claim: Annotated[bool, Flag(panel="Workers")] = Field(False, description="Claim chunks dynamically with leases instead of the static split.")
    worker_host: Annotated[str | None, Flag(panel="Workers")] = Field(
        None, description="--claim mode: this worker's heartbeat id is <worker-host>-<pid> (default: the machine's hostname; TPU fleet VMs set their node name).")
    lease_seconds: Annotated[float, Flag(panel="Workers")] = Field(60.0, ge=1.0, description="Lease length in --claim mode; renewed every third of it.")
    preempt_deadline: Annotated[float, Flag(panel="Workers")] = Field(
        25.0, ge=0.1, description="On SIGTERM / GCE pre-emption notice: seconds to finish the in-flight chunk before abandoning it.")
    preempted_exit_code: Annotated[int, Flag(panel="Workers")] = Field(
        75, ge=0, le=255, description="Exit code when a signal or pre-emption stopped the worker before its share was done (default 75, EX_TEMPFAIL: rerun to resume).")
    stall_timeout: Annotated[float, Flag(panel="Workers")] = Field(
        1200.0, ge=1.0, description="Seconds without progress (no batch, part or commit) after which the worker stops renewing its leases and exits 1, so a fleet restarts it and another worker takes its chunk.")
    on_write_failure: Annotated[Literal["exit", "continue"], Flag(panel="Workers")] = Field(
        "exit", description="A chunk whose writes fail after retries: exit (stop the worker) | continue (leave it uncommitted, go on, exit 1 at the end).")
    # A multi-host pod slice (engine/distributed.py, docs/pod-slices.md).
    coordinator: Annotated[str | None, Flag(panel="Pod slice")] = Field(
        None, description="HOST:PORT of process 0's coordination service (default: $JAX_COORDINATOR_ADDRESS, "
        "or auto-detected on Cloud TPU / GKE).")
    num_processes: Annotated[int | None, Flag(panel="Pod slice")] = Field(
        None, ge=1, description="Processes in the slice (default: $JAX_NUM_PROCESSES, or auto-detected).")
    process_id: Annotated[int | None, Flag(panel="Pod slice")] = Field(
        None, ge=0, description="This process's index in the slice (default: $JAX_PROCESS_ID, or auto-detected).")
    init_timeout_s: Annotated[float, Flag(panel="Pod slice")] = Field(
        1800.0, gt=0, description="Seconds to wait for every process to join. Generous: after a pre-emption a "
        "slice's hosts restart cold at uneven times (image pull, install, model download).")
    heartbeat_timeout_s: Annotated[float, Flag(panel="Pod slice")] = Field(
        120.0, gt=0, description="Seconds without a heartbeat after which a process is declared dead and every "
        "other process aborts (exit 134).")
    barrier_timeout_s: Annotated[float, Flag(panel="Pod slice")] = Field(
        900.0, gt=0, description="Seconds an actex barrier (config agreement, each chunk's commit) waits before "
        "naming the processes that did not arrive.")
    log_json: Annotated[bool, Flag(panel="Output")] = Field(False, description="Structured JSON log lines on stderr instead of a progress bar.")
    progress: Annotated[bool | None, Flag(panel="Output")] = Field(None, description="Progress bar (default: when stderr is a TTY).")
    progress_every: Annotated[float, Flag(panel="Output")] = Field(
        30.0, ge=0.0, description="Without a progress bar (stderr not a TTY: nohup, sbatch, container logs): a plain "
        "progress line on stderr every this many seconds; 0: none.")


class DeviceConfig(BaseModel):
    """How THIS worker uses its devices. Not part of the run's identity (not in run.json,
    not hashed): workers of one run may differ here, and the stored values do not (up to
    float rounding: see docs/architecture.md, "Devices")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mesh: Annotated[str, Flag(panel="Performance")] = Field(
        default="auto",
        description="Device mesh: 'auto' (model axis the fewest devices of one host that hold the "
        "weights, the rest data) or 'data=D,model=M'. M divides each host's devices, or on a "
        "multi-host slice may be a multiple of them: a model group of whole hosts.",
    )
    attention: Annotated[Literal["auto", "blockwise", "splash", "pallas_gpu", "cudnn", "xla"], Flag(panel="Performance")] = Field(
        default="auto",
        description="Attention kernel: auto (splash on TPU, cuDNN/Pallas on GPU, blockwise on CPU) "
        "or one by name.",
    )


# Config-file / flag fields that go to DeviceConfig, not RunConfig.
DEVICE_FIELDS = tuple(DeviceConfig.model_fields)


def device_config(fields: dict) -> tuple[DeviceConfig, dict]:
    """Split DEVICE_FIELDS off user fields: (DeviceConfig, the rest). ConfigError if invalid."""
    rest = {k: v for k, v in fields.items() if k not in DEVICE_FIELDS}
    given = {k: fields[k] for k in DEVICE_FIELDS if fields.get(k) is not None}
    try:
        return DeviceConfig.model_validate(given), rest
    except ValidationError as error:
        raise ConfigError(one_line(error)) from None


def check_field_names(fields: dict) -> None:
    """Refuse unknown field names before anything slow (a model download) happens: every
    one at once, at every level, each with the nearest known name (a field one level off,
    such as a top-level max_seq_len, is suggested where it belongs)."""
    known = {*RunConfig.model_fields, *HOOK_SELECTORS, *DEVICE_FIELDS}
    sections = {"data": DataConfig, "generation": GenerationConfig}
    every = known | {f"{name}.{field}" for name, model in sections.items() for field in model.model_fields}
    unknown = [name for name in fields if name not in known]
    for section in sections:
        given = fields.get(section)
        if isinstance(given, dict):
            unknown += [f"{section}.{name}" for name in given if f"{section}.{name}" not in every]
    if unknown:
        listed = ", ".join(_with_suggestion(name, every) for name in unknown)
        raise ConfigError(f"unknown config field(s) {listed}; every field is listed in docs/config.md and "
                          "`actex extract --help`")


def _with_suggestion(name: str, known: set[str]) -> str:
    """'name (did you mean x?)' with the closest known dotted name, matched on the whole name,
    else on its last part (so a field given at the wrong level finds its place)."""
    by_leaf = {k.rpartition(".")[2]: k for k in known}
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    if not close:
        leaf = difflib.get_close_matches(name.rpartition(".")[2], by_leaf, n=1, cutoff=0.75)
        close = [by_leaf[leaf[0]]] if leaf else []
    return f"{name} (did you mean {close[0]}?)" if close else name


def with_dataset_location(fields: dict) -> dict:
    """`fields` with a local data.dataset at its canonical absolute location: the run's
    identity (hash, name) then follows the file, not how its path was spelt or where the
    command ran. The content is pinned separately, by the plan fingerprint in run.json."""
    data = fields.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("dataset"), str):
        return fields  # resolve_config reports what is missing
    return {**fields, "data": {**data, "dataset": canonical_location(data["dataset"])}}


def with_model_location(fields: dict) -> dict:
    """`fields` with a local model directory at its absolute location (symlinks resolved):
    run.json then names the checkpoint from any directory (verify, resume, other workers),
    and every spelling of it is one run. Hub ids and bucket URLs are kept as given."""
    model = fields.get("model")
    if not isinstance(model, str) or "://" in model or not os.path.isdir(os.path.expanduser(model)):
        return fields
    return {**fields, "model": os.path.realpath(os.path.expanduser(model))}


def respelt(config: RunConfig, dataset: str, model: str | None = None) -> RunConfig:
    """The same config with data.dataset (and model) spelt as given (another hash and run name)."""
    update = {"data": config.data.model_copy(update={"dataset": dataset})}
    if model is not None:
        update["model"] = model
    return config.model_copy(update=update)


def resolve_config(fields: dict, *, n_layers: int, checkpoint_dtype: str,
                   hook_kinds: tuple[str, ...] = BLOCK_HOOKS) -> RunConfig:
    """Turn user fields into a RunConfig for a checkpoint with `n_layers` blocks.

    `hooks` (list or comma-separated) or `layers` + `activation` (default residual) name the
    hook points; a missing `compute_dtype` is the checkpoint's. `hook_kinds`: the block hooks
    the checkpoint has (named when a hook is unknown). Raises ConfigError (one line).
    """
    fields = dict(fields)
    layers = fields.pop("layers", None)
    activation = fields.pop("activation", None)
    try:
        if fields.get("hooks") and layers is not None:
            raise ConfigError("give either hooks or layers/activation, not both")
        if layers is not None:
            fields["hooks"] = _layer_hooks(layers, activation or "residual", n_layers)
        elif not fields.get("hooks"):
            raise ConfigError("no hooks given: pass --hooks NAMES or --layers RANGE")
        fields["hooks"] = parse_hooks(fields["hooks"], n_layers, hook_kinds)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    fields.setdefault("compute_dtype", None)
    if fields["compute_dtype"] is None:
        fields["compute_dtype"] = checkpoint_dtype
    try:
        return RunConfig.model_validate(fields)
    except ValidationError as error:
        raise ConfigError(one_line(error)) from None


def _layer_hooks(layers: Any, activation: str, n_layers: int) -> list[str]:
    """hooks_for_layers, a refused layer selection naming --layers as given."""
    try:
        picked = parse_layers(layers, n_layers)
    except ValueError as error:
        raise ConfigError(f"--layers {layers}: {error}") from None
    return hooks_for_layers(picked, activation, n_layers)


def one_line(error: ValidationError) -> str:
    """A pydantic error as one line: the first problem, with the field it is about."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "config"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"invalid config field {where}: {reason(first)}{more}"
