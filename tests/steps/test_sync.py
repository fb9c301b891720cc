"""Node-side checkpoint sync (``steps.sync``): the folder logic against a local-folder storage,
and the real workload against every backend — a shared folder, S3 (moto's server), GCS
(gcp-storage-emulator), Azure Blob (Azurite), all on 127.0.0.1 — killed after a checkpoint,
its job folder wiped (a fresh node), rerun: it resumes from the bucket and ends with the
same metrics as a straight run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from buckets import BACKENDS, new_bucket
from optjob.steps.layout import JobFile, step_dir
from optjob.steps.storage import MANIFEST, LocalStorage
from optjob.steps.sync import Sync, from_env, rebase_output

Spec = Callable[..., dict[str, Any]]


def checkpoint(root: Path, step: int, payload: bytes = b"w") -> Path:
    """A folder shaped like steps.checkpoint's (its own manifest.json with sha256s)."""
    from optjob.steps.storage import sha256_file

    folder = root / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(payload * 100)
    (folder / "meta.json").write_text(json.dumps({"step": step}))
    files = {n: sha256_file(folder / n) for n in ("model.pt", "meta.json")}
    (folder / "manifest.json").write_text(json.dumps({"step": step, "files": files}))
    return folder


def test_push_and_pull_mirror_the_job_folder(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "bucket")
    node = tmp_path / "node-a" / "job"
    sync = Sync(store, node)
    train = step_dir(node, 0, "train")
    for step in (4, 8, 12):
        folder = checkpoint(train / "checkpoints", step)
        if step == 12:  # steps.checkpoint keeps the newest two on disk
            shutil.rmtree(train / "checkpoints" / "step-000004")
        sync.push_checkpoint(folder, step)
    assert store.checkpoints("steps/00-train/checkpoints") == ["step-000008", "step-000012"]  # 4 pruned
    sync.push_checkpoint(checkpoint(tmp_path / "elsewhere", 99), 99)  # not this job's: ignored
    assert "elsewhere" not in " ".join(store.list_keys())

    (train / "model").mkdir()
    (train / "model" / "weights.bin").write_bytes(b"m" * 1000)
    done = {"index": 0, "kind": "train", "output": str(train / "model"), "metrics": {"steps": 12}, "wall_s": 1.0,
            "extra": {}, "attempt": 1}
    (train / "done.json").write_text(json.dumps(done))
    (node / "results.json").write_text(json.dumps({"name": "tiny", "steps": [], "baseline": {"eval_loss": 6.0}}))
    sync.push_steps()
    keys = store.list_keys()
    assert {"results.json", "steps/00-train/done.json", f"steps/00-train/model/{MANIFEST}"} <= set(keys)

    # A fresh node somewhere else: the finished step comes back, its output rebased to this folder.
    fresh = tmp_path / "node-b" / "optjob-job"
    got = Sync(store, fresh).pull()
    assert got == {"steps": ["00-train"], "checkpoints": [], "state": [], "results": True}
    pulled = json.loads((step_dir(fresh, 0, "train") / "done.json").read_text())
    assert pulled["output"] == str(step_dir(fresh, 0, "train") / "model")
    assert (step_dir(fresh, 0, "train") / "model" / "weights.bin").read_bytes() == b"m" * 1000
    assert json.loads((fresh / "results.json").read_text())["baseline"] == {"eval_loss": 6.0}


def test_pull_resumes_the_first_unfinished_step_from_its_newest_checkpoint(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "bucket")
    node = tmp_path / "a"
    sync = Sync(store, node)
    done_dir = step_dir(node, 0, "prune")
    (done_dir / "model").mkdir(parents=True)
    (done_dir / "model" / "w").write_text("pruned")
    (done_dir / "done.json").write_text(json.dumps({"index": 0, "kind": "prune", "output": str(done_dir / "model"),
                                                    "metrics": {}, "wall_s": 1.0, "extra": {}, "attempt": 1}))
    sync.push_steps()
    for step in (3, 6):
        sync.push_checkpoint(checkpoint(step_dir(node, 1, "train") / "checkpoints", step), step)
    half = checkpoint(tmp_path / "half", 9)  # an upload killed before its manifest: incomplete
    store.put_file(half / "model.pt", "steps/01-train/checkpoints/step-000009/model.pt", "x")

    fresh = tmp_path / "b"
    got = Sync(store, fresh).pull()
    assert got["steps"] == ["00-prune"] and got["checkpoints"] == ["01-train/step-000006"]
    ckpts = step_dir(fresh, 1, "train") / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000006"]  # whole, renamed into place
    assert json.loads((ckpts / "step-000006" / "meta.json").read_text()) == {"step": 6}

    # A node that already holds a newer valid checkpoint keeps it; an invalid newer one does not count.
    checkpoint(step_dir(fresh, 1, "train") / "checkpoints", 7)
    assert Sync(store, fresh).pull()["checkpoints"] == []
    broken = checkpoint(step_dir(tmp_path / "c", 1, "train") / "checkpoints", 7)
    (broken / "model.pt").write_bytes(b"torn")
    assert Sync(store, tmp_path / "c").pull()["checkpoints"] == ["01-train/step-000006"]


def test_compare_variants_reach_the_bucket_and_resume_one_by_one_on_a_fresh_node(tmp_path: Path) -> None:
    """A compare step's variant steps (``steps/NN-compare/NAME/MM-KIND``) are pushed like steps; a
    fresh node pulls each variant's finished steps and the checkpoint of its first unfinished one (they
    used to stay on the node: a relaunch reran every variant, ``pull`` brought none home)."""
    from optjob.steps.layout import variant_step_dir

    store = LocalStorage(tmp_path / "bucket")
    node = tmp_path / "a"
    sync = Sync(store, node)
    trunk = step_dir(node, 0, "train")
    (trunk / "model").mkdir(parents=True)
    (trunk / "model" / "w").write_text("trained")
    (trunk / "done.json").write_text(json.dumps({"index": 0, "kind": "train", "output": str(trunk / "model"),
                                                 "metrics": {}, "wall_s": 1.0, "extra": {}, "attempt": 1}))
    wanda = variant_step_dir(node, 1, "wanda", 0, "prune")
    (wanda / "model").mkdir(parents=True)
    (wanda / "model" / "w").write_text("pruned")
    (wanda / "done.json").write_text(json.dumps({
        "index": 1, "kind": "prune", "variant": "wanda", "variant_step": 0, "output": str(wanda / "model"),
        "metrics": {}, "wall_s": 1.0, "extra": {}, "attempt": 1}))
    sync.push_steps()
    student = variant_step_dir(node, 1, "student", 0, "distill")
    sync.push_checkpoint(checkpoint(student / "checkpoints", 5), 5)
    assert "steps/01-compare/wanda/00-prune/done.json" in store.list_keys()

    fresh = tmp_path / "b"
    got = Sync(store, fresh).pull()
    assert got["steps"] == ["00-train", "01-compare/wanda/00-prune"]
    assert got["checkpoints"] == ["01-compare/student/00-distill/step-000005"]
    pulled = json.loads((variant_step_dir(fresh, 1, "wanda", 0, "prune") / "done.json").read_text())
    assert pulled["output"] == str(variant_step_dir(fresh, 1, "wanda", 0, "prune") / "model")
    assert (variant_step_dir(fresh, 1, "wanda", 0, "prune") / "model" / "w").read_text() == "pruned"

    # A done.json that names another variant is not taken for this one.
    liar = variant_step_dir(tmp_path / "c", 1, "gptq", 0, "prune")
    liar.mkdir(parents=True)
    record = json.loads((wanda / "done.json").read_text())
    store.put_bytes("steps/01-compare/gptq/00-prune/done.json", json.dumps(record).encode())
    assert "01-compare/gptq/00-prune" not in Sync(store, tmp_path / "c").pull()["steps"]


def test_only_rank_0_pushes_and_from_env_opens_every_backend(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from optjob.steps.storage import AzureStorage, GCSStorage, S3Storage

    store = LocalStorage(tmp_path / "bucket")
    monkeypatch.setenv("RANK", "1")
    sync = Sync(store, tmp_path / "job")
    sync.push_checkpoint(checkpoint(tmp_path / "job" / "steps" / "00-train" / "checkpoints", 2), 2)
    assert store.list_keys() == []
    monkeypatch.delenv("OPTJOB_STORAGE", raising=False)
    assert from_env(tmp_path) is None
    monkeypatch.setenv("OPTJOB_STORAGE", "/Users/someone/artifacts")  # the manager's folder: not on this node
    assert from_env(tmp_path) is None
    (tmp_path / "bucket").mkdir()
    monkeypatch.setenv("OPTJOB_STORAGE", str(tmp_path / "bucket"))  # a folder this node shares
    got = from_env(tmp_path)
    assert got is not None and isinstance(got.storage, LocalStorage) and got.storage.root == tmp_path / "bucket"
    # Every bucket scheme opens its backend (no request is made yet): s3 with an endpoint (R2, MinIO), gs, az.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "auto")
    monkeypatch.setenv("OPTJOB_STORAGE", "s3://bkt/jobs/x")
    monkeypatch.setenv("OPTJOB_STORAGE_ENDPOINT", "https://acct.r2.cloudflarestorage.com")
    got = from_env(tmp_path)
    assert got is not None and isinstance(got.storage, S3Storage)
    assert got.storage.client.meta.endpoint_url == "https://acct.r2.cloudflarestorage.com"
    monkeypatch.delenv("OPTJOB_STORAGE_ENDPOINT")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    monkeypatch.setenv("OPTJOB_STORAGE", "gs://bkt/jobs/x")
    got = from_env(tmp_path)
    assert got is not None and isinstance(got.storage, GCSStorage) and got.storage.bucket == "bkt"
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "DefaultEndpointsProtocol=https;AccountName=acct;"
                       "AccountKey=a2V5;EndpointSuffix=core.windows.net")
    monkeypatch.setenv("OPTJOB_STORAGE", "az://ctr/jobs/x")
    got = from_env(tmp_path)
    assert got is not None and isinstance(got.storage, AzureStorage) and got.storage.root == "jobs/x"
    assert got.storage.container.url == "https://acct.blob.core.windows.net/ctr"
    assert rebase_output("/home/ubuntu/optjob-job/steps/02-quantize/model", tmp_path) == \
        str(tmp_path / "steps" / "02-quantize" / "model")
    assert rebase_output("/models/base", tmp_path) == "/models/base" and rebase_output(None, tmp_path) is None


# ------------------------------------------------------------------ the real workload against every backend

_STRAIGHT: dict[str, Any] = {}  # the uninterrupted run's results.json, made once for every backend


def _events(text: str) -> list[dict[str, Any]]:
    from optjob.steps.events import parse_event

    return [e for e in map(parse_event, text.splitlines()) if e is not None]


@pytest.mark.slow
@pytest.mark.parametrize("kind", BACKENDS)
def test_fresh_node_resumes_from_the_bucket(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, tiny_spec: Spec, shared_cache: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_signals: None,
) -> None:  # fmt: skip
    """SIGKILLed (a spot reclaim) right after a checkpoint, the job folder wiped (a fresh node): the rerun
    pulls the checkpoint from the bucket, resumes from it and ends with a straight run's metrics."""
    from optjob.specs.data import DataSpec
    from optjob.steps import runner
    from optjob.steps.data import load_text
    from optjob.steps.storage import open_storage

    load_text(DataSpec(), shared_cache)  # the corpus is built here, not in the subprocess
    spec = tiny_spec(steps=[{"train": {"max_steps": 12, "lr": 3e-3, "batch_size": 8, "checkpoint_every": 4,
                                       "log_every": 1, "seed": 1}},
                            {"evaluate": {"latency_repeats": 1, "generate_tokens": 4, "max_batches": 4}}])

    def folder(name: str) -> Path:
        quick = {"auto_evaluate": {"latency_repeats": 1, "generate_tokens": 4, "max_batches": 4}}
        JobFile(spec=spec, device="cpu", cache_dir=str(shared_cache), extra=quick).write(tmp_path / name)
        return tmp_path / name

    for var in ("OPTJOB_STORAGE", "OPTJOB_STORAGE_ENDPOINT", "STORAGE_EMULATOR_HOST",
                "AZURE_STORAGE_CONNECTION_STRING"):
        monkeypatch.delenv(var, raising=False)
    if "expected" not in _STRAIGHT:  # a straight run, no storage
        straight = folder("straight")
        assert runner.main(["run", str(straight)]) == 0
        capsys.readouterr()
        _STRAIGHT["expected"] = json.loads((straight / "results.json").read_text())
    expected = _STRAIGHT["expected"]
    url, bucket_env = new_bucket(kind, request, tmp_path, monkeypatch)
    node_env = {**bucket_env, "OPTJOB_STORAGE": url}

    # The same job with storage, SIGKILLed right after its first checkpoint.
    node = folder("node")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPTJOB_")}, **node_env,
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "optjob.steps", "run", str(node)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"event": "checkpoint"' in line:  # pushed before the event is printed (not the phase's start)
            proc.send_signal(signal.SIGKILL)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    bucket = open_storage(url, endpoint_url=node_env.get("OPTJOB_STORAGE_ENDPOINT"))
    saved = bucket.latest_checkpoint("steps/00-train/checkpoints")
    assert saved in ("step-000004", "step-000008"), bucket.list_keys()
    assert bucket.get_bytes("steps/00-train/done.json") is None

    # A fresh node: nothing but job.json. The rerun pulls the checkpoint and resumes from it.
    for path in node.iterdir():
        if path.name != "job.json":
            (path.unlink if path.is_file() else shutil.rmtree)(path)
    for k, v in node_env.items():
        monkeypatch.setenv(k, v)
    assert runner.main(["run", str(node)]) == 0
    out, err = capsys.readouterr()
    resumed = int(saved.split("-")[1])
    assert f"resuming from {node / 'steps' / '00-train' / 'checkpoints' / saved} (step {resumed})" in err
    assert resumed > 0 and f"pulled from {url.rstrip('/')}" in err
    progress = [e["step"] for e in _events(out) if e["event"] == "progress" and e["index"] == 0]
    assert progress[0] == resumed + 1 and progress[-1] == 12
    results = json.loads((node / "results.json").read_text())
    for key in ("eval_loss", "perplexity", "accuracy"):
        assert results["final"][key] == pytest.approx(expected["final"][key], rel=1e-5), key
    assert results["steps"][0]["metrics"]["steps"] == 12

    # Everything reached the bucket; a second fresh node skips the finished steps outright.
    assert bucket.manifest("steps/00-train/model") is not None
    assert json.loads(bucket.get_bytes("results.json") or b"{}")["final"] == results["final"]
    other = folder("other-node")
    assert runner.main(["run", str(other)]) == 0
    out, err = capsys.readouterr()
    done = [e for e in _events(out) if e["event"] == "step_done"]
    assert [d["skipped"] for d in done] == [True, True] and "resuming" not in err
    assert json.loads((other / "results.json").read_text())["final"] == results["final"]
