"""`--log-json`: every line on stderr is one JSON object, whoever writes it.

Python logging goes through `JsonFormatter` (cli/extract.py) and Python warnings are routed
into logging. Native code writes to file descriptor 2 directly: XLA, libtpu and absl
("I1130 16:26:32.053043 4069 pjrt_client.cc:579] ...", "E0000 ... TPU backend ..."), so
descriptor 2 is replaced by a pipe whose reader thread passes JSON lines through and wraps
every other line as {"time", "level", "logger": "stderr", "message"}. An uncaught exception
(a bug) becomes one record whose "error" holds the traceback.
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

# absl / glog line prefix: severity letter, then MMDD (or 0000 before absl is initialised).
_ABSL = re.compile(r"^([IWEF])\d{4} ")
_ABSL_LEVELS = {"I": "info", "W": "warning", "E": "error", "F": "critical"}

_started = False


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


def capture_stderr() -> None:
    """Route descriptor 2 (and so sys.stderr) through the JSON wrapper until exit. Idempotent."""
    global _started
    if _started or not _is_process_stderr():
        return
    _started = True
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    sys.stderr.flush()
    original = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    reader = threading.Thread(target=_forward, args=(read_fd, original), name="actex-json-stderr", daemon=True)
    reader.start()

    def restore() -> None:
        # Closing the pipe's last write end (fd 2) ends the reader once it has drained.
        sys.stderr.flush()
        os.dup2(original, 2)
        reader.join(timeout=5)

    atexit.register(restore)


def _is_process_stderr() -> bool:
    # Under a test runner or in a notebook sys.stderr is not descriptor 2: leave it alone.
    try:
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def _log_uncaught(kind, error, trace) -> None:
    logging.getLogger("actex").critical("uncaught %s: %s", kind.__name__, error, exc_info=(kind, error, trace))
