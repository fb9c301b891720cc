"""``az://container/prefix`` through azure-storage-blob (imported only when an ``AzureStorage`` is made).

Which account, with which credential, in this order:

1. ``AZURE_STORAGE_CONNECTION_STRING`` (it names the account and its endpoint);
2. the account ``https://$AZURE_STORAGE_ACCOUNT.blob.core.windows.net`` (or ``endpoint_url``) with
   ``AZURE_STORAGE_KEY``, else ``AZURE_STORAGE_SAS_TOKEN``, else azure-identity's
   ``DefaultAzureCredential`` (a managed identity on an Azure VM) when azure-identity is installed.

To hand a key to the node, list its variable under ``secrets:`` in the spec. Blobs carry ``sha256``
in their metadata; each request body is checked with MD5 (``validate_content``). The SDK's retries
are off (``retry_total=0``): ``RemoteStorage._do`` is the one retry layer."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlparse

from .base import RemoteStorage, StorageError, join, parse_url

T = TypeVar("T")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_CLIENT_OPTIONS: dict[str, Any] = {"retry_total": 0, "max_single_put_size": 64 << 20, "max_block_size": 16 << 20,
                   "max_single_get_size": 32 << 20, "max_chunk_get_size": 16 << 20}


def _account_of(endpoint: str) -> str:
    """The account an endpoint URL names: ``https://ACCOUNT.blob...`` or, for an emulator,
    ``http://127.0.0.1:10000/ACCOUNT``."""
    parsed = urlparse(endpoint)
    host = parsed.hostname or ""
    path = parsed.path.strip("/")
    if path and (host.replace(".", "").isdigit() or host == "localhost" or ":" in host):
        return path.split("/")[0]
    return host.split(".")[0]


class AzureStorage(RemoteStorage):
    service = "Azure Blob"
    _sdk_modules = ("azure",)
    _HINTS: ClassVar[dict[str, str]] = {
        "ContainerNotFound": "create the container (`az storage container create -n NAME`), or fix "
            "storage.artifacts",
        "AuthenticationFailed": "the key or SAS token is not valid for this account",
        "AuthorizationPermissionMismatch": "these credentials may not use this container (read, write, "
            "list, delete)",
        "ClientAuthenticationError": "set AZURE_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_ACCOUNT and "
            "AZURE_STORAGE_KEY), listed under secrets: for the node",
    }

    def __init__(self, url: str, client: Any = None, *, endpoint_url: str | None = None, max_concurrency: int = 4,
                 attempts: int = 4, backoff_s: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(attempts=attempts, backoff_s=backoff_s, sleep=sleep)
        self.url, self.bucket, self.root = parse_url(url, "az")
        self.max_concurrency = max_concurrency
        self.container = client if client is not None else self._container(endpoint_url)

    def _container(self, endpoint_url: str | None) -> Any:
        from azure.storage.blob import BlobServiceClient

        conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "").strip()
        if conn:
            service = BlobServiceClient.from_connection_string(conn, **_CLIENT_OPTIONS)
            return service.get_container_client(self.bucket)
        account = os.environ.get("AZURE_STORAGE_ACCOUNT", "").strip()
        endpoint = endpoint_url or (f"https://{account}.blob.core.windows.net" if account else "")
        if not endpoint:
            raise StorageError(f"{self.url}: which Azure storage account? Set AZURE_STORAGE_CONNECTION_STRING, "
                               "or AZURE_STORAGE_ACCOUNT, or storage.endpoint_url",
                               hint="list the variables under secrets: so the node gets them too")
        credential: Any = None
        if key := os.environ.get("AZURE_STORAGE_KEY", "").strip():
            credential = {"account_name": account or _account_of(endpoint), "account_key": key}
        elif sas := os.environ.get("AZURE_STORAGE_SAS_TOKEN", "").strip():
            credential = sas
        else:
            try:
                from azure.identity import DefaultAzureCredential
            except ImportError:
                raise StorageError(f"{self.url}: no Azure credential: set AZURE_STORAGE_CONNECTION_STRING, "
                                   "AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN (or install azure-identity for a "
                                   "managed identity)", hint="list the variable under secrets: so the node gets it"
                                   ) from None
            credential = DefaultAzureCredential()
        return BlobServiceClient(endpoint, credential=credential, **_CLIENT_OPTIONS).get_container_client(self.bucket)

    def _transient(self, exc: BaseException) -> bool:
        from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

        if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
            return True
        if isinstance(exc, HttpResponseError):
            return (exc.status_code or 0) in _RETRY_STATUS
        return isinstance(exc, (ConnectionError, TimeoutError))

    def _maybe(self, what: str, fn: Callable[[], T]) -> T | None:
        from azure.core.exceptions import ResourceNotFoundError

        def go() -> T | None:
            try:
                return fn()
            except ResourceNotFoundError as exc:
                if getattr(exc, "error_code", None) == "ContainerNotFound" or "ContainerNotFound" in str(exc):
                    raise
                return None

        return self._do(what, go)

    def put_file(self, local: Path, key: str, sha256: str) -> None:
        def go() -> None:
            with open(local, "rb") as f:
                self.container.upload_blob(self._key(key), f, overwrite=True, metadata={"sha256": sha256},
                                           validate_content=True, max_concurrency=self.max_concurrency)

        self._do(f"upload of {key}", go)

    def get_file(self, key: str, local: Path) -> None:
        def go() -> None:
            with open(local, "wb") as f:
                self.container.download_blob(self._key(key), max_concurrency=self.max_concurrency).readinto(f)

        self._do(f"download of {key}", go)

    def stored_sha256(self, key: str) -> str | None:
        props = self._maybe(f"head of {key}",
                            lambda: self.container.get_blob_client(self._key(key)).get_blob_properties())
        return None if props is None else (props.metadata or {}).get("sha256")

    def put_bytes(self, key: str, data: bytes) -> None:
        sha = hashlib.sha256(data).hexdigest()
        self._do(f"upload of {key}", lambda: self.container.upload_blob(
            self._key(key), data, overwrite=True, metadata={"sha256": sha}, validate_content=True))

    def get_bytes(self, key: str) -> bytes | None:
        data = self._maybe(f"download of {key}", lambda: self.container.download_blob(self._key(key)).readall())
        return None if data is None else bytes(data)

    def delete(self, key: str) -> None:
        self._maybe(f"delete of {key}", lambda: self.container.delete_blob(self._key(key)))

    def list_keys(self, prefix: str = "") -> list[str]:
        full = join(self.root, prefix)

        def go() -> list[str]:
            blobs = self.container.list_blobs(name_starts_with=full + "/" if full else None)
            cut = len(self.root) + 1 if self.root else 0
            return sorted(b.name[cut:] for b in blobs)

        return self._do(f"listing of {full or '/'}", go)
