"""Keep the root logger as each test found it.

`actex` commands invoked in-process (typer's CliRunner) point the root logger at the
runner's stderr, which is closed when the command returns: a later test's log call then
prints "--- Logging error --- ValueError: I/O operation on closed file". pytest's own
capture handlers come and go per phase, so only the plain StreamHandlers a test added
are removed.
"""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before and type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(level)
