"""``s3://bucket/prefix`` through boto3, and S3-compatible stores (Cloudflare R2, MinIO) through
an endpoint URL. boto3 is imported only when an ``S3Storage`` is made.

Objects carry ``sha256`` in their metadata and are sent with S3's own SHA256 checksums; large files
go multipart through boto3's ``TransferConfig``."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .base import RemoteStorage, join, parse_url

T = TypeVar("T")
_RETRY_CODES = {"RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable", "Throttling",
                "ThrottlingException", "RequestTimeTooSkewed", "503", "500"}


class S3Storage(RemoteStorage):
    """``s3://bucket/prefix`` through boto3. Pass ``client`` for a ready client (tests use moto's
    server) or ``endpoint_url`` for an S3-compatible store; otherwise boto3's default credential
    chain and ``AWS_ENDPOINT_URL`` apply. botocore's own retries are off (``total_max_attempts: 1``):
    ``RemoteStorage._do`` is the one retry layer."""

    service = "S3"
    _sdk_modules = ("botocore", "boto3", "s3transfer")
    _HINTS: ClassVar[dict[str, str]] = {
        "NoSuchBucket": "create the bucket, or fix storage.artifacts",
        "AccessDenied": "these credentials may not use this bucket (s3:GetObject, s3:PutObject, "
            "s3:ListBucket)",
        "NoCredentialsError": "no AWS credentials: `aws configure`, AWS_PROFILE, or an instance profile "
            "on the node (for R2 and other S3-compatible stores: list AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY under secrets:)",
    }

    def __init__(self, url: str, client: Any = None, *, endpoint_url: str | None = None, transfer_config: Any = None,
                 attempts: int = 4, backoff_s: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        super().__init__(attempts=attempts, backoff_s=backoff_s, sleep=sleep)
        self.url, self.bucket, self.root = parse_url(url, "s3")
        config = Config(retries={"total_max_attempts": 1, "mode": "standard"})
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self.transfer = transfer_config or TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20,
                                                          max_concurrency=8)

    def _transient(self, exc: BaseException) -> bool:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return False
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return err.get("Code") in _RETRY_CODES or status >= 500
        if isinstance(exc, S3UploadFailedError):
            return not any(code in str(exc) for code in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId"))
        return isinstance(exc, (BotoCoreError, ConnectionError, TimeoutError))

    def put_file(self, local: Path, key: str, sha256: str) -> None:
        extra = {"Metadata": {"sha256": sha256}, "ChecksumAlgorithm": "SHA256"}
        self._do(f"upload of {key}", lambda: self.client.upload_file(
            str(local), self.bucket, self._key(key), ExtraArgs=extra, Config=self.transfer))

    def get_file(self, key: str, local: Path) -> None:
        self._do(f"download of {key}", lambda: self.client.download_file(
            self.bucket, self._key(key), str(local), Config=self.transfer))

    def _maybe(self, what: str, fn: Callable[[], T]) -> T | None:
        """``fn``'s result, or None when the object does not exist."""
        from botocore.exceptions import ClientError

        def go() -> T | None:
            try:
                return fn()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

        return self._do(what, go)

    def stored_sha256(self, key: str) -> str | None:
        head = self._maybe(f"head of {key}", lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        return None if head is None else head.get("Metadata", {}).get("sha256")

    def put_bytes(self, key: str, data: bytes) -> None:
        sha = hashlib.sha256(data).hexdigest()
        self._do(f"upload of {key}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, Metadata={"sha256": sha}, ChecksumAlgorithm="SHA256"))

    def get_bytes(self, key: str) -> bytes | None:
        obj = self._maybe(f"download of {key}", lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key)))
        return None if obj is None else bytes(obj["Body"].read())

    def delete(self, key: str) -> None:
        self._do(f"delete of {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def list_keys(self, prefix: str = "") -> list[str]:
        full = join(self.root, prefix)

        def go() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full + "/" if full else "")
            keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
            cut = len(self.root) + 1 if self.root else 0
            return sorted(k[cut:] for k in keys)

        return self._do(f"listing of {full or '/'}", go)
