"""``tracking: {mlflow: URI}``: a finished job's metrics, loss curves and report logged to a real
MLflow tracking server (``mlflow server`` on 127.0.0.1, started here) through MLflow's client; a
server that cannot be reached is one warning line and the job stands. Skipped where mlflow is not
installed (it is optional: ``pip install mlflow``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from optjob.manager import paths
from optjob.manager.commands import apply as apply_cmd
from optjob.manager.commands import common
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.store import Store
from optjob.manager.tracking import track_ended
from optjob.providers.local import LocalProvider

pytest.importorskip("mlflow")

START_S = 180  # `mlflow server` migrates its database and imports a web stack: tens of seconds on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    exe = Path(sys.executable).with_name("mlflow")
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("mlflow server did not answer /health")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the group this fixture started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_a_finished_job_is_logged_to_mlflow(home: Path, tmp_path: Path, mlflow_uri: str, standin_python: str,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("STANDIN_STEPS", "5")
    monkeypatch.setattr(common, "provider_for", lambda name: LocalProvider(python=standin_python))
    spec = tmp_path / "tiny.yaml"
    spec.write_text("name: tiny\nmodel: {init: {}}\nsteps: [{train: {max_steps: 5}}]\n"
                    f"tracking: {{mlflow: '{mlflow_uri}', experiment: optjob-test}}\n")
    apply_cmd.apply_command(str(spec), local=True, dry_run=False, yes=True, detach=False, as_json=True)
    out = capsys.readouterr()
    assert json.loads(out.out)["status"] == "succeeded"  # stdout stays the command's JSON alone
    assert "warning" not in out.err
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("optjob-test")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-run1" and run.info.status == "FINISHED"
    assert run.data.tags["optjob.status"] == "succeeded" and run.data.params["steps.0.train.max_steps"] == "5"
    assert "spent_usd" in run.data.metrics
    losses = client.get_metric_history(run.info.run_id, "00-train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5]  # the loss curve, step by step
    assert {"report.md", "report.html"} <= {f.path for f in client.list_artifacts(run.info.run_id)}
    # Once per run.
    assert track_ended(Store(paths.db_path()), "tiny") is None
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_an_unreachable_tracking_server_is_one_warning(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(paths.db_path())
    uri = f"http://127.0.0.1:{_free_port()}"
    store.claim_job("done", provider="local", job_dir=str(paths.job_dir("done")), spec_path=None,
                    spec_json=json.dumps({"name": "done", "tracking": {"mlflow": uri}}), plan_json=None,
                    owner_alive=lambda j: False)
    store.update_job("done", status=JobStatus.SUCCEEDED, reason=Reason.SUCCEEDED)
    common.notify_ended(store, "done")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"warning: tracking: could not log done to MLflow at {uri}: ")
    assert store.job("done").status is JobStatus.SUCCEEDED  # type: ignore[union-attr]


def test_compare_variants_get_names_of_their_own() -> None:
    """Every variant row of a compare shares the compare step's index: their metrics were logged under
    one name (``01-variant``), each overwriting the last."""
    from optjob.manager.tracking import metric_points

    data = {"rows": [
        {"kind": "train", "index": 0, "variant": None, "metrics": {"perplexity": 9.0}, "cost_usd": 0.1},
        {"kind": "prune", "index": 1, "variant": "wanda", "metrics": {"perplexity": 10.0}, "cost_usd": 0.2},
        {"kind": "prune", "index": 1, "variant": "magnitude", "metrics": {"perplexity": 12.0}, "cost_usd": 0.2},
    ], "loss_curves": {"0-train": [[1, 5.0]], "1-distill (small)": [[1, 4.0]]}, "hpo_trials": [],
        "spent_usd": 0.5, "run_spent_usd": 0.5, "estimated_usd": None}  # fmt: skip
    points = {name: value for name, value, _ in metric_points(data)}
    assert points["01-prune-wanda/perplexity"] == 10.0 and points["01-prune-magnitude/perplexity"] == 12.0
    assert points["00-train/perplexity"] == 9.0
    assert points["01-distill-small/loss"] == 4.0 and points["00-train/loss"] == 5.0
    assert "estimated_usd" not in points
