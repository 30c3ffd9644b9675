"""gs://: gcsfs for plain writes, google-cloud-storage for the conditional ones.

The conditional operations ride on GCS object generations: a create is an upload with
`if_generation_match=0` (only if no live object), a compare-and-swap an upload with
`if_generation_match=<generation read>`. google-cloud-storage sends those small uploads
as one multipart request, whose precondition both GCS and fake-gcs-server (the tests'
emulator) enforce. Both clients share gcsfs's endpoint, project and credentials, so they
reach the same bucket as the same principal (and, in the tests, the same fault proxy).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator

import fsspec

from actex.store.backends.base import Backend
from actex.store.errors import http_status

# One storage client per gcsfs filesystem and process: a client holds a connection pool,
# which a forked child must not share with its parent. Kept out of the backend so a
# Store stays picklable.
_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_clients_lock = threading.Lock()


def storage_client(fs: fsspec.AbstractFileSystem):
    """The google.cloud.storage.Client for gcsfs filesystem `fs` (its endpoint, project and
    credentials; anonymous where gcsfs is, e.g. `token="anon"` against an emulator)."""
    with _clients_lock:
        pid, client = _clients.get(fs, (None, None))
        if pid != os.getpid():
            # Imported here: google-cloud-storage comes with the gcs extra, not with actex.
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            client = storage.Client(
                project=fs.project,
                credentials=fs.credentials.credentials or AnonymousCredentials(),
                client_options={"api_endpoint": fs._location},
            )
            _clients[fs] = (os.getpid(), client)
        return client


@contextlib.contextmanager
def _as_os_errors(path: str) -> Iterator[None]:
    """google-cloud-storage's errors as the OSErrors gcsfs raises for the same answers:
    404 FileNotFoundError, 401/403 PermissionError (both naming `path`), so callers and
    the CLI's exit codes see one kind of error per cause. Others pass unchanged: the retry
    policy reads their HTTP status."""
    from google.api_core.exceptions import GoogleAPICallError

    try:
        yield
    except GoogleAPICallError as error:
        status = http_status(error)
        if status == 404:
            raise FileNotFoundError(2, f"not found: {error.message}", path) from error
        if status in (401, 403):
            raise PermissionError(13, f"permission denied: {error.message}", path) from error
        raise


class GCSBackend(Backend):
    """gcsfs writes; conditional writes and versioned reads through google-cloud-storage.

    The library retries its transient failures itself (its default policy:
    5xx/429/408 and connection errors, with backoff), which `retry.client_retries` knows.
    """

    def _blob(self, path: str):
        bucket, key, _ = self.fs.split_path(path)
        return storage_client(self.fs).bucket(bucket).blob(key)

    def _upload_if_generation(self, path: str, data: bytes, generation: int) -> bool:
        """Upload iff the live object's generation is `generation` (0: no live object)."""
        from google.api_core.exceptions import PreconditionFailed

        try:
            with _as_os_errors(path):
                self._blob(path).upload_from_string(data, if_generation_match=generation)
        except PreconditionFailed:
            return False
        finally:
            self.fs.invalidate_cache(path)  # gcsfs's listing cache does not see this upload
        return True

    def create_exclusive(self, path: str, data: bytes) -> bool:
        return self._upload_if_generation(path, data, 0)

    def read_versioned(self, path: str) -> tuple[bytes, str]:
        blob = self._blob(path)
        with _as_os_errors(path):
            # One GET: the body and the generation of that very object (x-goog-generation).
            data = blob.download_as_bytes()
        return data, str(blob.generation)

    def replace_if_version(self, path: str, data: bytes, version: str) -> bool:
        try:
            return self._upload_if_generation(path, data, int(version))
        except FileNotFoundError:  # a deleted object answers 412; a 404 means the same here
            return False
