"""Reading a run back (docs/reader.md), one idea per module:

    run.py        Run, open_run: a run's committed contents, stats, iter_batches
    parts.py      PartRef, Block: what is fetched; how ranks deal chunks
    ranges.py     ranged reads of a part, each checked against its CRC-32C
    blocks.py     one block's rows of a hook with their index rows (int8 dequantized)
    batch.py      Batch, and cutting a stream of rows into batches
    shuffle.py    the bounded shuffle buffer
    prefetch.py   reads in flight on a thread pool
    torch_data.py / jax_data.py   the torch Dataset and JAX device batches (optional extras)
    exports/      SAELens cached activations, legacy pickles
    verify.py     integrity checks and recomputation against transformers

Only Run, open_run, spread and Batch are imported here: the adapters, exports and verify
need optional extras and are imported from their modules.
"""

from actex.reader.batch import Batch
from actex.reader.run import Run, open_run, spread

__all__ = ["Batch", "Run", "open_run", "spread"]
