"""A fresh bucket on each storage backend's emulator (moto's S3 server, gcp-storage-emulator, Azurite; see
tests/conftest.py), for the storage and sync tests."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

BACKENDS = ["local", "s3", "gcs", "azure"]


def _s3_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "HTTP_PROXY", "HTTPS_PROXY",
                "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"), "NO_PROXY": "127.0.0.1,localhost",
                 "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}.items():
        monkeypatch.setenv(k, v)


def new_bucket(kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               ) -> tuple[str, dict[str, str]]:
    """A fresh, empty bucket of ``kind`` on its emulator: (its URL, the environment a process needs to reach it).
    S3 is reached the way an S3-compatible store (R2, MinIO) is: through ``storage.endpoint_url``, which the
    node gets as OPTJOB_STORAGE_ENDPOINT; this process's storages get it through ``endpoint_url``."""
    name = f"optjob-{uuid.uuid4().hex[:12]}"
    if kind == "local":
        (tmp_path / "bucket" / "jobs" / "demo").mkdir(parents=True)
        return str(tmp_path / "bucket" / "jobs" / "demo"), {}
    if kind == "s3":
        import boto3

        endpoint = request.getfixturevalue("moto_endpoint")
        _s3_env(monkeypatch, tmp_path)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
        return f"s3://{name}/jobs/demo", {"OPTJOB_STORAGE_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                                          "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    if kind == "gcs":
        endpoint = request.getfixturevalue("gcs_endpoint")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        from google.cloud import storage

        storage.Client().create_bucket(name)
        return f"gs://{name}/jobs/demo", {"STORAGE_EMULATOR_HOST": endpoint}
    conn = request.getfixturevalue("azurite_connection_string")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", conn)
    from azure.storage.blob import BlobServiceClient

    BlobServiceClient.from_connection_string(conn).create_container(name)
    return f"az://{name}/jobs/demo", {"AZURE_STORAGE_CONNECTION_STRING": conn}


def opts(env: dict[str, str], **kwargs: Any) -> dict[str, Any]:
    """``open_storage`` keywords for a bucket made by ``new_bucket``."""
    return {"endpoint_url": env.get("OPTJOB_STORAGE_ENDPOINT"), **kwargs}
