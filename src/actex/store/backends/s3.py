"""s3://: s3fs, with S3's conditional requests (If-None-Match: *, If-Match: <etag>).

Plain writes, exclusive creates and reads go through s3fs; a versioned read and the
compare-and-swap call the S3 API through s3fs's client, which s3fs has no method for.
"""

from __future__ import annotations

import os
import secrets
import threading

import fsspec

from actex.store.backends.base import TEMP_PREFIX, Backend
from actex.store.errors import exception_chain, http_status, s3_error_code


def _is_precondition_failure(exc: BaseException) -> bool:
    """S3 refused a conditional request: 412 / PreconditionFailed, anywhere up the causes."""
    return any(s3_error_code(e) == "PreconditionFailed" or http_status(e) == 412
               for e in exception_chain(exc, explicit_only=True))


# Set to 1 to skip the probe of If-None-Match on S3-compatible stores. UNSAFE: on a store
# that ignores the header, a conditional create overwrites, so two workers racing on one
# chunk can both "commit" (the later record wins; nothing is lost but exactly-once is).
UNSAFE_S3_ENV = "ACTEX_UNSAFE_S3_NO_CONDITIONAL_CREATE"


class S3Backend(Backend):
    """s3fs: `pipe_file(mode="create")` sends If-None-Match: *; replace sends If-Match: <etag>.

    Some S3-compatible stores accept If-None-Match and ignore it. So before the first
    conditional create in a bucket (the run's run.json, before anything else is written),
    the backend proves the store enforces it: it creates a probe object twice, and the
    second create must fail. The verdict is cached per (endpoint, bucket) for the process.
    """

    _verdicts: dict[tuple[str, str], bool] = {}
    _probing = threading.Lock()

    def create_exclusive(self, path: str, data: bytes) -> bool:
        self._require_conditional_create(path)
        return super().create_exclusive(path, data)

    def _require_conditional_create(self, path: str) -> None:
        if os.environ.get(UNSAFE_S3_ENV) == "1":
            return
        bucket = self.fs.split_path(path)[0]
        key = (str(getattr(self.fs, "endpoint_url", None) or ""), bucket)
        with self._probing:
            if key not in self._verdicts:
                self._verdicts[key] = self._enforces_if_none_match(os.path.dirname(path))
        if not self._verdicts[key]:
            raise ValueError(
                f"s3://{bucket}{' at ' + key[0] if key[0] else ''} ignores If-None-Match, so actex cannot "
                f"commit exactly once there; use another store, or set {UNSAFE_S3_ENV}=1 to run anyway (UNSAFE)")

    def _enforces_if_none_match(self, directory: str) -> bool:
        probe = f"{directory}/{TEMP_PREFIX}probe-{secrets.token_hex(8)}"
        # The first write is unconditional: a retried write whose answer was lost cannot
        # then be mistaken for a refusal. Only the second, conditional one tests the store.
        self.fs.pipe_file(probe, b"first")
        try:
            self.fs.pipe_file(probe, b"second", mode="create")
        except FileExistsError:
            return True
        except OSError as exc:
            if _is_precondition_failure(exc):
                return True
            raise
        finally:
            self.fs.rm_file(probe)
        return False

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(path)

        async def get() -> tuple[bytes, str]:
            # One GET: the body and the ETag of that very object version.
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        return fsspec.asyn.sync(self.fs.loop, get)

    def replace_if_version(self, path: str, data: bytes, version: str) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _is_precondition_failure(exc):
                return False
            raise
        finally:
            self.fs.invalidate_cache(path)
        return True
