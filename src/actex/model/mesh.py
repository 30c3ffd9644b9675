"""Device mesh (data, model) and the partition specs of parameters and batches.

Parameters name their logical axes once (qwen2.layer_param_axes / global_param_axes);
the table below maps those to mesh axes, Megatron style: attention heads, MLP width and
vocabulary are split over "model", rows of a batch over "data". On one device the mesh
is 1 x 1 and every spec is a no-op.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from actex.model.qwen2 import ModelConfig, Params, global_param_axes, layer_param_axes, stacked_layers

DATA, MODEL = "data", "model"

# logical axis -> mesh axis (None: replicated)
AXIS_RULES: dict[str, str | None] = {
    "layers": None,
    "embed": None,
    "vocab": MODEL,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "head_dim": None,
}


def make_mesh(model_parallel: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all), model axis of the given size."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % model_parallel:
        raise ValueError(f"{len(devices)} devices not divisible by model_parallel={model_parallel}")
    grid = np.asarray(devices).reshape(len(devices) // model_parallel, model_parallel)
    return Mesh(grid, (DATA, MODEL))


def _spec(shape: tuple[int, ...], axes: tuple[str, ...], mesh: Mesh) -> PartitionSpec:
    # An axis that does not divide evenly (2 kv heads on 4 devices) stays replicated.
    names = []
    for size, axis in zip(shape, axes):
        mesh_axis = AXIS_RULES[axis]
        names.append(mesh_axis if mesh_axis and size % mesh.shape[mesh_axis] == 0 else None)
    return PartitionSpec(*names)


def param_specs(config: ModelConfig, mesh: Mesh, n_layers: int | None = None) -> Params:
    """PartitionSpecs in the same tree as the parameters (layers stacked on axis 0)."""
    n_layers = config.n_layers if n_layers is None else n_layers
    layers = {  # none when no block was loaded (embedding-only hooks)
        name: _spec((n_layers, *shape), ("layers", *axes), mesh)
        for name, (shape, axes) in layer_param_axes(config).items()
    } if n_layers else {}
    specs = {name: _spec(shape, axes, mesh) for name, (shape, axes) in global_param_axes(config).items()}
    return {**specs, "layers": layers}


def batch_spec() -> PartitionSpec:
    """token_ids / positions / segment_ids [rows, seq] and hook outputs [rows, seq, width]."""
    return PartitionSpec(DATA)


def shard_params(params: Params, config: ModelConfig, mesh: Mesh) -> Params:
    """Place parameters on the mesh according to param_specs."""
    specs = param_specs(config, mesh, stacked_layers(params))
    return jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), params, specs)


def shard_batch(arrays, mesh: Mesh):
    """Place [rows, ...] arrays with rows split over the data axis."""
    sharding = NamedSharding(mesh, batch_spec())
    return jax.tree.map(lambda x: jax.device_put(x, sharding), arrays)
