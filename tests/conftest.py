"""Shared fixtures are plain modules next to this file, registered as plugins.

Add a module here rather than fixtures to this file: each area keeps its own.
"""

pytest_plugins = ["servers", "logging_fixtures"]
