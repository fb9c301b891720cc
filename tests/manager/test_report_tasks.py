"""The report's lm-eval task columns and its latency-within-noise flag (no torch)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from optjob.manager import paths
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.report import report_data, write_report
from optjob.manager.report.data import within_noise
from optjob.manager.report.text import NOISE_NOTE
from optjob.manager.store import Store

BASE = {"perplexity": 100.0, "latency_ms": 10.0, "latency_ms_iqr": 0.5, "gen_latency_ms": 300.0,
        "gen_latency_ms_iqr": 20.0, "params": 1_000_000, "size_bytes": 4_000_000,
        "task:tiny_mc:acc": 0.25, "task:tiny_mc:acc_norm": 0.5, "task:hellaswag:acc_norm": 0.3}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path))
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def _job(store: Store, steps: list[dict[str, object]]) -> Path:
    name = "tasks"
    job_dir = paths.job_dir(name)
    store.claim_job(name, provider="local", job_dir=str(job_dir), spec_path=None,
                    spec_json=json.dumps({"name": name, "steps": [{"evaluate": {}}]}), plan_json=None,
                    owner_alive=lambda j: False)
    attempt = store.add_attempt(name, run=1, provider="local", hourly_usd=0.5, nodes=1, spot=False)
    store.update_attempt(attempt.id, status="succeeded", exit_code=0, ended_at=attempt.started_at + 60.0)
    store.update_job(name, status=JobStatus.SUCCEEDED, reason=Reason.SUCCEEDED)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "results.json").write_text(json.dumps({"name": name, "baseline": BASE, "steps": steps}))
    return job_dir


def test_each_task_metric_is_a_column(store: Store) -> None:
    job_dir = _job(store, [{"index": 0, "kind": "prune", "wall_s": 1.0,
                            "metrics": {**BASE, "task:tiny_mc:acc": 0.5, "task:tiny_mc:acc_stderr": "N/A"}}])
    data = report_data(store, "tasks")
    assert data["task_columns"] == ["task:hellaswag:acc_norm", "task:tiny_mc:acc", "task:tiny_mc:acc_norm"]
    assert data["rows"][1]["tasks"]["task:tiny_mc:acc"] == 0.5
    write_report(store, "tasks")
    md = (job_dir / "report.md").read_text()
    assert "| Step | hellaswag acc_norm | tiny_mc acc | tiny_mc acc_norm |" in md
    assert "| baseline | 0.3 | 0.25 | 0.5 |" in md and "| 0 prune | 0.3 | 0.5 | 0.5 |" in md
    assert "<th>tiny_mc acc_norm</th>" in (job_dir / "report.html").read_text()


def test_latency_differences_within_the_noise_are_flagged(store: Store) -> None:
    job_dir = _job(store, [
        {"index": 0, "kind": "prune", "wall_s": 1.0, "metrics": {**BASE, "latency_ms": 10.4, "gen_latency_ms": 250.0}},
        {"index": 1, "kind": "quantize", "wall_s": 1.0, "metrics": {**BASE, "latency_ms": 7.0, "latency_ms_iqr": 0.2,
                                                                   "gen_latency_ms": 310.0}},
    ])
    rows = report_data(store, "tasks")["rows"]
    assert [(r["latency_noise"], r["gen_latency_noise"]) for r in rows] == [(None, None), (True, False),
                                                                            (False, True)]
    write_report(store, "tasks")
    md = (job_dir / "report.md").read_text()
    assert "| 10.40 ms (+4.0%) ~ | 250.0 ms |" in md and "| 7.00 ms (−30%) | 310.0 ms ~ |" in md
    assert NOISE_NOTE in md


def test_within_noise_needs_a_spread() -> None:
    assert within_noise({"latency_ms": 10.0}, {"latency_ms": 10.1}, "latency_ms") is None  # no IQR recorded
    assert within_noise({"latency_ms": 10.0, "latency_ms_iqr": 0.05}, {"latency_ms": 10.1}, "latency_ms") is False
    assert within_noise({"latency_ms": 10.0}, {"latency_ms": 10.1, "latency_ms_iqr": 0.2}, "latency_ms") is True
