"""Fetching ahead: a bounded number of reads in flight on a thread pool, results in order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor


def prefetched(items: Iterable, fetch: Callable, threads: int, depth: int) -> Iterator:
    """fetch(item) for each item in order, keeping `depth` fetches in flight on `threads` threads.

    `items` is consumed lazily (at most `depth` + 1 ahead of what was yielded).
    """
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="actex-read")
    inflight: deque[Future] = deque()
    try:
        for item in items:
            inflight.append(pool.submit(fetch, item))
            if len(inflight) > depth:
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()
    finally:
        # The caller may stop early (break, exception): drop the queued reads; the few
        # running ones end on their own and their results are dropped. Never wait for them
        # here: an abandoned iterator is closed by the garbage collector on whatever thread
        # runs it, one of these very threads included (which cannot join itself) or one that
        # holds a lock a running read needs (a hang).
        for fut in inflight:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
