"""Where `actex` logs go: stderr, as `actex: message` lines or, with --log-json, JSON lines."""

from __future__ import annotations

import json
import logging
import sys

class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra={"data": ...}`."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "data", {}),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(log_json: bool, verbose: bool = False) -> None:
    """Log to stderr; with `log_json`, stderr carries only JSON lines (see cli/json_stderr.py)."""
    stream = sys.stderr
    if log_json:
        from actex.cli.json_stderr import capture_stderr

        stream = capture_stderr()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_json else logging.Formatter("actex: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if (log_json or verbose) else logging.WARNING)

