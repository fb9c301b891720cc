"""The report's money and words: per-step cost that includes interrupted attempts and earlier runs,
attempts that say how they ended, a title with date, hardware and estimate, and loss curves that
never share an axis when they measure different losses."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from optjob.manager import paths
from optjob.manager.clock import ManualClock
from optjob.manager.job_states import STOP_REQUESTED, JobStatus, Reason
from optjob.manager.report import report_data, write_report
from optjob.manager.report.svg import loss_svg
from optjob.manager.store import Store

SVG = "{http://www.w3.org/2000/svg}"
START = 1_800_000_000.0  # 2027-01-15 08:00 UTC
PLAN = {"chosen": {"cloud": "aws", "region": "us-east-1", "instance_type": "p4d.24xlarge", "accelerators": "A100:8",
                   "spot": True, "hourly_usd": 9.83, "est_hours": 0.1, "est_usd": 0.8},
        "resources": {"nodes": 1}, "budget": {"max_usd": 5.0}}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path))
    s = Store(tmp_path / "state.db", clock=ManualClock(START))
    yield s
    s.close()


def _run(store: Store, name: str, *, usd: float, events: list[dict[str, object]], status: str, exit_code: int,
         job: tuple[JobStatus, Reason]) -> None:
    """One run of ``name`` with one attempt: its events (``ts`` seconds after the start), spend, end."""
    store.claim_job(name, provider="skypilot", job_dir=str(paths.job_dir(name)), spec_path=None,
                    spec_json=json.dumps({"name": name}), plan_json=json.dumps(PLAN), owner_alive=lambda j: False)
    run = store.job(name).run  # type: ignore[union-attr]
    a = store.add_attempt(name, run=run, provider="skypilot", hourly_usd=9.83, nodes=1, spot=True)
    t0 = a.started_at
    store.add_events(name, a.number, [{**e, "ts": t0 + float(e["ts"])} for e in events])  # type: ignore[arg-type]
    end = t0 + max(float(e["ts"]) for e in events) + 10  # type: ignore[arg-type]
    store.update_attempt(a.id, status=status, exit_code=exit_code, ended_at=end, released=1)
    store.add_ledger(name, a.number, seconds=end - t0, usd=usd, hourly_usd=9.83, nodes=1, spot=True)
    store.update_job(name, status=job[0], reason=job[1], ended_at=end)
    store.clock.advance(1000)  # type: ignore[attr-defined]


def _resumed_job(store: Store) -> Path:
    """Run 1 is stopped by Ctrl-C half way through step 0; run 2 resumes it and finishes step 1."""
    _run(store, "resumed", usd=0.4, status="stopped", exit_code=143, job=(JobStatus.STOPPED, Reason.CANCELLED),
         events=[{"event": "step_started", "index": 0, "kind": "train", "ts": 5},
                 {"event": "progress", "index": 0, "kind": "train", "step": 10, "loss": 3.0, "ts": 30},
                 {"event": STOP_REQUESTED, "reason": "cancelled", "why": "interrupted", "ts": 40},
                 {"event": "stopped", "index": 0, "reason": "signal", "step": 12, "ts": 45}])
    _run(store, "resumed", usd=0.6, status="succeeded", exit_code=0, job=(JobStatus.SUCCEEDED, Reason.SUCCEEDED),
         events=[{"event": "step_started", "index": 0, "kind": "train", "ts": 5},
                 {"event": "step_done", "index": 0, "kind": "train", "wall_s": 60.0, "ts": 65},
                 {"event": "step_started", "index": 1, "kind": "prune", "ts": 65},
                 {"event": "step_done", "index": 1, "kind": "prune", "wall_s": 30.0, "ts": 95},
                 {"event": "job_done", "ts": 100}])
    job_dir = paths.job_dir("resumed")
    job_dir.mkdir(parents=True)
    (job_dir / "results.json").write_text(json.dumps({"name": "resumed", "steps": [
        {"index": 0, "kind": "train", "wall_s": 60.0, "metrics": {"perplexity": 50.0}},
        {"index": 1, "kind": "prune", "wall_s": 30.0, "metrics": {"perplexity": 55.0, "method": "magnitude"}}]}))
    return job_dir


def test_step_costs_include_the_interrupted_attempt_and_sum_to_the_spend(store: Store) -> None:
    _resumed_job(store)
    data = report_data(store, "resumed")
    cost = {r["index"]: r["cost_usd"] for r in data["rows"]}
    assert data["spent_usd"] == pytest.approx(1.0) and data["run_spent_usd"] == pytest.approx(0.6)
    # Attempt 1 spent $0.40 on step 0 alone; attempt 2's $0.60 goes 60 s : 30 s to steps 0 and 1.
    assert cost[0] == pytest.approx(0.8) and cost[1] == pytest.approx(0.2)
    assert sum(cost.values()) == pytest.approx(data["spent_usd"])


def test_attempts_say_cancelled_or_budget_rather_than_exit_143(store: Store) -> None:
    job_dir = _resumed_job(store)
    _run(store, "capped", usd=5.0, status="stopped", exit_code=143, job=(JobStatus.STOPPED, Reason.BUDGET),
         events=[{"event": "step_started", "index": 0, "kind": "train", "ts": 1},
                 {"event": STOP_REQUESTED, "reason": "budget", "why": "at the cap", "ts": 2}])
    ended = {a["number"]: a["ended_as"] for a in report_data(store, "resumed")["attempts"]}
    assert ended == {1: "cancelled (Ctrl-C or `optjob down`)", 2: "succeeded"}
    assert report_data(store, "capped")["attempts"][0]["ended_as"] == "stopped at the budget cap"
    md = write_report(store, "resumed")[0].read_text()
    assert "| 1 | cancelled (Ctrl-C or `optjob down`) |" in md and "exit 143" not in md
    assert md == (job_dir / "report.md").read_text()


def test_the_title_has_the_date_the_hardware_and_the_estimate(store: Store) -> None:
    _resumed_job(store)
    title = write_report(store, "resumed")[0].read_text().splitlines()[0]
    assert title.startswith("# resumed: succeeded, $1.0000 spent (estimated $0.8000, −25%; this run $0.6000)")
    assert title.endswith("— 2027-01-15 08:16 UTC on aws us-east-1 p4d.24xlarge (A100:8, spot)")
    page = (paths.job_dir("resumed") / "report.html").read_text()
    assert "on aws us-east-1 p4d.24xlarge (A100:8, spot)" in page


def _panels(svg: str) -> list[tuple[set[str], set[str]]]:
    """(texts, curve names) of each panel."""
    root = ET.fromstring(svg)
    out = []
    for g in root.iter(f"{SVG}g"):
        if g.get("class") == "panel":
            texts = {t.text or "" for t in g.iter(f"{SVG}text")}
            curves = {(c.find(f"{SVG}title").text or "") for c in g.iter(f"{SVG}g")  # type: ignore[union-attr]
                      if c.get("class") == "curve"}
            out.append((texts, curves))
    return out


def test_distillation_loss_never_shares_the_training_loss_axis() -> None:
    svg = loss_svg({"0-train": [[1, 5.0], [10, 4.0]], "1-prune": [[1, 4.2], [5, 4.0]],
                    "2-distill": [[1, 40.0], [10, 12.0]]})
    assert svg is not None
    panels = _panels(svg)
    assert len(panels) == 2
    (train_texts, train_curves), (kd_texts, kd_curves) = panels
    assert train_curves == {"0 train", "1 prune"} and "training loss" in train_texts
    assert kd_curves == {"2 distill"} and "distillation loss (α·KD + (1−α)·CE)" in kd_texts
    assert "training loss" not in kd_texts
    # One kind of loss: one panel, as before.
    (texts, curves), = _panels(loss_svg({"0-train": [[1, 5.0], [10, 4.0]]}) or "")
    assert curves == {"0 train"} and "training loss" in texts
