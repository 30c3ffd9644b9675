"""What a failed store operation raises, and how to read the error a client library raised.

Client libraries wrap their errors (s3fs turns a botocore ClientError into an OSError,
requests wraps urllib3's, actex names the object around them), so whoever asks "was this
a 503?" or "was this the user's missing file?" walks the chain of causes: `exception_chain`.
"""

from __future__ import annotations


class StoreError(OSError):
    """A store operation failed for good (after retries, or for a non-transient reason)."""


class TransientStoreError(StoreError):
    """A failure worth retrying; also what tests raise to inject faults."""


def exception_chain(exc: BaseException, *, explicit_only: bool = False) -> list[BaseException]:
    """`exc`, then what caused it, then what caused that, ...: each exception once.

    The next link is `__cause__` (`raise ... from error`), else `__context__` (raised while
    handling `error`); with `explicit_only`, `__cause__` alone. A cycle ends the chain.
    """
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not seen for seen in chain):
        chain.append(cur)
        cur = cur.__cause__ if explicit_only else cur.__cause__ or cur.__context__
    return chain


def http_status(exc: BaseException) -> int | None:
    """The HTTP status one exception carries (not its causes): `.code` (gcsfs HttpError,
    google.api_core errors) or botocore's `.response`; None if it carries none."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    return None


def s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code one botocore ClientError carries ("SlowDown", "PreconditionFailed")."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None
