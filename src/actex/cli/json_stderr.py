"""`--log-json`: every line on stderr is one JSON object, whoever writes it.

Python logging goes through `JsonFormatter` (cli/logs.py) and Python warnings are routed
into logging. Native code writes to file descriptor 2 directly: XLA, libtpu and absl
("I1130 16:26:32.053043 4069 pjrt_client.cc:579] ...", "E0000 ... TPU backend ..."), so
descriptor 2 is replaced by a pipe whose reader thread passes JSON lines through and wraps
every other line as {"time", "level", "logger": "stderr", "message"}. An uncaught exception
(a bug) becomes one record whose "error" holds the traceback.

Python's own log records are JSON already, so they skip the pipe: `capture_stderr` returns a
stream on the original descriptor 2 for the logging handler. A record is then on its way to
the file before `log.info` returns, not queued behind a reader thread that a SIGTERM arriving
as the process exits would cut off (the "done" record was lost that way).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
import time
from typing import TextIO

# absl / glog line prefix: severity letter, then MMDD (or 0000 before absl is initialised).
_ABSL = re.compile(r"^([IWEF])\d{4} ")
_ABSL_LEVELS = {"I": "info", "W": "warning", "E": "error", "F": "critical"}

_log_stream = None


def as_json_line(raw: bytes) -> bytes:
    """One line written to stderr -> one JSON line (unchanged if it already is a JSON object)."""
    text = raw.decode("utf-8", "replace").rstrip("\r\n")
    try:
        if isinstance(json.loads(text), dict):
            return text.encode() + b"\n"
    except ValueError:
        pass
    absl = _ABSL.match(text)
    level = _ABSL_LEVELS[absl.group(1)] if absl else "warning"
    entry = {"time": round(time.time(), 3), "level": level, "logger": "stderr", "message": text}
    return json.dumps(entry).encode() + b"\n"


def _forward(read_fd: int, out_fd: int) -> None:
    with os.fdopen(read_fd, "rb") as pipe:
        for raw in pipe:
            if raw.strip():
                os.write(out_fd, as_json_line(raw))


def capture_stderr() -> TextIO:
    """Route descriptor 2 (and so sys.stderr) through the JSON wrapper until exit. Idempotent.

    Returns the stream Python logging should write its (JSON) records to: the original
    descriptor 2, line-buffered; sys.stderr when descriptor 2 is not this process's stderr
    (under a test runner), which is then left alone."""
    global _log_stream
    if _log_stream is not None:
        return _log_stream
    if not _is_process_stderr():
        return sys.stderr
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    sys.stderr.flush()
    original = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    reader = threading.Thread(target=_forward, args=(read_fd, original), name="actex-json-stderr", daemon=True)
    reader.start()
    _log_stream = os.fdopen(os.dup(original), "w", buffering=1, encoding="utf-8", errors="replace")

    def restore() -> None:
        # Closing the pipe's last write end (fd 2) ends the reader once it has drained.
        sys.stderr.flush()
        os.dup2(original, 2)
        reader.join(timeout=5)

    atexit.register(restore)
    return _log_stream


def _is_process_stderr() -> bool:
    # Under a test runner or in a notebook sys.stderr is not descriptor 2: leave it alone.
    try:
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def _log_uncaught(kind, error, trace) -> None:
    logging.getLogger("actex").critical("uncaught %s: %s", kind.__name__, error, exc_info=(kind, error, trace))
