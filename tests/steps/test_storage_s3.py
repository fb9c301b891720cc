"""Artifact storage against a real S3 API: moto's server on 127.0.0.1 (no network),
driven through boto3 exactly as a bucket would be. The local-folder storage runs
the same folder tests."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from optjob.steps.storage import MANIFEST, LocalStorage, S3Storage, Storage, StorageError, sha256_file

boto3 = pytest.importorskip("boto3", reason="needs the cloud extra")
moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (test-only)")
from boto3.s3.transfer import TransferConfig  # noqa: E402
from botocore.exceptions import EndpointConnectionError  # noqa: E402

MB = 1 << 20


@pytest.fixture
def endpoint(moto_endpoint: str) -> str:
    return moto_endpoint


@pytest.fixture
def s3(endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """A boto3 client for the moto server, with dummy credentials only in this test's env."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "HTTP_PROXY", "HTTPS_PROXY",
                "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"optjob-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


SMALL = TransferConfig(multipart_threshold=5 * MB, multipart_chunksize=5 * MB, max_concurrency=1)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "artifacts")
    s3 = request.getfixturevalue("s3")
    name = request.getfixturevalue("bucket")
    return S3Storage(f"s3://{name}/jobs/demo", client=s3, transfer_config=SMALL, sleep=lambda s: None)


def make_folder(root: Path, seed: int, big: int = 0) -> Path:
    root.mkdir(parents=True)
    (root / "meta.json").write_text(f'{{"seed": {seed}}}')
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
    src = make_folder(tmp_path / "step-000100", seed=1)
    manifest = storage.sync_up(src, "checkpoints/step-000100")
    assert manifest.step == 100 and set(manifest.files) == {"meta.json", "sub/weights.bin"}
    assert manifest.files["sub/weights.bin"]["sha256"] == sha256_file(src / "sub" / "weights.bin")
    assert storage.list_keys("checkpoints") == ["checkpoints/step-000100/" + k
                                           for k in (MANIFEST, "meta.json", "sub/weights.bin")]
    out = tmp_path / "down"
    assert storage.sync_down("checkpoints/step-000100", out) == manifest
    assert same_tree(src, out)
    assert storage.sync_down("checkpoints/step-000100", out) == manifest  # idempotent
    if isinstance(storage, S3Storage):
        head = storage.client.head_object(Bucket=storage.bucket, Key="jobs/demo/checkpoints/step-000100/meta.json",
                                          ChecksumMode="ENABLED")
        assert head["Metadata"]["sha256"] == sha256_file(src / "meta.json")
        assert "ChecksumSHA256" in head  # S3 verified the bytes it received


def test_resume_picks_latest_complete_checkpoint(storage: Storage, tmp_path: Path) -> None:
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
    storage.sync_up(half, "ckpt/step-000300")
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


class Crash(Exception):
    """The process dying mid-upload (not an S3 error: nothing retries it)."""


def _on(client: Any, operation: str, action: Any) -> list[int]:
    calls: list[int] = []

    def hook(**_: Any) -> None:
        calls.append(1)
        action(len(calls))

    client.meta.events.register(f"before-call.s3.{operation}", hook, unique_id=f"test-{operation}")
    return calls


def test_interrupted_multipart_upload_then_retry(s3: Any, bucket: str, tmp_path: Path) -> None:
    store = S3Storage(f"s3://{bucket}/run", client=s3, transfer_config=SMALL, sleep=lambda s: None)
    src = make_folder(tmp_path / "step-000050", seed=5, big=9 * MB)  # > 8 MB: multipart

    def crash_on_second_part(n: int) -> None:
        if n == 2:
            raise Crash("killed half way")

    _on(s3, "UploadPart", crash_on_second_part)
    with pytest.raises(Crash):
        store.sync_up(src, "step-000050")
    s3.meta.events.unregister("before-call.s3.UploadPart", unique_id="test-UploadPart")
    assert store.manifest("step-000050") is None and store.latest_checkpoint("") is None
    assert "step-000050/zz-big.bin" not in store.list_keys()

    puts = _on(s3, "PutObject", lambda n: None)
    parts = _on(s3, "UploadPart", lambda n: None)
    manifest = store.sync_up(src, "step-000050")  # the retry resumes: done files are skipped
    assert len(puts) == 1  # only the manifest: meta.json and sub/weights.bin were already there
    assert len(parts) == 2
    assert store.latest_checkpoint("") == "step-000050"
    head = s3.head_object(Bucket=bucket, Key="run/step-000050/zz-big.bin")
    assert head["ETag"].strip('"').endswith("-2")  # a two-part multipart object
    assert head["Metadata"]["sha256"] == manifest.files["zz-big.bin"]["sha256"]
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    store.sync_down("step-000050", tmp_path / "back")
    assert same_tree(src, tmp_path / "back")


def test_transient_failure_is_retried(s3: Any, bucket: str, tmp_path: Path, endpoint: str) -> None:
    slept: list[float] = []
    store = S3Storage(f"s3://{bucket}", client=s3, transfer_config=SMALL, sleep=slept.append)
    src = make_folder(tmp_path / "step-000007", seed=7, big=6 * MB)

    def blip(n: int) -> None:
        if n == 1:
            raise EndpointConnectionError(endpoint_url=endpoint)

    _on(s3, "UploadPart", blip)
    store.sync_up(src, "step-000007")
    assert slept == [1.0]
    store.sync_down("step-000007", tmp_path / "back")
    assert same_tree(src, tmp_path / "back")


def test_errors_are_actionable(s3: Any, tmp_path: Path) -> None:
    store = S3Storage("s3://no-such-bucket-optjob/x", client=s3, sleep=lambda s: None)
    with pytest.raises(StorageError, match="create the bucket"):
        store.sync_up(make_folder(tmp_path / "f", seed=1), "f")
    with pytest.raises(StorageError, match="s3://bucket/prefix"):
        S3Storage("s3://", client=s3)


def test_one_retry_layer_at_the_s3_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    """optjob's loop retries; botocore's own retries are off, so 4 x 8 attempts never stack."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = S3Storage("s3://some-bucket/x")
    assert store.client.meta.config.retries == {"total_max_attempts": 1, "mode": "standard"}
    assert store.attempts == 4
