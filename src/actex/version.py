"""actex's version: a leaf module, so the store can stamp run.json with it without
importing the package's public API (which imports the reader, which imports the store)."""

__version__ = "0.1.0"  # keep equal to pyproject.toml's version
