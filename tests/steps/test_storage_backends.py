"""Every storage backend behind one interface, against a real server on 127.0.0.1: a local folder,
S3 (moto's server), GCS (gcp-storage-emulator, PyPI) and Azure Blob (Azurite, npm). The same
protocol on each: a folder is complete once its manifest (sha256s) is written, last; a torn push is
ignored; a corrupt file is refused; the sync keeps the newest two checkpoints."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from buckets import BACKENDS, new_bucket, opts
from optjob.steps.storage import (
    MANIFEST,
    AzureStorage,
    GCSStorage,
    LocalStorage,
    S3Storage,
    Storage,
    StorageError,
    open_storage,
    sha256_file,
)
from optjob.steps.sync import Sync


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Storage:
    url, env = new_bucket(request.param, request, tmp_path, monkeypatch)
    store = open_storage(url, **opts(env, sleep=lambda s: None)) if request.param != "local" else open_storage(url)
    assert type(store) is {"local": LocalStorage, "s3": S3Storage, "gcs": GCSStorage, "azure": AzureStorage}[
        request.param]
    return store


def make_folder(root: Path, seed: int, big: int = 0) -> Path:
    root.mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps({"seed": seed}))
    (root / "sub").mkdir()
    (root / "sub" / "weights.bin").write_bytes(os.urandom(200_000))
    if big:
        (root / "zz-big.bin").write_bytes(os.urandom(big))
    return root


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != MANIFEST) \
        and all(sha256_file(a / f) == sha256_file(b / f) for f in files)


def test_round_trip_with_checksums(storage: Storage, tmp_path: Path) -> None:
    src = make_folder(tmp_path / "step-000100", seed=1, big=9 << 20)  # > 8 MB: resumable / block uploads
    manifest = storage.sync_up(src, "checkpoints/step-000100")
    assert manifest.step == 100 and set(manifest.files) == {"meta.json", "sub/weights.bin", "zz-big.bin"}
    assert storage.list_keys("checkpoints") == ["checkpoints/step-000100/" + k
                                               for k in (MANIFEST, "meta.json", "sub/weights.bin", "zz-big.bin")]
    assert storage.stored_sha256("checkpoints/step-000100/zz-big.bin") == sha256_file(src / "zz-big.bin")
    assert storage.stored_sha256("checkpoints/step-000100/nothing-here") is None
    assert storage.get_bytes("checkpoints/nothing-here") is None
    out = tmp_path / "down"
    assert storage.sync_down("checkpoints/step-000100", out) == manifest
    assert same_tree(src, out)
    storage.delete("checkpoints/step-000100/meta.json")
    storage.delete("checkpoints/step-000100/meta.json")  # idempotent
    assert "checkpoints/step-000100/meta.json" not in storage.list_keys()


def test_a_torn_push_is_ignored(storage: Storage, tmp_path: Path) -> None:
    assert storage.latest_checkpoint("ckpt") is None and storage.download_latest("ckpt", tmp_path) is None
    for step in (100, 200):
        storage.sync_up(make_folder(tmp_path / f"step-{step:06d}", seed=step), f"ckpt/step-{step:06d}")
    half = make_folder(tmp_path / "step-000300", seed=300)
    storage.put_file(half / "meta.json", "ckpt/step-000300/meta.json", sha256_file(half / "meta.json"))
    assert storage.checkpoints("ckpt") == ["step-000100", "step-000200"]
    assert storage.latest_checkpoint("ckpt") == "step-000200"  # 300 has no manifest: ignored
    with pytest.raises(StorageError, match="incomplete"):
        storage.sync_down("ckpt/step-000300", tmp_path / "nope")
    got = storage.download_latest("ckpt", tmp_path / "resume")
    assert got == tmp_path / "resume" / "step-000200" and same_tree(tmp_path / "step-000200", got)
    storage.sync_up(half, "ckpt/step-000300")  # the retry completes it: only now does it count
    assert storage.latest_checkpoint("ckpt") == "step-000300"


def test_corruption_is_detected(storage: Storage, tmp_path: Path) -> None:
    src = make_folder(tmp_path / "step-000001", seed=1)
    storage.sync_up(src, "c/step-000001")
    bad = tmp_path / "bad.json"
    bad.write_text("tampered")
    storage.put_file(bad, "c/step-000001/meta.json", sha256_file(bad))
    with pytest.raises(StorageError, match="does not match"):
        storage.sync_down("c/step-000001", tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def checkpoint(root: Path, step: int) -> Path:
    folder = root / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(os.urandom(1000))
    (folder / "meta.json").write_text(json.dumps({"step": step}))
    files = {n: sha256_file(folder / n) for n in ("model.pt", "meta.json")}
    (folder / "manifest.json").write_text(json.dumps({"step": step, "files": files}))
    return folder


def test_sync_keeps_the_newest_two_checkpoints_and_a_fresh_node_resumes(storage: Storage, tmp_path: Path) -> None:
    node = tmp_path / "node-a"
    sync = Sync(storage, node)
    ckpts = node / "steps" / "00-train" / "checkpoints"
    import shutil

    for step in (4, 8, 12):
        folder = checkpoint(ckpts, step)
        if step == 12:
            shutil.rmtree(ckpts / "step-000004")  # steps.checkpoint keeps two on disk
        sync.push_checkpoint(folder, step)
    assert storage.checkpoints("steps/00-train/checkpoints") == ["step-000008", "step-000012"]
    got = Sync(storage, tmp_path / "node-b").pull()
    assert got["checkpoints"] == ["00-train/step-000012"]
    assert same_tree(ckpts / "step-000012", tmp_path / "node-b" / "steps" / "00-train" / "checkpoints" / "step-000012")


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_a_missing_bucket_is_one_actionable_error(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    url, env = new_bucket(kind, request, tmp_path, monkeypatch)
    scheme = url.split("://")[0]
    store = open_storage(f"{scheme}://no-such-bucket-{uuid.uuid4().hex[:8]}/x", **opts(env, sleep=lambda s: None))
    with pytest.raises(StorageError) as info:
        store.sync_up(make_folder(tmp_path / "f", seed=1), "f")
    assert "create the" in (info.value.hint or ""), (str(info.value), info.value.hint)


def _flaky(cls: type, name: str, exc: Callable[[], BaseException], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ``cls.name`` fail once with ``exc()``, then behave."""
    calls: list[int] = []
    real = getattr(cls, name)

    def once(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise exc()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, once)
    return calls


@pytest.mark.parametrize("kind", ["gcs", "azure"])
def test_a_transient_failure_is_retried_once_by_optjob_alone(kind: str, request: pytest.FixtureRequest,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, env = new_bucket(kind, request, tmp_path, monkeypatch)
    slept: list[float] = []
    store = open_storage(url, **opts(env, sleep=slept.append))
    if kind == "gcs":
        from google.api_core.exceptions import ServiceUnavailable
        from google.cloud.storage import Blob

        calls = _flaky(Blob, "upload_from_filename", lambda: ServiceUnavailable("blip"), monkeypatch)
    else:
        from azure.core.exceptions import ServiceRequestError
        from azure.storage.blob import ContainerClient

        calls = _flaky(ContainerClient, "upload_blob", lambda: ServiceRequestError("blip"), monkeypatch)
        assert store.container._config.retry_policy.total_retries == 0  # the SDK's own retries are off
    src = make_folder(tmp_path / "step-000007", seed=7)
    store.sync_up(src, "step-000007")
    assert slept == [1.0] and len(calls) >= 2
    store.sync_down("step-000007", tmp_path / "back")
    assert same_tree(src, tmp_path / "back")


def test_urls_pick_their_backend(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path / "f")), LocalStorage)
    with pytest.raises(StorageError, match="only s3://"):
        open_storage("ftp://host/x")
    with pytest.raises(StorageError, match="is not gs://bucket/prefix"):
        GCSStorage("s3://b/x", client=object.__new__(type("C", (), {"bucket": lambda self, n: None})))
