"""Dynamic chunk claiming with leases (`actex extract --claim`).

A fleet of pre-emptible workers shares one run without a coordinator: each worker takes
any chunk that has no commit record by creating `claims/<chunk>.json` with a conditional
create, keeps it alive with a lease renewer (a thread), and takes over leases whose owner
stopped renewing them.

    claims/<chunk>.json = {"chunk", "owner", "expiry" (unix s), "attempt" (1, 2, ...)}

Every write of a claim is conditional, so two workers can never both believe they just
took the same lease:
* take a free chunk: `create_exclusive` (GCS ifGenerationMatch=0, S3 If-None-Match, O_EXCL);
* renew, take over an expired lease, release: `replace_if_version` on the version read
  (GCS generation, S3 ETag), which fails if anyone wrote the claim in between.

The lease is an optimisation, not the authority. The commit record is: a chunk is done iff
`commits/<chunk>.json` exists, and it is created exclusively too. So a worker whose lease
expired (a long GC pause, a partitioned VM) may still finish and try to commit; if the
new owner committed first, the late attempt loses the create and leaves only unreferenced
parts for `actex gc`. Leases decide who *should* work on a chunk; they cannot make two
commits happen.

Clock skew: `expiry` is the owner's wall clock. A taker treats a lease as expired only once
its own clock passes `expiry + skew_s`. With skew below `skew_s` nothing changes; with
more, a taker whose clock runs ahead may start a live chunk early (duplicate work, one
commit wins) and one whose clock runs behind waits longer (delay). Neither breaks
exactly-once. GCE/TPU VMs keep clocks within milliseconds, so the default 5 s is generous.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import Field

from actex.store import layout
from actex.store.commits import committed_chunks, is_committed
from actex.store.folder import Store
from actex.store.records import MAX_CONTROL_BYTES, Record, parse_record, record_bytes

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 60.0
DEFAULT_SKEW_S = 5.0


class Lease(Record):
    """One claim record as stored, plus the store version it was read at (never stored)."""

    chunk: int
    owner: str
    expiry: float
    attempt: int
    version: Any = Field(default=None, exclude=True)

    def to_json(self) -> bytes:
        return record_bytes(self.model_dump())

    @classmethod
    def from_json(cls, data: bytes, version: object, where: str) -> Lease:
        """A stored claim read at `version`; ValueError naming `where` if over
        MAX_CONTROL_BYTES or not a claim record."""
        lease = parse_record(cls, data, where, "claim record", MAX_CONTROL_BYTES)
        # The version comes from the store's metadata, never from the bytes a worker wrote.
        return lease.model_copy(update={"version": version})

    def expired(self, now: float, skew_s: float) -> bool:
        return now > self.expiry + skew_s


def read_lease(store: Store, chunk: int) -> Lease | None:
    """The current claim on `chunk`, or None when nobody has claimed it.

    A claim that is not one (not a claim record, another chunk's, or over MAX_CONTROL_BYTES)
    reads, with a warning naming it, as a lease long expired: the next claimer takes it over
    (a conditional replace of what is there), so a corrupt claim never stops a worker."""
    path = layout.claim_path(chunk)
    try:
        data, version = store.read_versioned(path)
    except FileNotFoundError:
        return None
    try:
        lease = Lease.from_json(data, version, store.url_of(path))
        if lease.chunk != chunk:
            raise ValueError(f"{store.url_of(path)}: says chunk {lease.chunk}")
        return lease
    except ValueError as error:
        log.warning("%s: read as an expired lease", error)
        return Lease(chunk, "(unreadable claim)", expiry=0.0, attempt=0, version=version)


class ClaimedChunks:
    """A ChunkSource that claims any uncommitted chunk under a lease (see module doc).

    `chunks(stop)` yields a chunk only while this worker holds its lease; when every
    uncommitted chunk is leased to someone else it waits (polling every `poll_s`) because a
    holder may still die and its chunk must then be taken over. It ends once every chunk is
    committed (or given up here) or `stop` is set. `finished(chunk)` releases the lease once
    the chunk is no longer in flight here; this worker never takes that chunk again.
    The lease renewer (a thread) renews held leases every `lease_s / 3` until `close()`, so chunks
    still being written after `chunks()` ended (the engine commits in the background) keep
    their leases until the caller closes the source. `renew_while()`, when given, is asked
    before each renewal: once it says False (the worker stopped progressing, see
    engine/liveness.py) leases are left to run out, so another worker takes the chunks over.
    """

    def __init__(
        self,
        store: Store,
        num_chunks: int,
        owner: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        skew_s: float = DEFAULT_SKEW_S,
        poll_s: float | None = None,
        clock: Callable[[], float] = time.time,
        renew_while: Callable[[], bool] | None = None,
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"--lease-seconds must be > 0, got {lease_s}")
        self.store = store
        self.num_chunks = num_chunks
        self.owner = owner
        self.lease_s = lease_s
        self.skew_s = skew_s
        self.poll_s = poll_s if poll_s is not None else min(5.0, lease_s / 3)
        self.clock = clock
        self.renew_while = renew_while
        self._held: dict[int, Lease] = {}
        self._lost: set[int] = set()
        self._finished: set[int] = set()  # committed or given up while this source ran
        self._lock = threading.Lock()
        # Serialises our own conditional writes of one claim (renew vs release): otherwise a
        # release could read a version the renewer just replaced and fail to release.
        self._writing = threading.Lock()
        self._closed = threading.Event()
        # Held for a whole claim attempt, so close() waits for one in flight to land in
        # `_held` (and be released) rather than leave a claim behind that nobody works on.
        self._claiming = threading.Lock()
        self._renewer: threading.Thread | None = None
        # Workers start scanning at different places so they rarely race for one chunk.
        self._rng = random.Random(owner)

    # -- ChunkSource ---------------------------------------------------------------------

    def chunks(self, stop: threading.Event) -> Iterator[int]:
        self._start_renewer()
        while not stop.is_set():
            pending = self._uncommitted()
            if not pending:
                return
            chunk = self._claim_any(pending, stop)
            if chunk is None:
                # Everything left is leased to live workers; wait for commits or expiries.
                stop.wait(self.poll_s)
                continue
            yield chunk

    def finished(self, chunk: int) -> None:
        """The chunk is no longer in flight here (committed, or given up): release its lease."""
        with self._lock:
            self._finished.add(chunk)
        self._release(chunk)

    def lost(self, chunk: int) -> bool:
        """True if another worker took this chunk's lease over from us (we were too slow)."""
        with self._lock:
            return chunk in self._lost

    @property
    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def close(self) -> None:
        """Stop the lease renewer and release every lease still held (pre-emption, errors)."""
        self._closed.set()
        with self._claiming:
            pass
        for chunk in self.held:
            self._release(chunk)
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(timeout=self.lease_s)

    # -- claiming ------------------------------------------------------------------------

    def _uncommitted(self) -> list[int]:
        # Chunks held here are in flight (the engine commits in the background): not work to take.
        with self._lock:
            skip = self._finished | set(self._held)
        skip |= committed_chunks(self.store)
        return [k for k in range(self.num_chunks) if k not in skip]

    def _claim_any(self, pending: list[int], stop: threading.Event) -> int | None:
        start = self._rng.randrange(len(pending))
        for chunk in pending[start:] + pending[:start]:
            # A scan over many leased chunks takes a request or two each: a stop request
            # (pre-emption) must not wait for it, nor leave a chunk claimed and never worked on.
            if stop.is_set():
                return None
            if self.try_claim(chunk):
                # The chunk may have been committed (and released) after we listed commits.
                if is_committed(self.store, chunk):
                    self._release(chunk)
                    continue
                return chunk
        return None

    def try_claim(self, chunk: int) -> bool:
        """Take `chunk`'s lease if it is free or expired. Exactly one racing worker wins."""
        with self._claiming:
            if self._closed.is_set():
                return False
            return self._try_claim(chunk)

    def _try_claim(self, chunk: int) -> bool:
        now = self.clock()
        current = read_lease(self.store, chunk)
        if current is None:
            lease = Lease(chunk, self.owner, now + self.lease_s, attempt=1)
            won = self.store.create_exclusive(layout.claim_path(chunk), lease.to_json())
        elif current.expired(now, self.skew_s):
            lease = Lease(chunk, self.owner, now + self.lease_s, attempt=current.attempt + 1)
            won = self.store.replace_if_version(layout.claim_path(chunk), lease.to_json(), current.version)
            if won and current.expiry > 0:  # expiry 0 is a lease its owner released
                log.info("chunk %d: took over the lease of %s (expired %.0f s ago)", chunk, current.owner, now - current.expiry)
        else:
            return False
        if not won:
            return False
        # Read back for the version our next conditional write must match.
        mine = read_lease(self.store, chunk)
        if mine is None or mine.owner != self.owner or mine.attempt != lease.attempt:
            return False
        with self._lock:
            self._held[chunk] = mine
            self._lost.discard(chunk)
        return True

    def _release(self, chunk: int) -> None:
        """Expire our lease now so nobody waits for it; a no-op if it is no longer ours."""
        with self._writing:
            with self._lock:
                lease = self._held.pop(chunk, None)
            if lease is None:
                return
            released = Lease(chunk, self.owner, expiry=0.0, attempt=lease.attempt)
            try:
                self.store.replace_if_version(layout.claim_path(chunk), released.to_json(), lease.version)
            except OSError as err:
                # The lease simply runs out instead; the commit record already decided.
                log.warning("chunk %d: could not release lease (%s); it expires on its own", chunk, err)

    # -- lease renewer --------------------------------------------------------------------

    def _start_renewer(self) -> None:
        if self._renewer is None:
            self._renewer = threading.Thread(target=self._renew_loop, name=f"lease-renewer-{self.owner}", daemon=True)
            self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._closed.wait(self.lease_s / 3):
            self.renew()

    def renew(self) -> None:
        """Push every held lease's expiry forward; a lease someone else took is dropped.
        Nothing is renewed once `renew_while()` says the worker stopped progressing."""
        if self.renew_while is not None and not self.renew_while():
            log.warning("no progress: leases of chunks %s are no longer renewed", self.held)
            return
        with self._lock:
            held = list(self._held.values())
        for lease in held:
            with self._writing:
                self._renew_one(lease)

    def _renew_one(self, lease: Lease) -> None:
        with self._lock:
            if lease.chunk not in self._held:
                return  # released since the renewer listed it
        fresh = Lease(lease.chunk, self.owner, self.clock() + self.lease_s, lease.attempt)
        try:
            ok = self.store.replace_if_version(layout.claim_path(lease.chunk), fresh.to_json(), lease.version)
            current = read_lease(self.store, lease.chunk) if ok else None
        except OSError as err:
            # Transient after the store's own retries: the next renewal tries again, and the
            # lease has two more renewals of slack before it expires.
            log.warning("chunk %d: lease renewal failed (%s); retrying at the next renewal", lease.chunk, err)
            return
        with self._lock:
            if ok and current is not None and current.owner == self.owner:
                self._held[lease.chunk] = current
                return
            del self._held[lease.chunk]
            self._lost.add(lease.chunk)
        log.warning(
            "chunk %d: lease taken over by another worker; finishing anyway, "
            "the commit record decides which attempt counts",
            lease.chunk,
        )
