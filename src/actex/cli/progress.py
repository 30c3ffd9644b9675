"""Progress of `actex extract`: a rich bar on a TTY, else plain lines every few seconds."""

from __future__ import annotations

import logging
import threading
import time

import typer

log = logging.getLogger("actex")

class ProgressLines:
    """Plain progress lines on stderr every `every_s` seconds, for logs a progress bar
    never reaches (nohup, sbatch, a container's log): chunks, samples, tokens, rates,
    elapsed time and ETA, from the latest commit's counters. A daemon thread, so a line
    also comes while a long chunk (or the first compile) is under way."""

    def __init__(self, total: int, every_s: float):
        self.total = total
        self.every_s = every_s
        self.started = time.monotonic()
        self.snap: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="actex-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            typer.echo(self.line(), err=True)

    def line(self) -> str:
        done, snap = self.snap.get("chunks_done", 0), self.snap
        elapsed = time.monotonic() - self.started
        eta = _clock(elapsed / done * (self.total - done)) if done else "-"
        return (f"actex: progress {done}/{self.total} chunks, {snap.get('samples', 0):,} samples, "
                f"{snap.get('tokens', 0):,} tokens, {snap.get('tokens_per_s', 0):,.0f} tokens/s, "
                f"{snap.get('bytes_per_s', 0) / 1e6:,.1f} MB/s, elapsed {_clock(elapsed)}, ETA {eta}")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class ProgressView:
    """A rich progress bar on a TTY; otherwise plain progress lines every `every_s` seconds
    (ProgressLines) and a log record per commit (shown with --log-json, as JSON)."""

    def __init__(self, total: int, *, show_bar: bool, every_s: float = 0.0):
        self.total = total
        self._bar = None
        self._lines = ProgressLines(total, every_s) if every_s > 0 and not show_bar else None
        if show_bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("chunks"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[samples]} samples"),
                TextColumn("{task.fields[tok_s]} tok/s"),
                TextColumn("{task.fields[mb_s]} MB/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task("extract", total=total, samples=0, tok_s="-", mb_s="-")
        self._lock = threading.Lock()

    def __enter__(self) -> "ProgressView":
        if self._bar is not None:
            self._bar.start()
        if self._lines is not None:
            self._lines.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._lines is not None:
            self._lines.stop()

    def committed(self, record, snap: dict) -> None:
        """Called on the commit lane after each chunk this worker committed."""
        with self._lock:
            if self._lines is not None:
                self._lines.snap = snap
            if self._bar is not None:
                self._bar.update(
                    self._task,
                    completed=snap["chunks_done"],
                    samples=snap["samples"],
                    tok_s=f"{snap['tokens_per_s']:,.0f}",
                    mb_s=f"{snap['bytes_per_s'] / 1e6:,.1f}",
                )
        log.info(
            "committed chunk %d (%d/%d): %d samples, %d tokens, %.1f%% of computed slots useful",
            record.chunk, snap["chunks_done"], self.total, record.samples, record.tokens,
            100 * (record.useful_fraction or 1.0),
            extra={"data": {"event": "commit", "chunk": record.chunk, "attempt": record.attempt, "total": self.total,
                            "chunk_useful_fraction": record.useful_fraction, **snap}},
        )

