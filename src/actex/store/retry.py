"""The one retry policy of actex: which failures are transient, and how often to try again.

Transient failures (5xx, 429, 408, timeouts, resets) are retried with tenacity, around
every store operation (store/folder.py) and every dataset read (data/sources.py), except
those the filesystem's client retried already: retrying those again would multiply the
attempts. The final error names the object and the cause.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import fsspec
import tenacity

from actex.store.errors import StoreError, TransientStoreError, exception_chain, http_status, s3_error_code

T = TypeVar("T")

_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
# S3 answers concurrent conditional writes on one key with 409 ConditionalRequestConflict
# and asks the client to retry; the other codes are its spellings of 5xx / throttling.
_TRANSIENT_S3_CODES = {
    "ConditionalRequestConflict", "InternalError", "ServiceUnavailable", "SlowDown",
    "RequestTimeout", "RequestTimeTooSkewed", "Throttling", "ThrottlingException",
}


def _transient_library_errors() -> tuple[type[BaseException], ...]:
    """Connection-level error classes of the HTTP stacks under gcsfs, google-cloud-storage
    and s3fs, for those installed (each is an optional extra)."""
    found: list[type[BaseException]] = []
    try:
        import aiohttp

        found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    try:
        import requests.exceptions as rqe

        found += [rqe.ConnectionError, rqe.Timeout, rqe.ChunkedEncodingError]
    except ImportError:
        pass
    try:
        import botocore.exceptions as bce

        found += [bce.HTTPClientError, bce.ConnectionError]
    except ImportError:
        pass
    return tuple(found)


_LIBRARY_TRANSIENT = _transient_library_errors()


def is_transient(exc: BaseException) -> bool:
    """True for failures another attempt may cure: 5xx/429/408, timeouts, resets.

    Libraries wrap their errors (s3fs turns botocore errors into OSError), so the whole
    chain of causes is inspected; a missing file or a refused permission on the way ends it.
    """
    for cur in exception_chain(exc):
        if isinstance(cur, (FileNotFoundError, FileExistsError, PermissionError)):
            return False
        if isinstance(cur, (TransientStoreError, ConnectionError, TimeoutError) + _LIBRARY_TRANSIENT):
            return True
        if http_status(cur) in _TRANSIENT_HTTP or s3_error_code(cur) in _TRANSIENT_S3_CODES:
            return True
    return False


def client_retries(fs: fsspec.AbstractFileSystem) -> Callable[[BaseException], bool]:
    """Which failures the filesystem's own client already retried before raising them.

    gcsfs retries 408/429/5xx and connection errors itself (6 tries, `gcsfs.retry`), and
    google-cloud-storage (the GCS backend's conditional writes) retries the same with its
    default policy, raising `RetryError` once that gives up; s3fs retries its
    S3_RETRYABLE_ERRORS and botocore retries 5xx, throttling and connection errors.
    Retrying those again would multiply the attempts (36 instead of 6) and the time
    before a dead store is reported; what they do not retry (S3's 409
    ConditionalRequestConflict, a timeout raised outside the client) is still ours.
    """
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"gs", "gcs"}:
        from gcsfs.retry import is_retriable
        from google.api_core.exceptions import RetryError

        return lambda exc: any(isinstance(e, RetryError) or is_retriable(e) for e in exception_chain(exc))
    if protocols & {"s3", "s3a"}:
        import botocore.exceptions as bce
        from s3fs.core import S3_RETRYABLE_ERRORS

        retried = (*S3_RETRYABLE_ERRORS, bce.HTTPClientError, bce.ConnectionError)
        return lambda exc: any(
            isinstance(e, retried) or (http_status(e) or 0) >= 500 for e in exception_chain(exc)
        )
    return lambda exc: False


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy of actex, for store operations and dataset reads alike
    (tenacity: exponential backoff with full jitter, bounded attempts).

    Delay before retry n (1-based) is uniform in [0, min(max_delay, base_delay * 2**(n-1))];
    full jitter spreads a fleet of workers that all saw the same outage. Only transient
    failures (`is_transient`) are retried, and not those the client already retried
    (`already_retried`, see `client_retries`). The final error is a StoreError naming
    `what` (the object or file) and the cause.
    """

    attempts: int = 6
    base_delay: float = 0.25
    max_delay: float = 10.0

    def call(self, fn: Callable[[], T], *, what: str,
             already_retried: Callable[[BaseException], bool] = lambda exc: False) -> T:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_random_exponential(multiplier=self.base_delay, max=self.max_delay),
            retry=tenacity.retry_if_exception(lambda exc: is_transient(exc) and not already_retried(exc)),
            reraise=True,
        )
        try:
            return retrying(fn)
        except Exception as exc:
            if not is_transient(exc) or isinstance(exc, StoreError) and not isinstance(exc, TransientStoreError):
                raise
            attempts = retrying.statistics.get("attempt_number", 1)
            client = " (each with the client's own retries)" if already_retried(exc) else ""
            raise StoreError(f"{what} failed after {attempts} attempt{'s' if attempts != 1 else ''}{client}: {type(exc).__name__}: {exc}") from exc
