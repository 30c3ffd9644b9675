"""The torch adapter as trainers use it: dtype, writable tensors, several epochs, worker defaults."""

from __future__ import annotations

import itertools
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from reader_fixtures import write_run

from actex.reader import torch_data
from actex.reader.torch_data import ActivationDataset

HOOK = "blocks.0.hook_resid_post"
LENGTHS = [[[5, 9], [7]], [[12, 3]], [[4, 4]], [[11], [6]]]
SMALL = {"block_bytes": 64, "shuffle_bytes": 640}  # several blocks and a real shuffle on a tiny run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(str(tmp_path_factory.mktemp("torch") / "run"), lengths=LENGTHS)


def keys(batches) -> list[tuple[int, int]]:
    return [(s, p) for b in batches for s, p in zip(b["sample_ids"].tolist(), b["positions"].tolist())]


def test_dtype_converts_the_stored_values(run):
    batches = list(ActivationDataset(run.url, HOOK, 8, dtype=torch.float32, shuffle=False))
    assert {b["activations"].dtype for b in batches} == {torch.float32}
    got = torch.cat([b["activations"] for b in batches]).numpy()
    np.testing.assert_array_equal(got, run.hooks[HOOK].astype(np.float32))
    stored = next(iter(ActivationDataset(run.url, HOOK, 8, shuffle=False)))
    assert stored["activations"].dtype == torch.bfloat16


@pytest.mark.parametrize("shuffle", [False, True])
def test_tensors_are_writable_and_writes_do_not_reach_later_reads(run, shuffle):
    # Unshuffled batches were read-only views of the fetched bytes: torch warned
    # "non-writable ... undefined behavior" and an in-place write was undefined.
    dataset = ActivationDataset(run.url, HOOK, 8, shuffle=shuffle, **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(dataset)
    for batch in batches:
        for tensor in batch.values():
            tensor.zero_()  # in place, as a trainer normalising a batch would
    again = list(dataset)
    assert sorted(keys(again)) == sorted(zip(run.sample_ids.tolist(), run.positions.tolist()))
    assert any(b["activations"].float().abs().sum() > 0 for b in again)


def test_epochs_in_one_pass_each_token_once_per_epoch_in_new_orders(run):
    dataset = ActivationDataset(run.url, HOOK, 8, epochs=3, **SMALL)
    batches = list(dataset)
    tokens = len(run.token_ids)
    per_epoch = [keys(batches)[i * tokens : (i + 1) * tokens] for i in range(3)]
    assert len(keys(batches)) == 3 * tokens
    expected = sorted(zip(run.sample_ids.tolist(), run.positions.tolist()))
    assert all(sorted(epoch) == expected for epoch in per_epoch)
    assert len({tuple(epoch) for epoch in per_epoch}) == 3  # each epoch its own order
    # set_epoch picks the first epoch of a pass: epochs 1, 2 and 3 now.
    dataset.set_epoch(1)
    assert keys(list(dataset))[: 2 * tokens] == per_epoch[1] + per_epoch[2]


def test_epochs_none_runs_without_end(run):
    stream = iter(ActivationDataset(run.url, HOOK, 8, epochs=None, **SMALL))
    taken = list(itertools.islice(stream, 40))  # 40 batches of 8 > 4 epochs of 81 tokens
    counts = Counter(keys(taken))
    assert len(counts) == len(run.token_ids) and min(counts.values()) >= 3


def test_workers_and_epochs_keep_exactly_once_per_epoch(run):
    loader = ActivationDataset(run.url, HOOK, 8, epochs=2, **SMALL).loader(num_workers=2)
    counts = Counter(keys(list(loader)))
    assert set(counts.values()) == {2} and len(counts) == len(run.token_ids)


def test_worker_default_leaves_small_machines_in_process(monkeypatch):
    for cpus, workers in ((1, 0), (2, 0), (4, 0), (8, 2), (16, 4), (64, 4)):
        monkeypatch.setattr(torch_data.os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert torch_data.default_num_workers() == workers
    dataset = ActivationDataset("unused", HOOK, 8)
    monkeypatch.setattr(torch_data.os, "sched_getaffinity", lambda _pid: {0, 1})
    assert dataset.loader().num_workers == 0


def test_bad_epochs_refused():
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        ActivationDataset("unused", HOOK, 8, epochs=0)
