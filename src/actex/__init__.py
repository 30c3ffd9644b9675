"""actex: exactly-once extraction of decoder-LLM activations, and streaming them back."""

__version__ = "0.1.0"
