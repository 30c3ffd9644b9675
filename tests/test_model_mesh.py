"""Every device of a host: meshes store what one device stores, sharded loading stays within
its stated host memory, attention kernels equal the blockwise one, backends per platform.

The multi-device checks run in ONE subprocess with 8 host-platform devices
(tests/mesh_runs.py); the tests below read its JSON report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from engine_fixtures import run_fields, text_dataset, tiny_model_dir, jax_cache  # noqa: F401

from actex.model.attention import resolve_backend
from actex.model.mesh import WEIGHT_SHARE, RowShare, auto_model_parallel, device_grid, parse_mesh, row_share

TESTS = Path(__file__).parent
MESHES = ("data=8,model=1", "data=4,model=2", "data=2,model=4", "data=1,model=8")

# float32 values of a mesh vs one device, relative to the hook's largest |value|. Not
# bit-identical: rows are packed into a different [rows, seq] shape per data-axis size, so
# a sample's keys fall into different attention tiles (another order of the online-softmax
# sums) and XLA:CPU picks another matmul blocking; a split model axis sums the partial
# products of wo / w_down over devices (another order again). Each is a few float32 ulps
# (1.2e-7) per operation; observed <= 1e-6 over two layers, 32 ulps allowed.
REL_BOUND = 4e-6
# Slack over the stated loading bound: allocator granularity and the runtime's own buffers.
RSS_SLACK = 32 * 2**20


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("mesh")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(TESTS / "mesh_runs.py"), str(work), "loading", "extract", "attention"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES)
def test_every_mesh_stores_what_one_device_stores(report, mesh):
    entry = report["extract"]["meshes"][mesh]
    assert entry["samples"], "a mesh stored other samples than one device"
    data, model = (int(part.split("=")[1]) for part in mesh.split(","))
    assert entry["mesh"] == {"data": data, "model": model}
    # Embedding lookups are gathers: exact whatever the mesh (vocab split over "model" too).
    assert entry["identical"]["hook_embed"] and entry["identical"]["blocks.0.hook_resid_pre"]
    worst = {hook: rel for hook, rel in entry["max_rel"].items() if rel > REL_BOUND}
    assert not worst, f"{mesh}: hooks off by more than {REL_BOUND} (relative): {worst}"
    # A long prompt (~1,900 tokens, several 512-token attention blocks) is among the samples,
    # and every chunk's batches had a multiple of the data-axis size in rows.
    assert max(entry["tokens"]) > 2000
    assert all(slots % (data * 128) == 0 for slots in entry["slots"])


def test_kv_heads_fewer_than_the_model_axis_are_replicated(report):
    """8 query heads, 2 kv heads: q heads split on every model axis, kv heads only on 2."""
    meshes = report["extract"]["meshes"]
    assert meshes["data=4,model=2"]["wk_spec"] == "P(None, None, 'model')"
    for mesh in ("data=2,model=4", "data=1,model=8"):
        assert meshes[mesh]["wk_spec"] == "P(None, None, None)"
        assert meshes[mesh]["wq_spec"] == "P(None, None, 'model')"


def test_sharded_loading_peak_rss_within_its_bound(report):
    loading = report["loading"]
    for mesh in ("1x8", "1x1", "4x2"):
        entry = loading[mesh]
        # On CPU the parameters' device buffers are host memory: they count, and nothing else
        # beyond weights.loading_peak_bytes may.
        assert entry["rise"] <= entry["device"] + entry["bound"] + RSS_SLACK, (mesh, entry)
    # The bound is a fraction of the checkpoint: never the whole of it held at once.
    assert loading["1x8"]["bound"] < loading["checkpoint_bytes"] / 5


def test_attention_kernels_equal_blockwise(report):
    """splash and Pallas GPU kernels in interpret mode, and XLA's dense softmax, under
    meshes whose model axis splits the kv heads (2x2) or not (2x4)."""
    for case, diffs in report["attention"].items():
        assert max(diffs.values()) < 1e-6, (case, diffs)
    assert {"xla@4x2", "splash@2x4", "pallas_gpu@2x2"} <= set(report["attention"])


def test_attention_backend_per_platform():
    assert resolve_backend("auto", "tpu") == "splash"
    assert resolve_backend("auto", "gpu", "bfloat16") == "cudnn"
    assert resolve_backend("auto", "gpu", "float32") == "pallas_gpu"
    assert resolve_backend("auto", "cpu") == "blockwise"
    assert resolve_backend("splash", "cpu") == "splash"  # interpret mode
    with pytest.raises(ValueError, match="cudnn needs an NVIDIA GPU"):
        resolve_backend("cudnn", "tpu", "bfloat16")
    with pytest.raises(ValueError, match="cudnn needs bfloat16 or float16"):
        resolve_backend("cudnn", "gpu", "float32")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_backend("flash", "tpu")


def test_model_axis_is_the_fewest_devices_that_hold_the_weights():
    gb = 10**9
    assert auto_model_parallel(1 * gb, 8, None) == 1  # CPU: memory unknown
    assert auto_model_parallel(1 * gb, 8, 16 * gb) == 1  # 0.5B on a v5e chip
    assert auto_model_parallel(64 * gb, 8, 16 * gb) == 8  # 32B bf16 on v5e-8
    assert auto_model_parallel(145 * gb, 8, 95 * gb) == 4  # 72B bf16 on v5p: 145/2 > 0.6 x 95
    with pytest.raises(ValueError, match="do not fit"):
        auto_model_parallel(145 * gb, 4, 16 * gb)
    assert WEIGHT_SHARE < 1


def test_mesh_spec_parsing():
    assert parse_mesh("auto") == (None, None) and parse_mesh(None) == (None, None)
    assert parse_mesh("data=4,model=2") == (4, 2) and parse_mesh("model=8") == (None, 8)
    for bad in ("data=4,data=2", "4x2", "model=two"):
        with pytest.raises(ValueError, match="expected 'auto' or 'data=D,model=M'"):
            parse_mesh(bad)


def test_a_mesh_larger_than_the_host_is_refused_before_the_run_exists(tmp_path, tiny_model_dir, text_dataset):  # noqa: F811
    from actex.engine.prepare import prepare_run

    fields = run_fields(tiny_model_dir, text_dataset, str(tmp_path / "out"), mesh="data=3,model=1")
    with pytest.raises(ValueError, match="needs 3 devices, 1 available"):
        prepare_run(fields)
    assert not (tmp_path / "out").exists()


@dataclass(frozen=True)
class FakeDevice:
    """What device_grid reads of a device: its id and its process."""

    id: int
    process_index: int


def slice_devices(processes: int, per_process: int) -> list[FakeDevice]:
    # Listed out of order: the grid must not depend on the order jax.devices() gives.
    return [FakeDevice(p * per_process + d, p) for p in reversed(range(processes)) for d in range(per_process)]


def layout(grid) -> list[list[tuple[int, int]]]:
    """The grid as (process, device id) pairs, row by row."""
    return [[(d.process_index, d.id) for d in row] for row in grid]


def test_one_host_keeps_its_model_groups_within_the_host():
    assert layout(device_grid(slice_devices(1, 8), 2)) == [[(0, 0), (0, 1)], [(0, 2), (0, 3)], [(0, 4), (0, 5)], [(0, 6), (0, 7)]]
    assert layout(device_grid(slice_devices(1, 8), 4, data=1)) == [[(0, 0), (0, 1), (0, 2), (0, 3)]]
    for bad in (3, 16):  # neither divides the host's 8 devices nor spans whole hosts of a 1-host slice
        with pytest.raises(ValueError, match=fr"--mesh model={bad} must divide this host's 8 device\(s\)$"):
            device_grid(slice_devices(1, 8), bad)


def test_a_model_axis_within_each_host_gives_every_process_its_own_rows():
    grid = device_grid(slice_devices(2, 2), 2)
    assert layout(grid) == [[(0, 0), (0, 1)], [(1, 2), (1, 3)]]
    assert [row_share(grid, p) for p in range(2)] == [RowShare(0, 2, True), RowShare(1, 2, True)]


def test_a_model_axis_across_hosts_groups_consecutive_processes_on_the_same_rows():
    grid = device_grid(slice_devices(4, 1), 2)  # 4 x 1 with --mesh data=2,model=2
    assert layout(grid) == [[(0, 0), (1, 1)], [(2, 2), (3, 3)]]
    assert [row_share(grid, p) for p in range(4)] == [
        RowShare(0, 2, True), RowShare(0, 2, False), RowShare(1, 2, True), RowShare(1, 2, False)]
    grid = device_grid(slice_devices(2, 2), 4)  # 2 x 2 with --mesh model=4
    assert layout(grid) == [[(0, 0), (0, 1), (1, 2), (1, 3)]]
    assert [row_share(grid, p) for p in range(2)] == [RowShare(0, 1, True), RowShare(0, 1, False)]
    grid = device_grid(slice_devices(4, 2), 4)  # 4 x 2 with --mesh model=4: two groups of two hosts
    assert [row_share(grid, p) for p in range(4)] == [
        RowShare(0, 2, True), RowShare(0, 2, False), RowShare(1, 2, True), RowShare(1, 2, False)]


def test_model_axes_that_fit_neither_way_are_refused():
    with pytest.raises(ValueError, match=r"must divide each host's 2 devices, or be 2 x a divisor of the 3 hosts"):
        device_grid(slice_devices(3, 2), 4)  # two hosts per group, three hosts
    with pytest.raises(ValueError, match="--mesh model=3 must divide each host's 2 devices"):
        device_grid(slice_devices(2, 2), 3)
    with pytest.raises(ValueError, match=r"leaves process\(es\) 1 without a device"):
        device_grid(slice_devices(2, 2), 2, data=1)


def test_a_model_axis_across_hosts_on_one_host_is_refused_before_the_run_exists(tmp_path, tiny_model_dir, text_dataset):  # noqa: F811
    from typer.testing import CliRunner

    from actex.cli import app

    result = CliRunner().invoke(app, ["extract", "--model", str(tiny_model_dir), "--dataset", str(text_dataset),
                                      "--output", str(tmp_path / "out"), "--layers", "0", "--mesh", "model=2"])
    assert result.exit_code == 2, result.output
    assert "actex: error: --mesh model=2 must divide this host's 1 device(s)" in result.output
    assert not (tmp_path / "out").exists()
