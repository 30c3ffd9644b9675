"""`actex streams`: split a dataset into N JSONL streams, for users who keep per-worker files.

ARC rows (standard or barc style) are written as standard ARC tasks ({id, train, test},
the barc test pair's output kept as the test output) with globally unique ids: the row's
own id, else its global row index, after an optional prefix. Text rows are written as
{"text", "source_row"}. Valid row k goes to stream k mod N, so streams differ by at most
one row; skipped bad rows are listed with their reasons in report.json next to them.
"""

from __future__ import annotations

import json
from contextlib import ExitStack

import fsspec

from actex.data.config import DataConfig
from actex.data.plan import valid_rows


def stream_name(index: int, num_streams: int) -> str:
    return f"stream-{index:05d}-of-{num_streams:05d}.jsonl"


def write_streams(cfg: DataConfig, out_dir: str, num_streams: int, id_prefix: str = "") -> dict:
    """Write the streams and report.json under `out_dir` (local path or fsspec URL); return the report."""
    if num_streams < 1:
        raise ValueError(f"num_streams must be >= 1, got {num_streams}")
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    counts = [0] * num_streams
    skipped: list[dict] = []
    with ExitStack() as stack:
        files = [stack.enter_context(fs.open(f"{root}/{stream_name(i, num_streams)}", "w")) for i in range(num_streams)]
        for k, (row, parsed) in enumerate(valid_rows(cfg, skipped)):
            if cfg.format == "arc":
                record = {**parsed.to_dict(), "id": f"{id_prefix}{parsed.task_id}", "source_row": row.index}
            else:
                record = {"text": parsed, "source_row": row.index}
            files[k % num_streams].write(json.dumps(record) + "\n")
            counts[k % num_streams] += 1
    report = {
        "dataset": cfg.dataset,
        "format": cfg.format,
        "streams": [stream_name(i, num_streams) for i in range(num_streams)],
        "rows": counts,
        "skipped_rows": skipped,
    }
    with fs.open(f"{root}/report.json", "w") as f:
        json.dump(report, f, indent=1)
    return report
