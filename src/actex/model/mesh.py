"""Device mesh (data, model) and the partition specs of parameters and batches.

Parameters name their logical axes once (params.layer_param_axes / global_param_axes);
axes.AXIS_RULES maps those to mesh axes, Megatron style: attention heads, MLP width and
vocabulary are split over "model", rows of a batch over "data". On one device the mesh
is 1 x 1 and every spec is a no-op.

Layout across hosts (issue 13): devices are laid out process by process, so "data" spans
processes and the "model" axis stays within one process's devices whenever it fits there
(its collectives run on every layer, so they should ride the fast local links). A model
axis a multiple of one host's devices spans whole hosts instead: consecutive processes
form one model group (a model too big for one host), and every process of a group holds
the SAME rows of each batch (`process_rows` says which, and which process writes them).
Every global batch is built by `global_batch`, which is
`jax.make_array_from_process_local_data`: one process passes its own rows, so the same
call serves one host and a pod slice.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from actex.model.axes import AXIS_RULES, DATA, MODEL
from actex.model.config import ModelConfig
from actex.model.params import Params, global_param_axes, layer_param_axes, stacked_layers

# Weights may take this share of one device's memory when the model axis is chosen
# automatically; the rest holds activations (a [rows, seq, d_mlp] float32 intermediate
# at 16k tokens is 0.3 GB for the 0.5B shape, 1.2 GB for 7B) and the captured hooks.
WEIGHT_SHARE = 0.6


def _units(config: ModelConfig, axis: str, size: int) -> int:
    """How many indivisible units an axis of `size` elements holds: a head is split over
    devices whole or not at all, so heads/kv_heads count heads, not head_dim columns."""
    if axis == "heads":
        return config.n_heads
    if axis == "kv_heads":
        return config.n_kv_heads
    return size


def _spec(shape: tuple[int, ...], axes: tuple[str, ...], mesh: Mesh, config: ModelConfig) -> PartitionSpec:
    # An axis whose units do not divide evenly over its mesh axis stays replicated: 2 kv
    # heads on a model axis of 4 means every model device holds both kv heads (the k/v
    # projections are small, 1/group_size of q's), while q heads, MLP and vocab still split.
    names = []
    for size, axis in zip(shape, axes):
        mesh_axis = AXIS_RULES[axis]
        split = mesh_axis and _units(config, axis, size) % mesh.shape[mesh_axis] == 0
        names.append(mesh_axis if split else None)
    return PartitionSpec(*names)


def param_specs(config: ModelConfig, mesh: Mesh, n_layers: int | None = None) -> Params:
    """PartitionSpecs in the same tree as the parameters (layers stacked on axis 0)."""
    n_layers = config.n_layers if n_layers is None else n_layers
    layers = {  # none when no block was loaded (embedding-only hooks)
        name: _spec((n_layers, *shape), ("layers", *axes), mesh, config)
        for name, (shape, axes) in layer_param_axes(config).items()
    } if n_layers else {}
    specs = {name: _spec(shape, axes, mesh, config) for name, (shape, axes) in global_param_axes(config).items()}
    return {**specs, "layers": layers}


def param_shardings(config: ModelConfig, mesh: Mesh, n_layers: int | None = None) -> Params:
    """NamedShardings in the parameters' tree (what weights.py builds the arrays with)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(config, mesh, n_layers),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_spec() -> PartitionSpec:
    """token_ids / positions / segment_ids [rows, seq] and hook outputs [rows, seq, width]:
    rows over "data", everything else whole (so a stored hook always has its full width)."""
    return PartitionSpec(DATA)


# ------------------------------------------------------------------------ building


def _by_process(devices: Sequence) -> list[list]:
    """Devices grouped by process (host), processes in index order, ids within."""
    groups: dict[int, list] = {}
    for device in sorted(devices, key=lambda d: (d.process_index, d.id)):
        groups.setdefault(device.process_index, []).append(device)
    return [groups[p] for p in sorted(groups)]


def device_grid(devices: Sequence, model_parallel: int = 1, data: int | None = None) -> np.ndarray:
    """The [data, model] array of devices make_mesh builds (devices need only `id` and
    `process_index`, so the layout can be checked without a slice).

    Devices are taken process by process, ids in order, and cut into rows of
    `model_parallel`: a model group lies within one process when model_parallel divides
    each process's device count, else it is `model_parallel // per_process` consecutive
    whole processes. data: default every row; fewer keeps the first `data` rows.
    Raises ValueError (one line) for sizes that fit neither way, or that leave a process
    of a slice without a device.
    """
    if model_parallel < 1 or (data is not None and data < 1):
        raise ValueError(f"mesh sizes must be >= 1, got data={data} model={model_parallel}")
    groups = _by_process(devices)
    per_process = len(groups[0])
    even = all(len(g) == per_process for g in groups)
    within = per_process % model_parallel == 0
    across = model_parallel % per_process == 0 and len(groups) % (model_parallel // per_process) == 0
    if not even or not (within or across):
        if len(groups) == 1:
            raise ValueError(f"--mesh model={model_parallel} must divide this host's {per_process} device(s)")
        raise ValueError(
            f"--mesh model={model_parallel} must divide each host's {per_process} devices, or be "
            f"{per_process} x a divisor of the {len(groups)} hosts (a model group of whole hosts)"
        )
    grid = np.asarray([d for g in groups for d in g], dtype=object).reshape(-1, model_parallel)
    if data is not None:
        if data > grid.shape[0]:
            raise ValueError(
                f"--mesh data={data},model={model_parallel} needs {data * model_parallel} devices, "
                f"{len(devices)} available"
            )
        grid = grid[:data]
        left_out = sorted({d.process_index for d in devices} - {d.process_index for d in grid.flat})
        if len(groups) > 1 and left_out:
            raise ValueError(
                f"--mesh data={data},model={model_parallel} leaves process(es) {', '.join(map(str, left_out))} "
                "without a device; a slice's mesh must use every host"
            )
    return grid


def make_mesh(model_parallel: int = 1, devices=None, data: int | None = None) -> Mesh:
    """A (data, model) mesh: `model_parallel` devices per model group, of one process when
    they fit in one, else of consecutive whole processes (see device_grid).

    devices: default all of jax.devices(). data: default every device; fewer uses the
    first data * model_parallel devices (one host's share of each process first).
    Raises ValueError if the sizes do not fit the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(device_grid(devices, model_parallel, data), (DATA, MODEL))


@dataclass(frozen=True)
class RowShare:
    """Which rows of every global batch one process holds, and whether it writes them.

    The processes holding the same data rows (a model group spanning hosts; else one
    process alone) form one share; shares are numbered in data-axis order and hold equal
    numbers of rows, so share `index` of `count` packs 1/count of each step's rows.
    `writes`: this process is the first of its group (it holds replica 0 of its rows,
    the copy `local_rows` returns first); the others compute the same rows, store nothing.
    """

    index: int = 0
    count: int = 1
    writes: bool = True


def row_share(grid: np.ndarray, process: int) -> RowShare:
    """Process `process`'s RowShare in a [data, model] device grid (Mesh.devices).
    Raises ValueError when the process holds no device, or the grid mixes groups."""
    rows_of: dict[int, set[int]] = {}
    for (row, _), device in np.ndenumerate(grid):
        rows_of.setdefault(device.process_index, set()).add(row)
    if process not in rows_of:
        raise ValueError(f"process {process} holds no device of the mesh")
    shares = sorted({frozenset(rows) for rows in rows_of.values()}, key=min)
    if sum(map(len, shares)) != grid.shape[0] or len({len(s) for s in shares}) != 1:
        raise ValueError(f"the mesh's data rows do not split evenly over processes: {sorted(map(sorted, shares))}")
    mine = frozenset(rows_of[process])
    first_row = min(mine)
    # Replica 0 of a data row is on its first device (JAX numbers replicas in mesh order).
    return RowShare(shares.index(mine), len(shares), grid[first_row, 0].process_index == process)


@functools.lru_cache(maxsize=8)
def process_rows(mesh: Mesh, process: int | None = None) -> RowShare:
    """This process's (default jax.process_index()) RowShare of `mesh`."""
    return row_share(mesh.devices, jax.process_index() if process is None else process)


_MESH_RE = re.compile(r"^\s*(data|model)\s*=\s*(\d+)\s*$")


def parse_mesh(text: str | None) -> tuple[int | None, int | None]:
    """'data=4,model=2' / 'model=2' / 'auto' (or None) -> (data, model); None = choose."""
    if text is None or text.strip() in ("", "auto"):
        return None, None
    sizes: dict[str, int] = {}
    for part in text.split(","):
        match = _MESH_RE.match(part)
        if match is None or match.group(1) in sizes:
            raise ValueError(f"--mesh {text!r}: expected 'auto' or 'data=D,model=M' (e.g. data=4,model=2)")
        sizes[match.group(1)] = int(match.group(2))
    return sizes.get("data"), sizes.get("model")


def param_bytes(config: ModelConfig, dtype, n_layers: int | None = None) -> int:
    """Bytes of the parameters actex loads (no LM head) in `dtype`."""
    n_layers = config.n_layers if n_layers is None else n_layers
    per_layer = sum(math.prod(shape) for shape, _ in layer_param_axes(config).values())
    globals_ = sum(math.prod(shape) for shape, _ in global_param_axes(config).values())
    return (n_layers * per_layer + globals_) * np.dtype(dtype).itemsize


def device_memory(device) -> int | None:
    """Bytes one accelerator can hold, or None where the runtime does not say (CPU)."""
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return (stats or {}).get("bytes_limit")


def auto_model_parallel(weight_bytes: int, n_local: int, memory: int | None) -> int:
    """Smallest divisor M of the host's device count with weights / M <= WEIGHT_SHARE of
    one device's memory; 1 where memory is unknown (CPU: host RAM is shared anyway).
    Raises ValueError when even the whole host cannot hold the weights."""
    if memory is None:
        return 1
    for m in (d for d in range(1, n_local + 1) if n_local % d == 0):
        if weight_bytes / m <= WEIGHT_SHARE * memory:
            return m
    raise ValueError(
        f"the weights ({weight_bytes / 1e9:.1f} GB) do not fit this host's {n_local} devices "
        f"({memory / 1e9:.1f} GB each, {WEIGHT_SHARE:.0%} for weights); --mesh model=M with M a multiple "
        f"of {n_local} spans hosts"
    )


def choose_mesh(spec: str | None, config: ModelConfig, dtype, n_layers: int | None = None) -> Mesh:
    """The mesh `--mesh` asks for ('auto' / None: model axis from memory, data = the rest)."""
    data, model = parse_mesh(spec)
    local = jax.local_devices()
    if model is None:
        model = auto_model_parallel(param_bytes(config, dtype, n_layers), len(local), device_memory(local[0]))
    return make_mesh(model, data=data)


def describe(mesh: Mesh) -> str:
    """'data=4,model=2' (the --mesh spelling of this mesh)."""
    return f"data={mesh.shape[DATA]},model={mesh.shape[MODEL]}"


# ------------------------------------------------------------------------ placing


def global_batch(arrays, mesh: Mesh):
    """This process's rows -> global arrays with rows over "data".

    The one place batches become global arrays: each process passes only the rows of its
    own data shards (on one host: all rows; every process of a model group spanning hosts:
    the group's rows), as make_array_from_process_local_data wants.
    arrays: a pytree of [local_rows, ...] numpy arrays; local_rows must divide evenly over
    this process's data shards.
    """
    sharding = NamedSharding(mesh, batch_spec())
    # Every process of a model group passes the same rows: the shares, not the processes, add up.
    shares = process_rows(mesh).count

    def place(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * shares, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(place, arrays)


def shard_params(params: Params, config: ModelConfig, mesh: Mesh) -> Params:
    """Place parameters (host or device arrays) on the mesh according to param_specs."""
    specs = param_specs(config, mesh, stacked_layers(params))
    return jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), params, specs)


def shard_batch(arrays, mesh: Mesh):
    """Place [rows, ...] arrays with rows split over the data axis (single process)."""
    return global_batch(arrays, mesh)


def local_rows(array) -> np.ndarray:
    """This process's rows of a global [rows, ...] array with rows over "data", on the host.

    The inverse of `global_batch`: the rows this process passed in, in order. On one
    process that is the whole array; in a slice, one copy of each addressable data shard
    (shards repeat over "model"), ordered by row. Any process of a model group gets its
    group's rows (the copy with the lowest replica id it holds), though only the group's
    first process, the RowShare writer, needs them.
    """
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    copies: dict[int, object] = {}
    for shard in sorted(array.addressable_shards, key=lambda s: s.replica_id):
        copies.setdefault(shard.index[0].start or 0, shard)
    return np.concatenate([np.asarray(copies[start].data) for start in sorted(copies)], axis=0)


def model_within_process(mesh: Mesh) -> bool:
    """Whether every model group (a row of the mesh) lies on one process."""
    return all(len({d.process_index for d in row}) == 1 for row in mesh.devices)


def process_local(tree, mesh: Mesh):
    """The same arrays on this process's devices only: a mesh of its rows of `mesh`.

    For work one process does alone on a slice (decoding its share of prompts): arrays
    that are not split over "data" (parameters never are) hold whole copies on every
    process, so this process's shards already make the whole array. Raises ValueError
    when a model group spans processes (the process holds only part of each weight).
    Returns the tree of process-local arrays (the tree itself on one process).
    """
    if not model_within_process(mesh):
        raise ValueError("a model axis across processes holds part of each weight on each process; "
                         "this needs the model axis within one process")
    me = jax.process_index()
    rows = [r for r in range(mesh.devices.shape[0]) if mesh.devices[r][0].process_index == me]
    if len(rows) == mesh.devices.shape[0]:
        return tree
    local = Mesh(mesh.devices[rows], mesh.axis_names)

    def move(array: jax.Array) -> jax.Array:
        spec = array.sharding.spec
        if DATA in jax.tree.leaves(tuple(spec)):
            raise ValueError(f"an array split over {DATA!r} is not whole on one process")
        return jax.make_array_from_single_device_arrays(
            array.shape, NamedSharding(local, spec), [shard.data for shard in array.addressable_shards])

    return jax.tree.map(move, tree)

