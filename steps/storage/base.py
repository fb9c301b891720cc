"""The storage interface and what every backend shares: folders verified by a manifest.

``sync_up(local_dir, prefix)`` uploads every file (skipping ones already there with the same
sha256, so a retried upload resumes), then writes the folder's manifest ``.optjob-manifest.json``
(each file's size and sha256) *last*: a folder — a checkpoint — is complete exactly when its
manifest exists. ``sync_down`` refuses a folder without one and verifies every file it fetches.
``latest_checkpoint`` / ``download_latest`` pick the newest complete checkpoint.

A backend implements seven primitives (put/get a file, put/get bytes, the stored sha256, delete,
list). A bucket backend (``RemoteStorage``) is the one retry layer at its boundary: each call is
tried ``attempts`` (4) times, waiting ``backoff_s`` doubled each time (1, 2, 4 s), with its SDK's
own retries off so the two never multiply; an SDK error becomes a ``StorageError`` with a hint.
"""

from __future__ import annotations

import abc
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, TypeVar

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




_URL = re.compile(r"^([a-z0-9]+)://([^/]+)/?(.*)$")


def parse_url(url: str, scheme: str) -> tuple[str, str, str]:
    """``scheme://bucket/prefix`` -> (url without trailing /, bucket, prefix without slashes)."""
    m = _URL.match(url)
    if not m or m.group(1) != scheme:
        raise StorageError(f"{url!r} is not {scheme}://bucket/prefix")
    return url.rstrip("/"), m.group(2), m.group(3).strip("/")


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


class RemoteStorage(Storage):
    """A bucket reached through a cloud SDK: keys live below ``root`` in ``bucket``.

    Subclasses say which failures are transient (``_transient``), which exceptions are their
    SDK's (``_sdk_modules``), and what to tell the user (``_HINTS``: a word found in the error's
    text or class names -> the hint)."""

    service = "storage"
    bucket: str
    root: str
    _sdk_modules: tuple[str, ...] = ()
    _HINTS: ClassVar[dict[str, str]] = {}

    def __init__(self, *, attempts: int = 4, backoff_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.attempts, self.backoff_s, self.sleep = attempts, backoff_s, sleep

    def _key(self, key: str) -> str:
        return join(self.root, key)

    def _transient(self, exc: BaseException) -> bool:
        return isinstance(exc, (ConnectionError, TimeoutError))

    def _do(self, what: str, fn: Callable[[], T]) -> T:
        """Call ``fn``, retrying transient failures with doubling waits; SDK errors -> StorageError."""
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if attempt < self.attempts and self._transient(exc):
                    self.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                if isinstance(exc, StorageError):
                    raise
                if not type(exc).__module__.startswith(self._sdk_modules):
                    raise  # not the service's doing (a crash, a bug): let it through unchanged
                names = [c.__name__ for c in type(exc).__mro__]
                hint = next((h for k, h in self._HINTS.items() if k in str(exc) or k in names), None)
                raise StorageError(f"{self.service} {what} failed: {_text(exc)}", hint=hint) from exc
        raise AssertionError("unreachable")
