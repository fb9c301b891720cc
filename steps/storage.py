"""Artifact storage: a local folder or ``s3://bucket/prefix``, with verified folders.

``sync_up(local_dir, prefix)`` uploads every file (skipping ones already there
with the same sha256, so a retried upload resumes), then writes the folder's
manifest ``.optjob-manifest.json`` (each file's size and sha256) *last*: a
folder — a checkpoint — is complete exactly when its manifest exists.
``sync_down`` refuses a folder without one and verifies every file it fetches.
``latest_checkpoint`` / ``download_latest`` pick the newest complete checkpoint.

S3 objects also carry ``sha256`` in their metadata and are sent with S3's own
SHA256 checksums; large files go multipart through boto3's ``TransferConfig``.
boto3 is imported only by ``S3Storage``.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from optjob.specs.errors import ProviderError
from optjob.steps import layout

T = TypeVar("T")
MANIFEST = ".optjob-manifest.json"
_STEP = re.compile(r"(\d+)$")


class StorageError(ProviderError):
    """Artifact storage failed, or a folder in it is incomplete or corrupt."""


sha256_file = layout.sha256_file


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


@dataclass(frozen=True)
class Manifest:
    files: dict[str, dict[str, Any]]  # relative path -> {"size": int, "sha256": str}
    created: float
    step: int | None = None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        d = json.loads(data)
        return cls(files=dict(d["files"]), created=float(d["created"]), step=d.get("step"))


def _partial(name: str) -> bool:
    return name.startswith(".") and name.endswith(".part")


def _safe_rel(rel: str) -> str:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise StorageError(f"manifest names an unsafe path {rel!r}")
    return p.as_posix()


class Storage(abc.ABC):
    """Keys are ``/``-separated paths below the storage's root (its URL)."""

    url: str

    @abc.abstractmethod
    def put_file(self, local: Path, key: str, sha256: str) -> None: ...
    @abc.abstractmethod
    def get_file(self, key: str, local: Path) -> None: ...
    @abc.abstractmethod
    def stored_sha256(self, key: str) -> str | None: ...  # None: no such key
    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...
    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes | None: ...  # None: no such key
    @abc.abstractmethod
    def delete(self, key: str) -> None: ...
    @abc.abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]: ...  # every key below prefix, sorted

    # -- folders ----------------------------------------------------------------------------------
    def sync_up(self, local_dir: Path, prefix: str, step: int | None = None) -> Manifest:
        """Upload a folder; ``step`` defaults to the trailing number of its name (step-000300)."""
        if self.get_bytes(join(prefix, MANIFEST)) is not None:
            self.delete(join(prefix, MANIFEST))  # incomplete while it changes
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            if rel == MANIFEST or _partial(path.name):
                continue
            sha = sha256_file(path)
            if self.stored_sha256(join(prefix, rel)) != sha:
                self.put_file(path, join(prefix, rel), sha)
            files[rel] = {"size": path.stat().st_size, "sha256": sha}
        if step is None and (m := _STEP.search(Path(local_dir).name)):
            step = int(m.group(1))
        manifest = Manifest(files=files, created=time.time(), step=step)
        self.put_bytes(join(prefix, MANIFEST), manifest.to_bytes())  # last: marks it complete
        return manifest

    def manifest(self, prefix: str) -> Manifest | None:
        data = self.get_bytes(join(prefix, MANIFEST))
        if data is None:
            return None
        try:
            return Manifest.from_bytes(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{self.url}/{prefix}: unreadable manifest ({exc})") from None

    def sync_down(self, prefix: str, local_dir: Path) -> Manifest:
        """Fetch a complete folder, verifying each file; files already there and intact are kept."""
        manifest = self.manifest(prefix)
        if manifest is None:
            raise StorageError(f"{join(self.url, prefix)} has no {MANIFEST}: incomplete or missing")
        for rel, meta in manifest.files.items():
            dest = Path(local_dir) / _safe_rel(rel)
            if dest.is_file() and sha256_file(dest) == meta["sha256"]:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(f".{dest.name}.part")
            self.get_file(join(prefix, rel), part)
            got = sha256_file(part)
            if got != meta["sha256"]:
                part.unlink(missing_ok=True)
                raise StorageError(f"{join(self.url, prefix, rel)}: sha256 {got[:12]}… does not match "
                                   f"the manifest's {meta['sha256'][:12]}…")
            os.replace(part, dest)
        return manifest

    def checkpoints(self, prefix: str) -> list[str]:
        """Complete checkpoint folders directly below ``prefix`` (their names)."""
        names = set()
        for key in self.list_keys(prefix):
            rel = PurePosixPath(key).relative_to(prefix.strip("/")) if prefix.strip("/") else PurePosixPath(key)
            if len(rel.parts) == 2 and rel.parts[1] == MANIFEST:
                names.add(rel.parts[0])
        return sorted(names)

    def latest_checkpoint(self, prefix: str) -> str | None:
        """The newest complete checkpoint: highest step, then newest manifest."""
        best: tuple[int, float, str] | None = None
        for name in self.checkpoints(prefix):
            m = self.manifest(join(prefix, name))
            if m is None:
                continue
            step = m.step if m.step is not None else -1
            if best is None or (step, m.created, name) > best:
                best = (step, m.created, name)
        return best[2] if best else None

    def download_latest(self, prefix: str, local_dir: Path) -> Path | None:
        name = self.latest_checkpoint(prefix)
        if name is None:
            return None
        self.sync_down(join(prefix, name), Path(local_dir) / name)
        return Path(local_dir) / name


class LocalStorage(Storage):
    """A folder; the same layout and manifests as a bucket (``stored_sha256`` hashes the file)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.root = Path(folder).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _safe_rel(key)

    def put_file(self, local: Path, key: str, sha256: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)

    def get_file(self, key: str, local: Path) -> None:
        shutil.copyfile(self._path(key), local)

    def stored_sha256(self, key: str) -> str | None:
        return sha256_file(self._path(key)) if self._path(key).is_file() else None

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list_keys(self, prefix: str = "") -> list[str]:
        base = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        files = (p for p in base.rglob("*") if p.is_file() and not _partial(p.name))
        return sorted(p.relative_to(self.root).as_posix() for p in files)


def open_storage(url: str, **kwargs: Any) -> Storage:
    """``s3://bucket/prefix`` -> ``S3Storage``; anything else is a local folder."""
    return S3Storage(url, **kwargs) if url.startswith("s3://") else LocalStorage(url)


_RETRY_CODES = {"RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable", "Throttling",
                "ThrottlingException", "RequestTimeTooSkewed", "503", "500"}
_HINTS = {"NoSuchBucket": "create the bucket, or fix storage.artifacts",
          "AccessDenied": "these credentials may not use this bucket (s3:GetObject, s3:PutObject, s3:ListBucket)",
          "NoCredentialsError": "no AWS credentials: `aws configure`, AWS_PROFILE, or an instance profile on the node"}


def _s3_transient(exc: BaseException) -> bool:
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


class S3Storage(Storage):
    """``s3://bucket/prefix`` through boto3. Pass ``client`` for another endpoint
    (tests use moto's server); otherwise boto3's default credential chain and
    ``AWS_ENDPOINT_URL`` apply.

    Retries: this class is the one layer at the S3 boundary — ``attempts`` (4) tries of each call,
    waiting ``backoff_s`` doubled each time (1, 2, 4 s: at most 7 s of waiting per call). botocore's
    own retries are off (``total_max_attempts: 1``), so the two never multiply."""

    def __init__(self, url: str, client: Any = None, *, transfer_config: Any = None, attempts: int = 4,
                 backoff_s: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        m = re.match(r"^s3://([^/]+)/?(.*)$", url)
        if not m:
            raise StorageError(f"{url!r} is not s3://bucket/prefix")
        self.url, self.bucket, self.root = url.rstrip("/"), m.group(1), m.group(2).strip("/")
        self.client = client or boto3.client("s3", config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))
        self.transfer = transfer_config or TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20,
                                                          max_concurrency=8)
        self.attempts, self.backoff_s, self.sleep = attempts, backoff_s, sleep

    def _key(self, key: str) -> str:
        return join(self.root, key)

    def _do(self, what: str, fn: Callable[[], T]) -> T:
        """Call ``fn``, retrying transient S3 failures with doubling waits; boto errors -> StorageError."""
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if attempt < self.attempts and _s3_transient(exc):
                    self.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                if not type(exc).__module__.startswith(("botocore", "boto3", "s3transfer")):
                    raise  # not S3's doing (a crash, a bug): let it through unchanged
                names = [c.__name__ for c in type(exc).__mro__]
                hint = next((h for k, h in _HINTS.items() if k in str(exc) or k in names), None)
                raise StorageError(f"S3 {what} failed: {' '.join(str(exc).split())[:300]}", hint=hint) from exc
        raise AssertionError("unreachable")

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
