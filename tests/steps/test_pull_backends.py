"""``optjob pull NAME`` from every bucket backend (S3 through an endpoint URL, as R2 or MinIO are reached;
GCS; Azure Blob), each on its emulator on 127.0.0.1: the finished steps and results.json come home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from buckets import new_bucket, opts
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.store import Store
from optjob.specs import loads_spec
from optjob.steps.layout import step_dir
from optjob.steps.storage import open_storage
from optjob.steps.sync import Sync

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_pull_brings_a_finished_job_home_from_its_bucket(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url, env = new_bucket(kind, request, tmp_path, monkeypatch)
    endpoint = env.get("OPTJOB_STORAGE_ENDPOINT")
    storage = {"artifacts": url, **({"endpoint_url": endpoint} if endpoint else {})}
    spec = loads_spec(json.dumps({"name": "far", "model": {"init": {}}, "steps": [{"train": {}}],
                                  "resources": {"cloud": "aws", "spot": True}, "storage": storage}))
    home = tmp_path / "home"
    store = Store(home / "state.db")
    store.claim_job("far", provider="skypilot", job_dir=str(home / "jobs" / "far"), spec_path=None,
                    spec_json=spec.model_dump_json(), plan_json=None, owner_alive=lambda j: False)
    store.update_job("far", status=JobStatus.SUCCEEDED, reason=Reason.SUCCEEDED, owner_pid=None)

    node = tmp_path / "node" / "optjob-job"  # what the node left in the bucket
    train = step_dir(node, 0, "train")
    (train / "model").mkdir(parents=True)
    (train / "model" / "model.safetensors").write_bytes(b"weights")
    (train / "done.json").write_text(json.dumps({"index": 0, "kind": "train", "output": str(train / "model"),
                                                 "metrics": {}, "wall_s": 1.0, "extra": {}, "attempt": 1}))
    (node / "results.json").write_text(json.dumps({"name": "far", "steps": [], "final": {"eval_loss": 2.5}}))
    Sync(open_storage(url, **opts(env)), node).push_steps(final=True)

    child = {k: v for k, v in os.environ.items() if k != "OPTJOB_STORAGE_ENDPOINT"}
    child.update({k: v for k, v in env.items() if k != "OPTJOB_STORAGE_ENDPOINT"}, OPTJOB_HOME=str(home))
    proc = subprocess.run([sys.executable, "-m", "optjob.manager.cli", "pull", "far"], capture_output=True, text=True,
                          cwd=ROOT, env=child, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "finished steps: 00-train" in proc.stdout and url in proc.stdout
    here = home / "jobs" / "far"
    assert (step_dir(here, 0, "train") / "model" / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((here / "results.json").read_text())["final"] == {"eval_loss": 2.5}


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_the_manager_reads_a_finished_run_from_any_bucket(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A returning manager learns that the run finished from the bucket's results.json (``manager.outcome``),
    whatever the scheme (a gs:// or az:// URL was once taken for a folder relative to the spec)."""
    from optjob.manager.outcome import finished_in_storage

    url, env = new_bucket(kind, request, tmp_path, monkeypatch)
    endpoint = env.get("OPTJOB_STORAGE_ENDPOINT")
    storage = {"artifacts": url, **({"endpoint_url": endpoint} if endpoint else {})}
    spec = loads_spec(json.dumps({"name": "far", "model": {"init": {}}, "steps": [{"train": {}}],
                                  "resources": {"cloud": "aws", "spot": True}, "storage": storage}))
    store = Store(tmp_path / "home" / "state.db")
    store.claim_job("far", provider="skypilot", job_dir=str(tmp_path / "home" / "jobs" / "far"),
                    spec_path=str(tmp_path / "spec.yaml"), spec_json=spec.model_dump_json(), plan_json=None,
                    owner_alive=lambda j: False)
    job = store.job("far")
    assert job is not None and finished_in_storage(job, 1) is False
    open_storage(url, **opts(env)).put_bytes("results.json", json.dumps(
        {"name": "far", "attempt": 1, "steps": [], "final": {"eval_loss": 2.5}}).encode())
    assert finished_in_storage(job, 1) is True
