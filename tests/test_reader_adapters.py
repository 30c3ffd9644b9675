"""torch IterableDataset (with DataLoader workers) and the JAX device iterator."""

from __future__ import annotations

import numpy as np
import torch
from reader_fixtures import write_run

from actex import open_run
from actex.reader.jax_data import device_batches
from actex.reader.torch_data import ActivationDataset

HOOK = "blocks.0.hook_resid_post"
LENGTHS = [[[5, 9], [7]], [[12, 3]], [[4, 4]], [[11], [6]]]


def test_torch_dataloader_workers_see_every_token_once(tmp_path):
    expected = write_run(str(tmp_path / "run"), lengths=LENGTHS)
    dataset = ActivationDataset(expected.url, HOOK, 8, block_bytes=64, shuffle_bytes=640)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    batches = list(loader)
    assert batches[0]["activations"].dtype == torch.bfloat16
    keys = torch.cat([torch.stack([b["sample_ids"], b["positions"].long()], 1) for b in batches])
    assert len(keys) == len(expected.token_ids) == len({tuple(k) for k in keys.tolist()})
    rows = {(s, p): i for i, (s, p) in enumerate(zip(expected.sample_ids.tolist(), expected.positions.tolist()))}
    order = [rows[tuple(k)] for k in keys.tolist()]
    got = torch.cat([b["activations"] for b in batches]).float().numpy()
    np.testing.assert_array_equal(got, expected.hooks[HOOK][order].astype(np.float32))


def test_jax_device_batches_keep_order_and_values(tmp_path):
    expected = write_run(str(tmp_path / "run"), lengths=LENGTHS)
    batches = list(device_batches(open_run(expected.url).iter_batches(HOOK, 8, shuffle=False), ahead=2))
    assert [b["activations"].shape[0] for b in batches] == [8] * 7 + [5]
    np.testing.assert_array_equal(np.concatenate([np.asarray(b["activations"]) for b in batches]),
                                  expected.hooks[HOOK])
