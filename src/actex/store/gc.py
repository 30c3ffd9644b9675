"""Delete orphaned attempts: data written under `chunks/<chunk>/<attempt>/` that no commit names.

Attempts become garbage when a worker dies before committing or loses a commit race. An
attempt is deleted only if
  * no commit record names it (records are read AFTER listing the attempts, so a commit
    that lands while we list is still seen), and it is re-checked right before deletion;
  * it is older than the grace period, counted from the UTC start stamp in its id
    (`layout.new_attempt_id`). The grace period must exceed the longest time a live
    worker spends writing one chunk; an attempt whose id carries no stamp is never deleted.

It also deletes temp files (`.actex-tmp-*`, anywhere in the run) last modified more than
the grace period ago: a local write that was killed midway leaves one, which `Store.list`
hides and nothing else removes. A live write's temp file lives for one write, seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from actex.store import layout
from actex.store.commits import is_committed, read_commit, read_commits
from actex.store.folder import Store

DEFAULT_GRACE_S = 24 * 3600.0


@dataclass(frozen=True)
class Attempt:
    chunk: int
    attempt: str
    files: tuple[str, ...]  # relative paths

    @property
    def dir(self) -> str:
        return layout.attempt_dir(self.chunk, self.attempt)


@dataclass(frozen=True)
class GcReport:
    deleted: tuple[Attempt, ...]  # or, with dry_run, what would be deleted
    kept_recent: tuple[Attempt, ...]  # uncommitted but inside the grace period (or undated)
    committed: int  # attempts named by commit records
    dry_run: bool
    temp_files: tuple[str, ...] = ()  # stale temp files deleted (or, with dry_run, to delete)


def list_attempts(store: Store) -> list[Attempt]:
    """Every attempt directory under chunks/, from one recursive listing."""
    found: dict[tuple[int, str], list[str]] = {}
    for path in store.list(layout.CHUNKS_DIR):
        parts = path.split("/")
        if len(parts) >= 4 and parts[1].isdigit():
            found.setdefault((int(parts[1]), parts[2]), []).append(path)
    return [Attempt(chunk, attempt, tuple(files)) for (chunk, attempt), files in sorted(found.items())]


def collect_garbage(store: Store, *, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False,
                    now: float | None = None) -> GcReport:
    attempts = list_attempts(store)
    named = {(r.chunk, r.attempt) for r in read_commits(store).values()}
    now = time.time() if now is None else now
    orphans = [a for a in attempts if (a.chunk, a.attempt) not in named]
    old = [a for a in orphans if (started := layout.attempt_started(a.attempt)) is not None and now - started > grace_s]
    deleted = []
    for attempt in old:
        if dry_run:
            deleted.append(attempt)
            continue
        # Fresh look at this chunk's record: never delete what a commit has just claimed.
        if is_committed(store, attempt.chunk) and read_commit(store, attempt.chunk).attempt == attempt.attempt:
            continue
        for path in attempt.files:
            store.delete(path)
        deleted.append(attempt)
    kept = tuple(a for a in orphans if a not in old)
    return GcReport(tuple(deleted), kept, len(attempts) - len(orphans), dry_run,
                    stale_temp_files(store, grace_s=grace_s, dry_run=dry_run, now=now))


def stale_temp_files(store: Store, *, grace_s: float, dry_run: bool, now: float) -> tuple[str, ...]:
    """Delete (unless dry_run) temp files older than grace_s; their relative paths.

    A temp file whose age is unknown is kept, like an undated attempt.
    """
    stale = sorted(rel for rel, modified in store.list_temp().items()
                   if modified is not None and now - modified > grace_s)
    if not dry_run:
        for rel in stale:
            store.delete(rel)
    return tuple(stale)
