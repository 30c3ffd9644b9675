"""actex: exactly-once extraction of decoder-LLM activations, and streaming them back."""

__version__ = "0.1.0"

from actex.reader.run import Run, open_run, spread  # noqa: E402  (needs __version__ above)

__all__ = ["Run", "open_run", "spread", "__version__"]
