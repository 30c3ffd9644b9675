"""actex: exactly-once extraction of decoder-LLM activations, and streaming them back."""

from actex.reader.run import Run, open_run, spread
from actex.version import __version__

__all__ = ["Run", "open_run", "spread", "__version__"]
