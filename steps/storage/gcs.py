"""``gs://bucket/prefix`` through google-cloud-storage (imported only when a ``GCSStorage`` is made).

Credentials: Google's default chain — the node's service account on GCP (the metadata server),
``GOOGLE_APPLICATION_CREDENTIALS``, or ``gcloud auth application-default login``.
``STORAGE_EMULATOR_HOST`` (an emulator, tests) is honoured by the SDK itself. Objects carry
``sha256`` in their metadata; the SDK checks each transfer with CRC32C. Every call passes
``retry=None``: ``RemoteStorage._do`` is the one retry layer."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .base import RemoteStorage, join, parse_url

T = TypeVar("T")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class GCSStorage(RemoteStorage):
    service = "GCS"
    _sdk_modules = ("google", "requests", "urllib3")
    _HINTS: ClassVar[dict[str, str]] = {
        "DefaultCredentialsError": "no Google credentials: `gcloud auth application-default login`, "
            "GOOGLE_APPLICATION_CREDENTIALS, or a service account on the node",
        "Forbidden": "these credentials may not use this bucket (storage.objects.get, .create, .list, .delete)",
        "NotFound": "create the bucket (`gcloud storage buckets create gs://NAME`), or fix storage.artifacts",
    }

    def __init__(self, url: str, client: Any = None, *, endpoint_url: str | None = None,
                 chunk_size: int = 64 << 20, attempts: int = 4, backoff_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(attempts=attempts, backoff_s=backoff_s, sleep=sleep)
        self.url, self.bucket, self.root = parse_url(url, "gs")
        if client is None:
            from google.cloud import storage

            options = {"api_endpoint": endpoint_url} if endpoint_url else None
            client = self._do("client setup", lambda: storage.Client(client_options=options))
        self.client = client
        self._bucket = client.bucket(self.bucket)
        self.chunk_size = chunk_size  # resumable uploads above it go in chunks of this size

    def _transient(self, exc: BaseException) -> bool:
        from google.api_core import exceptions as api
        from google.auth.exceptions import TransportError

        if isinstance(exc, api.GoogleAPICallError):
            return exc.code in _RETRY_STATUS
        try:
            import requests

            net: tuple[type[BaseException], ...] = (requests.ConnectionError, requests.Timeout,
                                                   requests.exceptions.ChunkedEncodingError)
        except ImportError:  # pragma: no cover - google-cloud-storage depends on requests
            net = ()
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None and type(exc).__module__.startswith("google"):
            return int(status) in _RETRY_STATUS  # google.resumable_media's InvalidResponse
        return isinstance(exc, (TransportError, ConnectionError, TimeoutError, *net))

    def _blob(self, key: str) -> Any:
        return self._bucket.blob(self._key(key), chunk_size=self.chunk_size)

    def _maybe(self, what: str, fn: Callable[[], T]) -> T | None:
        from google.api_core.exceptions import NotFound

        def go() -> T | None:
            try:
                return fn()
            except NotFound as exc:
                if "bucket" in str(exc).lower() and "does not exist" in str(exc).lower():
                    raise
                return None

        return self._do(what, go)

    def put_file(self, local: Path, key: str, sha256: str) -> None:
        def go() -> None:
            blob = self._blob(key)
            blob.metadata = {"sha256": sha256}
            blob.upload_from_filename(str(local), retry=None)

        self._do(f"upload of {key}", go)

    def get_file(self, key: str, local: Path) -> None:
        self._do(f"download of {key}", lambda: self._blob(key).download_to_filename(str(local), retry=None))

    def stored_sha256(self, key: str) -> str | None:
        blob = self._maybe(f"head of {key}", lambda: self._bucket.get_blob(self._key(key), retry=None))
        return None if blob is None else (blob.metadata or {}).get("sha256")

    def put_bytes(self, key: str, data: bytes) -> None:
        def go() -> None:
            blob = self._blob(key)
            blob.metadata = {"sha256": hashlib.sha256(data).hexdigest()}
            blob.upload_from_string(data, retry=None)

        self._do(f"upload of {key}", go)

    def get_bytes(self, key: str) -> bytes | None:
        data = self._maybe(f"download of {key}", lambda: self._blob(key).download_as_bytes(retry=None))
        return None if data is None else bytes(data)

    def delete(self, key: str) -> None:
        self._maybe(f"delete of {key}", lambda: self._blob(key).delete(retry=None))

    def list_keys(self, prefix: str = "") -> list[str]:
        full = join(self.root, prefix)

        def go() -> list[str]:
            blobs = self.client.list_blobs(self.bucket, prefix=full + "/" if full else None, retry=None)
            cut = len(self.root) + 1 if self.root else 0
            return sorted(b.name[cut:] for b in blobs)

        return self._do(f"listing of {full or '/'}", go)
