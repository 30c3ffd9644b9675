"""Batches of one hook as JAX arrays, placed on device ahead of use.

    for batch in device_batches(run.iter_batches(hook, 4096), sharding=NamedSharding(mesh, P("data"))):
        loss = step(params, batch["activations"])

`jax.device_put` is asynchronous: keeping `ahead` batches in flight overlaps the
host-to-device copy of batch n+1 with the step on batch n. With a sharding, each batch is
split over the mesh (batch_size must divide by the sharded axis).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import jax

from actex.reader.batch import Batch


def device_batches(batches: Iterable[Batch], *, sharding: jax.sharding.Sharding | None = None,
                   ahead: int = 2) -> Iterator[dict[str, jax.Array]]:
    """Yield {activations, token_ids, positions, sample_ids} as device arrays, `ahead` in flight."""
    queue: deque[dict[str, jax.Array]] = deque()
    for batch in batches:
        host = {"activations": batch.activations, "token_ids": batch.token_ids,
                "positions": batch.positions, "sample_ids": batch.sample_ids}
        queue.append(jax.device_put(host, sharding))
        if len(queue) > ahead:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
