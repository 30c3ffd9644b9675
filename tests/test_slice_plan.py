"""Pure parts of the pod-slice engine: shares, step-aligned shapes, config disagreement
lines, when a process joins a slice. (The real thing: tests/test_pod_slice.py.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from actex.config import ConfigError, WorkerOptions
from actex.data import ShapeBudget
from actex.data.tokenize import TokenizedSample
from actex.engine.distributed import Slice, SliceChunks, agreement_error, explicit_settings, wanted
from actex.engine.lockstep import lockstep_batches, split_shares
from actex.engine.work import StaticChunks


def sample(i: int, n: int) -> TokenizedSample:
    return TokenizedSample(i, list(range(1, n + 1)), [(0, n)], {})


def test_shares_are_contiguous_balanced_and_cover_every_sample_once():
    samples = [sample(i, n) for i, n in enumerate([50, 10, 10, 10, 60, 5, 5, 40])]
    shares = split_shares(samples, 3)
    assert [t.sample_id for s in shares for t in s] == list(range(8))
    tokens = [sum(len(t.token_ids) for t in s) for s in shares]
    assert max(tokens) <= 80 and min(tokens) >= 40, tokens
    one = split_shares(samples[:1], 4)  # fewer samples than processes: the others get none
    assert sorted(len(s) for s in one) == [0, 0, 0, 1]


def test_every_process_gets_the_same_shape_at_every_step_padding_rows_and_steps():
    samples = [sample(i, n) for i, n in enumerate([60, 60, 60, 60, 60, 60, 3, 3])]
    shares = split_shares(samples, 2)
    per_process = [lockstep_batches(shares, p, 128, 64, row_multiple=1, budgets=[ShapeBudget(), ShapeBudget()])
                   for p in range(2)]
    assert len(per_process[0]) == len(per_process[1])
    for a, b in zip(*per_process):
        assert a.token_ids.shape == b.token_ids.shape
    placed = [p.length for batches in per_process for b in batches for p in b.placements]
    assert sum(placed) == sum(len(t.token_ids) for t in samples)
    padding_only = [b for batches in per_process for b in batches if not b.placements]
    assert all((b.segment_ids == 0).all() for b in padding_only)


def test_a_config_difference_names_field_values_and_processes():
    base = {"chunk_size": 2, "data": {"dataset": "/d/a.jsonl"}, "mesh": "auto"}
    other = {"chunk_size": 2, "data": {"dataset": "/d/b.jsonl"}, "mesh": "auto"}
    line = agreement_error([{"config": base}, {"config": base}, {"config": other}], ["h0", "h1", "h2"])
    assert line == ("the processes of the slice disagree on the config: data.dataset on process(es) 2 "
                    "('/d/b.jsonl' vs process 0's '/d/a.jsonl')")
    assert agreement_error([{"config": base}, {"config": base}], ["h0", "h1"]) is None
    failed = agreement_error([{"config": base}, {"error": "/d/a.jsonl: no such file"}], ["h0", "h1"])
    assert failed == "process 1 (host h1) could not resolve the config: /d/a.jsonl: no such file"


def test_a_slice_is_joined_only_when_asked_or_on_a_multi_host_tpu():
    none = WorkerOptions()
    assert not wanted(none, {})
    assert not wanted(none, {"TPU_WORKER_HOSTNAMES": "t1v-0"})  # a single-host TPU VM
    assert wanted(none, {"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1"})
    assert wanted(none, {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "4"})
    assert not wanted(WorkerOptions(num_processes=1), {"JAX_COORDINATOR_ADDRESS": "x:1"})
    assert explicit_settings(none, {"JAX_PROCESS_ID": "3"}) == (None, None, 3)
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES='four' is not an integer"):
        explicit_settings(none, {"JAX_NUM_PROCESSES": "four"})


class MemoryKeyValues:
    """The coordination service's key-value store as jax's client sees it: set refuses an
    existing key, a blocking get waits, delete removes a key and every key under it."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.changed = threading.Condition()

    def key_value_set(self, key: str, value: str) -> None:
        with self.changed:
            if key in self.values:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.values[key] = value
            self.changed.notify_all()

    def blocking_key_value_get(self, key: str, timeout_ms: int) -> str:
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.values, timeout_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
            return self.values[key]

    def key_value_try_get(self, key: str) -> str:
        with self.changed:
            if key not in self.values:
                raise RuntimeError(f"NOT_FOUND: {key}")
            return self.values[key]

    def key_value_delete(self, key: str) -> None:
        with self.changed:
            for name in [k for k in self.values if k == key or k.startswith(key + "/")]:
                del self.values[name]


def test_the_slice_deletes_each_step_broadcast_once_every_process_read_it():
    """Three processes follow process 0's chunks (one broadcast per step): every step's key
    but the last is gone from the coordination service at the end, read marks included, and
    every process saw every chunk."""
    client, count, num_chunks = MemoryKeyValues(), 3, 12
    seen: dict[int, list[int]] = {}

    def follow(index: int) -> None:
        slice_ = Slice(index, count, client, barrier_timeout_s=30.0)
        inner = StaticChunks(num_chunks) if index == 0 else None
        seen[index] = []
        for chunk in SliceChunks(slice_, inner).chunks(threading.Event()):
            seen[index].append(chunk)
            slice_.allgather(f"chunk/{chunk}", str(chunk))  # in step, as the engine's commits keep them

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == {i: list(range(num_chunks)) for i in range(count)}
    left = sorted(key for key in client.values if key.startswith("actex/b/"))
    # The last step ("no more chunks") is broadcast after the last sweep: 1-2 keys stay, not 13.
    assert set(left) <= {f"actex/b/step/{num_chunks - 1}", f"actex/b/step/{num_chunks}"} | {
        f"actex/b/step/{step}/read/{p}" for step in (num_chunks - 1, num_chunks) for p in (1, 2)}
    assert f"actex/b/step/{num_chunks - 2}" not in client.values
