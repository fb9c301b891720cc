"""Artifact storage behind one small interface (``Storage``): a local folder, ``s3://`` (and
S3-compatible stores through an endpoint URL), ``gs://`` and ``az://``. One module per backend;
each imports its SDK only when a storage of its kind is opened (boto3, google-cloud-storage,
azure-storage-blob), so a node installs just the one its bucket needs.

Every folder is written with a manifest of sha256s last (``base``), so a push cut off half way is
ignored; ``steps.sync`` keeps a job folder and its storage in step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .azure import AzureStorage
from .base import MANIFEST, Manifest, RemoteStorage, Storage, StorageError, join, sha256_file
from .gcs import GCSStorage
from .local import LocalStorage
from .s3 import S3Storage

__all__ = ["MANIFEST", "SDK_PACKAGES", "AzureStorage", "GCSStorage", "LocalStorage", "Manifest", "RemoteStorage",
           "S3Storage", "Storage", "StorageError", "join", "open_storage", "scheme_of", "sha256_file"]

#: The one package a node needs for each bucket scheme (its version comes from the node lock).
SDK_PACKAGES = {"s3": "boto3", "gs": "google-cloud-storage", "az": "azure-storage-blob"}
_BACKENDS: dict[str, Callable[..., Storage]] = {"s3": S3Storage, "gs": GCSStorage, "az": AzureStorage}


def scheme_of(url: str) -> str | None:
    """``s3``, ``gs`` or ``az`` for a bucket URL; None for a folder."""
    scheme = url.split("://", 1)[0] if "://" in url else None
    return scheme if scheme in _BACKENDS else None


def open_storage(url: str, *, endpoint_url: str | None = None, **kwargs: Any) -> Storage:
    """The storage ``url`` names: a bucket (``endpoint_url``: its service's endpoint, for an
    S3-compatible store, an Azure account or an emulator), or else a local folder."""
    scheme = scheme_of(url)
    if scheme is None:
        if "://" in url:
            raise StorageError(f"{url!r}: only s3://, gs://, az:// URLs or a local folder")
        return LocalStorage(url)
    try:
        return _BACKENDS[scheme](url, endpoint_url=endpoint_url, **kwargs)
    except ImportError as exc:
        raise StorageError(f"{url} needs the {SDK_PACKAGES[scheme]} package ({exc})",
                           hint=f"pip install {SDK_PACKAGES[scheme]} (or 'optjob[cloud]')") from None
