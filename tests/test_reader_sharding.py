"""Exactly once across ranks x DataLoader workers (issue 26).

For every world size and worker count, persistent workers or not, over several epochs:
the union of (sample id, position) over all ranks and workers is every stored token, each
once per epoch, with its stored values; each epoch has its own order, and persistent
workers yield exactly what fresh ones do (they must see `set_epoch`). And a commit record
filed under another chunk's name is refused rather than read twice.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reader_fixtures import write_run

from actex import open_run
from actex.reader.torch_data import ActivationDataset
from actex.store import layout
from actex.store.folder import open_store

HOOK = "blocks.0.hook_resid_post"
WIDTH_BYTES = 16 * 2
# 13 chunks (one never committed) of uneven size, so ranks and workers get unequal shares.
LENGTHS = [[[5, 9], [7]], [[12, 3]], [[4, 4]], [[11], [6]], [[3]], [[8, 2]], [[1, 1, 1]], [[10]],
           [[2], [2], [2]], [[6, 6]], [[9]], [[4, 7]], [[13]]]
EPOCHS = 3
SMALL = {"block_bytes": 4 * WIDTH_BYTES, "shuffle_bytes": 12 * WIDTH_BYTES, "prefetch": 2, "threads": 2}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    return write_run(str(tmp_path_factory.mktemp("sharding") / "run"), lengths=LENGTHS, uncommitted=(4,))


def epochs_read(stored, world: int, workers: int, persistent: bool) -> list[list[dict]]:
    """Per epoch, every batch every rank's DataLoader yielded (ranks in turn, like separate hosts)."""
    datasets = [ActivationDataset(stored.url, HOOK, 5, rank=r, world_size=world, seed=7, **SMALL) for r in range(world)]
    # A worker that hangs (forked from a process with JAX's threads, say) fails the test in a minute.
    loaders = [torch.utils.data.DataLoader(d, batch_size=None, num_workers=workers, persistent_workers=persistent,
                                           timeout=60 if workers else 0) for d in datasets]
    out = []
    for epoch in range(EPOCHS):
        for dataset in datasets:
            dataset.set_epoch(epoch)
        out.append([batch for loader in loaders for batch in loader])
    return out


def keys_of(batches: list[dict]) -> np.ndarray:
    """[tokens, 2] (sample id, position) in the order yielded."""
    return torch.cat([torch.stack([b["sample_ids"], b["positions"].long()], 1) for b in batches]).numpy()


def check_exactly_once(stored, batches: list[dict]) -> None:
    keys = keys_of(batches)
    row = {(s, p): i for i, (s, p) in enumerate(zip(stored.sample_ids.tolist(), stored.positions.tolist()))}
    seen = [row.get(tuple(k)) for k in keys.tolist()]
    assert None not in seen, "a token that is not stored (or not committed) came out"
    missing = len(row) - len(set(seen))
    assert len(seen) == len(set(seen)) and missing == 0, (
        f"{len(seen)} rows out for {len(row)} stored tokens: {len(seen) - len(set(seen))} duplicated, {missing} never seen")
    got = torch.cat([b["activations"] for b in batches]).float().numpy()
    np.testing.assert_array_equal(got, stored.hooks[HOOK][seen].astype(np.float32))


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [2, 3])
def test_every_token_once_per_epoch_across_ranks_and_workers(stored, world, workers):
    fresh = epochs_read(stored, world, workers, persistent=False)
    for batches in fresh:
        check_exactly_once(stored, batches)
    orders = [keys_of(batches) for batches in fresh]
    assert not any(np.array_equal(orders[0], later) for later in orders[1:]), "an epoch repeated epoch 0's order"
    if workers:
        persistent = epochs_read(stored, world, workers, persistent=True)
        for epoch, batches in enumerate(persistent):
            np.testing.assert_array_equal(keys_of(batches), orders[epoch], err_msg=f"persistent workers, epoch {epoch}")


def test_a_record_filed_under_another_chunk_is_refused_not_read_twice(tmp_path):
    """A commit record copied under another chunk's name (a bad sync, a hand edit) would hand
    its parts out twice; the reader refuses it, naming the record."""
    expected = write_run(str(tmp_path / "run"), lengths=LENGTHS[:3], uncommitted=(2,))
    store = open_store(expected.url)
    store.write_bytes(layout.commit_path(2), store.read_bytes(layout.commit_path(1)))
    with pytest.raises(ValueError, match=r"commits/000002\.json: record says chunk 1"):
        list(open_run(expected.url).iter_batches(HOOK, 5, shuffle=False))
