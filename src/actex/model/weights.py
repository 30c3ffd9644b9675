"""Hugging Face checkpoints (safetensors, single or sharded) -> actex parameters.

No torch: tensors are read with safetensors' numpy backend (bfloat16 via ml_dtypes),
transposed to [in, out] and stacked over layers. Each parameter is built device shard by
device shard from file slices (get_slice), so the host never holds the checkpoint, only
one shard at a time (`loading_peak_bytes` states the bound; tests/test_model_mesh.py
measures it).
Every tensor the config implies is checked by name and shape before anything is stacked;
tensors the model does not use are an error, except an LM head (never computed here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from actex.model.config import ModelConfig
from actex.model.mesh import make_mesh, param_shardings
from actex.model.params import Params, global_param_axes, layer_param_axes
from actex.model.remote import fetch_checkpoint, is_remote

# Files a model needs: config, weights, tokenizer. Nothing else is downloaded.
HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# HF tensor name (after "model.layers.{i}.") -> (actex name, transposed to [in, out]).
_ATTENTION_NAMES = {
    "input_layernorm.weight": ("attn_norm", False),
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "self_attn.o_proj.bias": ("bo", False),
    "self_attn.q_norm.weight": ("q_norm", False),
    "self_attn.k_norm.weight": ("k_norm", False),
}
_LLAMA_NORMS = {"post_attention_layernorm.weight": ("mlp_norm", False)}
_GEMMA_NORMS = {
    "post_attention_layernorm.weight": ("post_attn_norm", False),
    "pre_feedforward_layernorm.weight": ("mlp_norm", False),
    "post_feedforward_layernorm.weight": ("post_mlp_norm", False),
}
_DENSE_MLP = {
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}
# Routed experts: the router, and each expert's tensors ("{e}" is the expert's index).
_QWEN_MOE = {
    "mlp.gate.weight": ("router", True),
    "mlp.experts.{e}.gate_proj.weight": ("we_gate", True),
    "mlp.experts.{e}.up_proj.weight": ("we_up", True),
    "mlp.experts.{e}.down_proj.weight": ("we_down", True),
}
_MIXTRAL_MOE = {
    "block_sparse_moe.gate.weight": ("router", True),
    "block_sparse_moe.experts.{e}.w1.weight": ("we_gate", True),
    "block_sparse_moe.experts.{e}.w3.weight": ("we_up", True),
    "block_sparse_moe.experts.{e}.w2.weight": ("we_down", True),
}
_GLOBAL_NAMES = {"embed_tokens.weight": "embed", "norm.weight": "final_norm"}
# Present in some checkpoints, never needed: the LM head, RoPE buffers, Gemma 3's vision tower.
_IGNORED = {"lm_head.weight"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_IGNORED_PARTS = ("vision_tower.", "multi_modal_projector.")
# Where the decoder's tensors live: causal LMs under "model.", Gemma 3's multimodal
# checkpoints under their language model.
_PREFIXES = ("model.", "", "model.language_model.", "language_model.model.")


def layerhf_tensor_names(config: ModelConfig) -> dict[str, tuple[str, bool]]:
    """HF tensor suffix within a layer -> (actex name, transposed), for `config`'s family."""
    names = _ATTENTION_NAMES | (_GEMMA_NORMS if config.gemma else _LLAMA_NORMS)
    if config.moe is None:
        return names | _DENSE_MLP
    return names | (_MIXTRAL_MOE if config.model_type == "mixtral" else _QWEN_MOE)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    params: Params
    path: Path  # local directory holding config, weights and tokenizer
    fingerprint: str  # sha256 of config.json + safetensors headers/index + revision
    dtype: str  # parameter dtype: "float32" or "bfloat16"
    files: tuple[Path, ...] = ()  # the weight files read (their checksums go in run.json: model/checksums.py)


class HubUnreachableError(ConnectionError):
    """The hub could not be reached and the cache holds no snapshot; the message says where."""


def resolve_model_dir(model: str, revision: str | None = None) -> tuple[Path, str]:
    """A local directory, a gs:// or s3:// folder (copied into a verified local cache, see
    model/remote.py), or a hub repo id downloaded into (or found in) the HF cache.

    Returns (directory, revision): "local" for a directory, else the snapshot's commit.
    With HF_HUB_OFFLINE=1 the cached snapshot is used without touching the network.
    Raises HubUnreachableError naming the model id and the cache folder looked in, and a
    one-line FileNotFoundError for a repo or revision the hub does not have.
    """
    if Path(model).is_dir():
        return Path(model), revision or "local"
    if is_remote(model):
        # A verified local copy, loaded as a local directory: same fingerprint as on disk.
        return fetch_checkpoint(model, HUB_PATTERNS), revision or "local"
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    at = f" at revision {revision}" if revision else ""
    try:
        path = Path(snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        cache = Path(constants.HF_HUB_CACHE) / f"models--{model.replace('/', '--')}"
        how = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face hub could not be reached"
        raise HubUnreachableError(
            f"--model {model}: {how}, and no cached snapshot{at} was found in {cache} "
            "(check the network, or set HF_HUB_CACHE / HF_HOME to where the model is cached)"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"--model {model}: the hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"--model {model}: no such model on the Hugging Face hub (private or gated models need "
            "`hf auth login` or HF_TOKEN)") from None
    # Snapshot folders are named after the commit they hold: the revision that was used.
    return path, path.name


def read_model_config(model_dir: Path) -> ModelConfig:
    """`model_dir/config.json` as a ModelConfig; one-line errors naming the file and field."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir}: config.json not found (is this a model directory?)")
    try:
        fields = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f" (line {error.lineno} column {error.colno}: {error.msg})" if isinstance(
            error, json.JSONDecodeError) else ""
        raise ValueError(f"{path}: not valid JSON{where}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(fields).__name__}")
    try:
        return ModelConfig.from_hf_config(fields)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _open_safetensors(path: Path):
    """safe_open with a one-line error naming the file (truncated, garbage, absurd header)."""
    try:
        return safe_open(path, framework="np")
    except SafetensorError as error:
        raise ValueError(f"{path}: not a valid safetensors file ({error})") from None


def _tensor_files(model_dir: Path) -> tuple[dict[str, Path], bytes]:
    """Tensor name -> file holding it, and the index bytes (b"" for one file)."""
    index = model_dir / INDEX_FILE
    if index.exists():
        index_bytes = index.read_bytes()
        try:
            weight_map = json.loads(index_bytes)["weight_map"]
            return {name: model_dir / file for name, file in weight_map.items()}, index_bytes
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}: not a safetensors index (a JSON object with a weight_map)") from None
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    with _open_safetensors(single) as f:
        return {name: single for name in f.keys()}, b""


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets): cheap to hash."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > os.fstat(f.fileno()).st_size - 8:  # never allocate what a bad header claims
            raise ValueError(f"{path}: not a valid safetensors file (header length {size} exceeds the file)")
        return f.read(size)


def fingerprint(model_dir: Path, files: set[Path], index_bytes: bytes, revision: str) -> str:
    """Identity of the weights without hashing gigabytes: headers fix every tensor's
    name, dtype, shape and byte offsets; the revision pins hub content."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    digest.update(index_bytes)
    for path in sorted(files):
        digest.update(path.name.encode())
        digest.update(_safetensors_header(path))
    digest.update(revision.encode())
    return digest.hexdigest()


def hf_tensor_names(config: ModelConfig, prefix: str) -> dict[str, tuple[str, int | None, int | None, bool]]:
    """Expected HF tensor name -> (actex name, layer or None, expert or None, transposed)."""
    wanted = {}
    layer_names = layer_param_axes(config)
    n_experts = config.moe.n_experts if config.moe else 0
    for hf_suffix, (name, transposed) in layerhf_tensor_names(config).items():
        if name not in layer_names:
            continue
        for layer in range(config.n_layers):
            at = f"{prefix}layers.{layer}.{hf_suffix}"
            if "{e}" in hf_suffix:
                for expert in range(n_experts):
                    wanted[at.format(e=expert)] = (name, layer, expert, transposed)
            else:
                wanted[at] = (name, layer, None, transposed)
    for hf_suffix, name in _GLOBAL_NAMES.items():
        wanted[prefix + hf_suffix] = (name, None, None, False)
    return wanted


_QKV_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")


def _check_names(found: dict[str, Path], wanted: dict, model_dir: Path, config: ModelConfig) -> None:
    for name in wanted:
        if name not in found:
            raise ValueError(f"{model_dir}: missing tensor {name!r}")
    for name, path in found.items():
        ignored = name in _IGNORED or name.endswith(_IGNORED_SUFFIXES) or any(p in name for p in _IGNORED_PARTS)
        if name not in wanted and not ignored:
            if name.endswith(_QKV_BIASES) and not config.qkv_bias:
                # e.g. a Qwen2 checkpoint relabelled "llama": computing it without its
                # biases would give wrong activations without any error.
                raise ValueError(
                    f"{path}: checkpoint has q/k/v biases ({name}) but {model_dir / 'config.json'} says "
                    f"model_type {config.model_type!r} without attention_bias: unsupported model "
                    "(set \"attention_bias\": true if the model uses them, as Qwen2 does)"
                )
            raise ValueError(f"{path}: unexpected tensor {name!r} for this config")


def _open_all(files: set[Path]):
    return {path: _open_safetensors(path) for path in files}


def _check_checkpoint(model_dir: Path, config: ModelConfig, lm_head: bool = False):
    """Names and shapes of every tensor against the config (headers only, no data read).

    Returns (HF name -> file, index bytes, expected HF name -> (actex name, layer, expert, transposed)).
    """
    found, index_bytes = _tensor_files(model_dir)
    prefix = next((p for p in _PREFIXES if f"{p}embed_tokens.weight" in found), "model.")
    wanted = hf_tensor_names(config, prefix)
    _check_names(found, wanted, model_dir, config)
    shapes = layer_param_axes(config) | global_param_axes(config)
    handles = _open_all(set(found.values()))

    def check_shape(hf_name: str, expected: tuple[int, ...]) -> None:
        stored = tuple(handles[found[hf_name]].get_slice(hf_name).get_shape())
        if stored != tuple(expected):
            raise ValueError(
                f"{found[hf_name]}: tensor {hf_name!r} has shape {list(stored)}, "
                f"expected {list(expected)} from config.json"
            )

    # Check every shape, including layers not kept and an untied LM head, before loading.
    for hf_name, (name, _, expert, transposed) in wanted.items():
        shape = shapes[name][0][1:] if expert is not None else shapes[name][0]  # one expert's
        check_shape(hf_name, shape[::-1] if transposed else shape)
    head = "lm_head.weight"
    if head in found:
        check_shape(head, (config.vocab_size, config.d_model))
    elif lm_head and not config.tie_word_embeddings:
        raise ValueError(f"{model_dir}: missing tensor {head!r} (untied embeddings; generation needs it)")
    return found, index_bytes, wanted


def _read_slice(path: Path, hf_name: str, index: tuple[slice, ...], transposed: bool, dtype) -> np.ndarray:
    """One tensor's [index] (in actex's [in, out] layout) from its file, as `dtype`.

    The file is opened for this read only: safetensors maps it, and pages a read touched
    stay resident (and count as this process's memory) until the map is closed.
    """
    stored_index = index[::-1] if transposed else index
    with safe_open(path, framework="np") as f:
        piece = f.get_slice(hf_name)[stored_index]
    return (piece.T if transposed else piece).astype(dtype, copy=False)


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple:
    return tuple(s.indices(n) for s, n in zip(index, shape))


def _place(shape: tuple[int, ...], sharding, read) -> jax.Array:
    """A global array built shard by shard: `read(index)` -> host numpy of that shard.

    Each distinct shard is read once, copied to every local device that holds it, and
    dropped before the next is read, so the host holds one shard at a time (unlike
    jax.make_array_from_callback, which gathers every shard of the array first).
    """
    by_index: dict[tuple, list] = {}
    indices = sharding.addressable_devices_indices_map(shape)
    for device, index in indices.items():
        by_index.setdefault(_index_key(index, shape), []).append((device, index))
    pieces = []
    for placements in by_index.values():
        host = read(placements[0][1])
        for device, _ in placements:
            pieces.append(jax.device_put(host, device))
        # Wait for the copies, so the host buffer can go before the next shard is read.
        jax.block_until_ready(pieces[-len(placements):])
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def load_params(
    model_dir: Path, config: ModelConfig, dtype, max_layers: int | None = None, shardings: Params | None = None,
    lm_head: bool = False,
) -> tuple[Params, bytes, set[Path]]:
    """Check the checkpoint, then build each parameter on its devices from file slices.

    shardings: NamedShardings in the parameters' tree (mesh.param_shardings); default one
    device. Only the slices this process's devices hold are read (safe_open().get_slice),
    one device shard at a time: see `loading_peak_bytes` for the host memory this takes.
    `lm_head` (generation only) also loads an untied LM head as params["lm_head"] [D, V];
    a tied one is the embedding, so nothing more is read.
    Returns (device arrays in actex's tree, index bytes, files read).
    """
    found, index_bytes, wanted = _check_checkpoint(model_dir, config, lm_head)
    n_keep = config.n_layers if max_layers is None else min(max_layers, config.n_layers)
    if shardings is None:
        shardings = param_shardings(config, make_mesh(1, devices=jax.devices()[:1]), n_keep)
    shapes = layer_param_axes(config) | global_param_axes(config)
    np_dtype = np.dtype(dtype)

    # actex name -> {(layer, expert or None): (HF name, transposed)} for the kept layers.
    by_name: dict[str, dict] = {}
    params: Params = {"layers": {}}
    for hf_name, (name, layer, expert, transposed) in wanted.items():
        if layer is None:
            params[name] = _place(
                shapes[name][0], shardings[name],
                lambda index, h=hf_name, t=transposed: _read_slice(found[h], h, index, t, np_dtype),
            )
        elif layer < n_keep:
            by_name.setdefault(name, {})[layer, expert] = (hf_name, transposed)

    for name, entries in by_name.items():
        # [L, ...] (experts: [L, E, ...]): one contiguous stack per weight kind, so the
        # blocks can be scanned.
        def read_stack(index, name=name, entries=entries):
            full = (n_keep, *shapes[name][0])
            out = np.empty([len(range(n)[s]) for s, n in zip(index, full)], np_dtype)
            per_expert = (0, None) not in entries
            for i, layer in enumerate(range(n_keep)[index[0]]):
                if not per_expert:
                    hf_name, transposed = entries[layer, None]
                    out[i] = _read_slice(found[hf_name], hf_name, index[1:], transposed, np_dtype)
                    continue
                for j, expert in enumerate(range(full[1])[index[1]]):
                    hf_name, transposed = entries[layer, expert]
                    out[i, j] = _read_slice(found[hf_name], hf_name, index[2:], transposed, np_dtype)
            return out

        params["layers"][name] = _place((n_keep, *shapes[name][0]), shardings["layers"][name], read_stack)
    if lm_head and not config.tie_word_embeddings:
        # Generation only: [D, V], read whole and replicated over the parameters' mesh.
        from jax.sharding import NamedSharding, PartitionSpec

        head = "lm_head.weight"
        params["lm_head"] = jax.device_put(
            _read_slice(found[head], head, (slice(None), slice(None)), True, np_dtype),
            NamedSharding(shardings["embed"].mesh, PartitionSpec()))
    return params, index_bytes, set(found.values())


def loading_peak_bytes(config: ModelConfig, shardings: Params, dtype, stored_dtype, n_layers: int) -> int:
    """Host memory `load_params` needs besides the parameters' own device buffers, bytes.

    = max over parameters of [one device's stacked shard in `dtype` (the buffer a shard is
    assembled in) + one layer's whole tensor in `stored_dtype` (the mapped file pages a
    strided slice touches) + one layer's slice in `dtype` (the cast)]. With the model axis
    M splitting a weight, its shard is 1/M of it; on one device it is the whole stacked
    weight (the largest is usually the embedding or a stacked MLP weight).
    On CPU the device buffers are host memory too: add sum(shard bytes) over devices.
    """
    shapes = layer_param_axes(config) | global_param_axes(config)
    item, stored_item = np.dtype(dtype).itemsize, np.dtype(stored_dtype).itemsize
    worst = 0
    for name, (shape, _) in shapes.items():
        stacked = name in layer_param_axes(config)
        full = (n_layers, *shape) if stacked else shape
        sharding = shardings["layers"][name] if stacked else shardings[name]
        shard = int(np.prod(sharding.shard_shape(full))) * item
        per_layer = int(np.prod(shape))
        one_slice = shard // n_layers if stacked else shard
        worst = max(worst, shard + per_layer * stored_item + one_slice)
    return worst


def param_dtype(config: ModelConfig, dtype: str | None) -> str:
    """The requested dtype, else the checkpoint's when supported, else float32."""
    chosen = dtype or (config.dtype if config.dtype in _DTYPES else "float32")
    if chosen not in _DTYPES:
        raise ValueError(f"dtype {chosen!r} not supported; expected one of {sorted(_DTYPES)}")
    return chosen


def load_model(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: str | None = None,
    max_layers: int | None = None,
    mesh=None,
    lm_head: bool = False,
) -> LoadedModel:
    """Load config and weights from a local directory or a hub repo id.

    `max_layers` keeps only the first blocks (enough for hooks up to that depth), which
    saves host and device memory on big models; shapes of all tensors are still checked.
    `mesh`: place parameters sharded over it (mesh.param_specs), reading only this
    process's slices; default one device.
    `lm_head` loads the LM head too (untied checkpoints), for `actex generate`.
    """
    model_dir, resolved_revision = resolve_model_dir(str(model), revision)
    config = read_model_config(model_dir)
    chosen = param_dtype(config, dtype)
    shardings = None
    if mesh is not None:
        n_keep = config.n_layers if max_layers is None else min(max_layers, config.n_layers)
        shardings = param_shardings(config, mesh, n_keep)
    params, index_bytes, files = load_params(model_dir, config, _DTYPES[chosen], max_layers, shardings,
                                             lm_head=lm_head)
    return LoadedModel(
        config=config,
        params=params,
        path=model_dir,
        fingerprint=fingerprint(model_dir, files, index_bytes, resolved_revision),
        dtype=chosen,
        files=tuple(sorted(files)),
    )


def load_tokenizer(path: str | os.PathLike):
    """The fast tokenizer stored next to the weights."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: no fast tokenizer (tokenizer.json) found")
    # The embedding lookup clamps out-of-range ids under jit (no error, wrong values), so a
    # tokenizer that can emit ids past the model's embedding is refused here.
    config_path = Path(path) / "config.json"
    if config_path.exists():
        vocab_size = json.loads(config_path.read_text()).get("vocab_size")
        if vocab_size is not None and len(tokenizer) > vocab_size:
            raise ValueError(
                f"{path}: tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                f"{vocab_size} rows (config.json vocab_size)"
            )
    return tokenizer
