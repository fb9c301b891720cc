"""A local folder as artifact storage: the same layout and manifests as a bucket."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .base import Storage, _partial, _safe_rel, sha256_file


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
