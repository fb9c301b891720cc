"""The cloud commands through the real CLI: `list` stays fast and quiet when SkyPilot cannot
answer, `down` takes NAME or --orphans, `pull` copies a job's artifacts home. (Orphans
against SkyPilot's state: tests/providers/test_cloud_apply.py, with the fake client.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.store import Store
from optjob.specs import loads_spec
from optjob.steps.layout import step_dir
from optjob.steps.storage import LocalStorage
from optjob.steps.sync import Sync

ROOT = Path(__file__).resolve().parents[2]
SPEC = "name: {name}\nmodel: {{init: {{}}}}\nsteps: [{{train: {{}}}}]\n"


def cli(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optjob.manager.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OPTJOB_HOME": str(home), **env}, timeout=120)


def finished_job(home: Path, name: str, provider: str, extra: str = "") -> None:
    store = Store(home / "state.db")
    spec = loads_spec(SPEC.format(name=name) + extra)
    store.claim_job(name, provider=provider, job_dir=str(home / "jobs" / name), spec_path=None,
                    spec_json=spec.model_dump_json(), plan_json=None, owner_alive=lambda j: False)
    store.update_job(name, status=JobStatus.SUCCEEDED, reason=Reason.SUCCEEDED, owner_pid=None)


def test_cloud_commands_import_nothing_heavy() -> None:
    code = ("import sys, optjob.manager.cli, optjob.manager.commands.orphans, optjob.steps.sync;"
            "print([m for m in ('torch', 'sky', 'boto3') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_list_of_local_jobs_never_asks_skypilot(tmp_path: Path) -> None:
    finished_job(tmp_path, "here", "local")
    code = ("import sys; from optjob.manager.cli import main; main(['list']);"
            "assert 'sky' not in sys.modules, 'sky imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OPTJOB_HOME": str(tmp_path)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "here" in proc.stdout and "warning" not in proc.stderr


def test_list_with_skypilot_down_is_quick_and_quiet(tmp_path: Path) -> None:
    finished_job(tmp_path, "cloudy", "skypilot", "resources: {cloud: aws}\n")
    with socket.socket() as s:  # an API server endpoint nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    proc = cli("list", home=tmp_path, HOME=str(tmp_path / "user"), SKYPILOT_DISABLE_USAGE_COLLECTION="1",
               SKYPILOT_API_SERVER_ENDPOINT=f"http://127.0.0.1:{port}")
    assert proc.returncode == 0, proc.stderr
    assert "cloudy" in proc.stdout and "warning" not in proc.stderr and "Traceback" not in proc.stderr
    assert time.perf_counter() - t < 30  # start-up + at most the check's cap; never an API server start
    assert not (tmp_path / "user" / ".sky" / "api_server").exists()


def test_down_needs_a_name_or_orphans(tmp_path: Path) -> None:
    for args in (("down",), ("down", "x", "--orphans")):
        proc = cli(*args, home=tmp_path)
        assert proc.returncode == 2 and "NAME, or --orphans" in proc.stderr
    assert "--orphans" in cli("down", "--help", home=tmp_path).stdout
    assert "storage.artifacts" in cli("pull", "--help", home=tmp_path).stdout


def test_pull_copies_the_artifacts_home(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    finished_job(tmp_path, "far", "skypilot", f"storage: {{artifacts: {artifacts}}}\n")
    node = tmp_path / "node" / "optjob-job"  # what the node left in storage
    train = step_dir(node, 0, "train")
    (train / "model").mkdir(parents=True)
    (train / "model" / "model.safetensors").write_bytes(b"weights")
    (train / "done.json").write_text(json.dumps({"index": 0, "kind": "train", "output": str(train / "model"),
                                                 "metrics": {}, "wall_s": 1.0, "extra": {}, "attempt": 1}))
    (node / "results.json").write_text(json.dumps({"name": "far", "steps": [], "final": {"eval_loss": 2.5}}))
    Sync(LocalStorage(artifacts), node).push_steps(final=True)

    proc = cli("pull", "far", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "finished steps: 00-train" in proc.stdout
    home_dir = tmp_path / "jobs" / "far"
    assert (step_dir(home_dir, 0, "train") / "model" / "model.safetensors").read_bytes() == b"weights"
    done = json.loads((step_dir(home_dir, 0, "train") / "done.json").read_text())
    assert done["output"] == str(step_dir(home_dir, 0, "train") / "model")
    assert json.loads((home_dir / "results.json").read_text())["final"] == {"eval_loss": 2.5}
    assert cli("pull", "far", home=tmp_path).returncode == 0  # again: nothing new, no harm

    finished_job(tmp_path, "nostore", "local")
    proc = cli("pull", "nostore", home=tmp_path)
    assert proc.returncode == 2 and "no storage.artifacts" in proc.stderr
    assert cli("pull", "nope", home=tmp_path).returncode == 2


def test_local_api_server_check_needs_no_sky(tmp_path: Path, monkeypatch) -> None:
    from optjob.manager.commands.orphans import local_api_server_down

    for var in ("ENDPOINT", "LOCAL_PORT"):
        monkeypatch.delenv(f"SKYPILOT_API_SERVER_{var}", raising=False)
    for var in ("CONFIG", "GLOBAL_CONFIG", "PROJECT_CONFIG"):
        monkeypatch.delenv(f"SKYPILOT_{var}", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        monkeypatch.setenv("SKYPILOT_API_SERVER_LOCAL_PORT", str(server.getsockname()[1]))
        assert local_api_server_down()  # nothing listens yet
        server.listen(1)
        assert not local_api_server_down()
    (tmp_path / ".sky").mkdir()
    (tmp_path / ".sky" / "config.yaml").write_text("api_server:\n  endpoint: https://sky.example.com\n")
    assert not local_api_server_down()  # a remote server is configured: ask SkyPilot itself
