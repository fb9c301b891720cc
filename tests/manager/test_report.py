"""The comparison report: data assembly, markdown, html and plots (no torch)."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from optjob.manager import paths
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.report import report_data, write_report
from optjob.manager.report.svg import fmt, log_ticks, nice_step, nice_ticks, plot_all
from optjob.manager.store import Store

SVG = "{http://www.w3.org/2000/svg}"
SPEC = {"name": "demo", "steps": [
    {"hpo": {"trials": 3, "direction": "minimize", "metric": "eval_loss"}},
    {"train": {"max_steps": 20}},
    {"prune": {"method": "magnitude", "sparsity": 0.5}},
    {"quantize": {"method": "int8"}},
    {"evaluate": {}},
]}
BASE = {"eval_loss": 4.605, "perplexity": 100.0, "accuracy": 0.20, "latency_ms": 10.0,
        "gen_latency_ms": 300.0, "params": 1_000_000, "nonzero_params": 1_000_000,
        "size_bytes": 4_000_000}


def _metrics(**changes: float | str) -> dict[str, object]:
    return {**BASE, **changes}


def _results(name: str) -> dict[str, object]:
    trials = [
        {"number": 0, "params": {"train.lr": 1e-3}, "value": 4.2, "state": "COMPLETE"},
        {"number": 1, "params": {"train.lr": 3e-3}, "value": 3.9, "state": "COMPLETE"},
        {"number": 2, "params": {"train.lr": 1e-1}, "value": None, "state": "PRUNED"},
    ]
    evaluated = _metrics(perplexity=112.0, size_bytes=2_080_000, latency_ms=8.0)
    return {
        "name": name, "attempt": 1, "baseline": BASE, "final": evaluated,
        "steps": [
            {"index": 0, "kind": "hpo", "output": "/x/steps/00-hpo/model", "wall_s": 20.0,
             "metrics": {"best_value": 3.9},
             "extra": {"trials": trials, "best_params": {"train.lr": 3e-3}}},
            {"index": 1, "kind": "train", "output": "/x/steps/01-train/model", "wall_s": 50.0,
             "metrics": _metrics(perplexity=105.0, tokens_per_s=12_345.0),
             "extra": {"loss_curve": [[1, 5.0], [10, 4.0], [20, 3.5]]}},
            {"index": 2, "kind": "prune", "output": "/x/steps/02-prune/model", "wall_s": 10.0,
             "metrics": _metrics(perplexity=110.0, nonzero_params=500_000, sparsity=0.5,
                                 method="magnitude")},
            {"index": 3, "kind": "quantize", "output": "/x/steps/03-quantize/model", "wall_s": 20.0,
             "metrics": _metrics(perplexity=112.0, size_bytes=2_080_000, latency_ms=8.0,
                                 method="int8")},
            {"index": 4, "kind": "evaluate", "output": "/x/steps/03-quantize/model", "wall_s": 0.0,
             "metrics": evaluated},
        ],
    }


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path))
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def _job(store: Store, name: str, *, spend: float, results: bool = True) -> Path:
    job_dir = paths.job_dir(name)
    store.claim_job(name, provider="local", job_dir=str(job_dir), spec_path=None,
                    spec_json=json.dumps({**SPEC, "name": name}), plan_json=None,
                    owner_alive=lambda j: False)
    attempt = store.add_attempt(name, run=1, provider="local", hourly_usd=0.5, nodes=1, spot=False)
    store.update_attempt(attempt.id, status="succeeded" if results else "failed",
                         exit_code=0 if results else 1, ended_at=attempt.started_at + 360.0)
    for _ in range(2):
        store.add_ledger(name, attempt.number, seconds=180.0, usd=spend / 2, hourly_usd=0.5,
                         nodes=1, spot=False)
    store.update_job(name, status=JobStatus.SUCCEEDED if results else JobStatus.FAILED,
                     reason=Reason.SUCCEEDED if results else Reason.FAILED)
    if results:
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "results.json").write_text(json.dumps(_results(name)))
    return job_dir


def test_rows_and_deltas(store: Store) -> None:
    _job(store, "demo", spend=1.0)
    data = report_data(store, "demo")
    json.dumps(data)  # serialisable as-is
    assert data["status"] == "succeeded" and math.isclose(data["spent_usd"], 1.0)
    rows = {r["kind"]: r for r in data["rows"]}
    kinds = ["baseline", "hpo", "train", "prune", "quantize", "evaluate"]
    assert [r["kind"] for r in data["rows"]] == kinds
    assert rows["baseline"]["d_perplexity_pct"] is None
    assert rows["train"]["d_perplexity_pct"] == pytest.approx(5.0)
    assert rows["train"]["tokens_per_s"] == 12_345.0
    assert rows["prune"]["d_perplexity_pct"] == pytest.approx(10.0)
    assert rows["prune"]["nonzero_params"] == 500_000 and rows["prune"]["d_params_pct"] == 0.0
    assert rows["quantize"]["d_size_pct"] == pytest.approx(-48.0)
    assert rows["quantize"]["d_latency_pct"] == pytest.approx(-20.0)
    assert rows["hpo"]["perplexity"] is None and rows["hpo"]["d_perplexity_pct"] is None
    # Spend is split pro rata by wall time: 20 + 50 + 10 + 20 + 0 = 100 s.
    assert rows["train"]["cost_usd"] == pytest.approx(0.5)
    assert rows["evaluate"]["cost_usd"] == 0.0
    assert sum(r["cost_usd"] or 0 for r in data["rows"]) == pytest.approx(1.0)
    assert data["attempts"][0]["usd"] == pytest.approx(1.0)
    assert data["attempts"][0]["duration_s"] == pytest.approx(360.0)
    assert data["loss_curves"] == {"1-train": [[1, 5.0], [10, 4.0], [20, 3.5]]}


def test_hpo_best_minimize(store: Store) -> None:
    _job(store, "demo", spend=1.0)
    trials = report_data(store, "demo")["hpo_trials"]
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert [t["number"] for t in trials if t["best"]] == [1]


def test_hpo_from_events_and_maximize(store: Store) -> None:
    spec = {"name": "ev", "steps": [{"hpo": {"direction": "maximize", "metric": "accuracy"}}]}
    store.claim_job("ev", provider="local", job_dir=str(paths.job_dir("ev")), spec_path=None,
                    spec_json=json.dumps(spec), plan_json=None, owner_alive=lambda j: False)
    a = store.add_attempt("ev", run=1, provider="local", hourly_usd=0.0, nodes=1, spot=False)
    store.add_events("ev", a.number, [
        {"event": "trial", "index": 0, "number": n, "params": {"train.lr": lr}, "value": v,
         "state": "COMPLETE"}
        for n, lr, v in ((0, 1e-3, 0.30), (1, 3e-3, 0.45), (2, 1e-2, 0.40))
    ] + [{"event": "progress", "index": 1, "kind": "train", "step": s, "loss": 5.0 - s / 10,
          "tokens_per_s": 1000.0} for s in (10, 20, 10, 20, 30)])  # a resume repeats 10 and 20
    data = report_data(store, "ev")
    assert [t["number"] for t in data["hpo_trials"] if t["best"]] == [1]
    assert data["loss_curves"]["1-train"] == [[10.0, 4.0], [20.0, 3.0], [30.0, 2.0]]


def test_write_report(store: Store) -> None:
    job_dir = _job(store, "demo", spend=1.0)
    store.add_events("demo", 1, [{"event": "progress", "index": 2, "kind": "prune", "step": s,
                                  "loss": 4.0 - s / 100} for s in range(0, 50, 10)])
    written = write_report(store, "demo")
    names = [p.name for p in written]
    assert names == ["report.md", "report.html", "loss_curves.svg", "tradeoff.svg"]
    assert all(p.parent == job_dir and p.stat().st_size > 0 for p in written)
    loss, trade = (_svg(p.read_text()) for p in written[2:])
    assert len(loss.findall(f".//{SVG}polyline")) == 2  # train (results.json) and prune (events)
    assert {t.text for t in loss.iter(f"{SVG}text")} >= {"1 train", "2 prune", "optimizer step", "training loss"}
    assert len(trade.findall(f".//{SVG}circle")) == 8  # 4 models with size, 4 with latency; evaluate left out
    md = (job_dir / "report.md").read_text()
    assert md.startswith("# demo: succeeded, $1.0000 spent")
    assert ("| Step | Params | Size | Perplexity | Accuracy | Fwd latency | Gen latency "
            "| Train tok/s | Wall | Cost¹ |") in md
    for label in ("baseline", "0 hpo", "1 train", "2 prune (magnitude)", "3 quantize (int8)",
                  "4 evaluate"):
        assert f"| {label} |" in md
    assert "105.00 (+5.0%)" in md and "2.1 MB (−48%)" in md and "12,345" in md
    assert "| 1 ★ |" in md and "| 0 |" in md and "PRUNED" in md
    assert "![Loss curves](loss_curves.svg)" in md and "(tradeoff.svg)" in md
    assert "| 1 | succeeded | 6m00s | 0.50 | 1 | no | 1.0000 |" in md
    page = (job_dir / "report.html").read_text()
    assert page.count("<svg ") == 2 and page.count("</svg>") == 2 and "data:image" not in page
    assert "<!DOCTYPE html>" in page and "3 quantize (int8)" in page and 'class="better"' in page


def test_report_without_results(store: Store) -> None:
    job_dir = _job(store, "broken", spend=0.25, results=False)
    data = report_data(store, "broken")
    assert data["rows"] == [] and data["results_source"] is None and data["status"] == "failed"
    written = write_report(store, "broken")
    assert [p.name for p in written] == ["report.md", "report.html"]
    md = (job_dir / "report.md").read_text()
    assert "broken: failed" in md and "$0.2500 spent" in md and "No results yet" in md
    assert "| 1 | failed (exit 1) |" in md
    assert "No results yet" in (job_dir / "report.html").read_text()


def test_rows_from_step_done_events_when_results_missing(store: Store) -> None:
    _job(store, "partial", spend=0.5, results=False)
    store.add_events("partial", 1, [{"event": "step_done", "index": 0, "kind": "train",
                                     "wall_s": 30.0, "output": "/m",
                                     "metrics": {"ppl": 50.0, "params": 10}}])
    data = report_data(store, "partial")
    assert data["results_source"] == "events"
    rows = [(r["label"], r["perplexity"], r["cost_usd"]) for r in data["rows"]]
    assert rows == [("0 train", 50.0, 0.5)]


def test_tolerates_junk(store: Store) -> None:
    job_dir = _job(store, "junk", spend=0.0, results=False)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "results.json").write_text(json.dumps(
        {"baseline": None, "steps": [
            {"kind": "train", "metrics": {"perplexity": "nan?", "params": True},
             "extra": {"loss_curve": [[1], "x", [2, None], [3, 1.5]]}}, 7]}))
    data = report_data(store, "junk")
    assert [r["label"] for r in data["rows"]] == ["train"]
    assert data["rows"][0]["perplexity"] is None and data["rows"][0]["params"] is None
    assert data["loss_curves"] == {"None-train": [[3, 1.5]]}
    assert [p.name for p in write_report(store, "junk")][:2] == ["report.md", "report.html"]
    (job_dir / "results.json").write_text("{not json")
    assert report_data(store, "junk")["results_source"] is None
    assert report_data(store, "nobody")["status"] == "unknown"


def test_workload_shaped_results(store: Store) -> None:
    """Metric names as the runner writes them; no evaluate at the end, so a final row."""
    job_dir = _job(store, "wl", spend=0.3, results=False)
    job_dir.mkdir(parents=True, exist_ok=True)
    trials = [{"number": n, "params": {"train.lr": 1e-3}, "value": 6.0, "state": "complete"}
              for n in range(2)]  # identical trials: metrics.best_trial decides
    (job_dir / "results.json").write_text(json.dumps({"baseline": BASE, "steps": [
        {"index": 0, "kind": "hpo", "wall_s": 1.0, "metrics": {"best_trial": 1},
         "extra": {"trials": trials, "best_params": {"train.lr": 1e-3}}},
        {"index": 1, "kind": "prune", "wall_s": 1.0, "extra": {"losses": [[1, 6.0], [2, 5.5]]},
         "metrics": {"method": "magnitude", "params_after": 1_000_000, "nonzero_params": 600_000}},
        {"index": 2, "kind": "distill", "wall_s": 1.0, "extra": {"losses": [[1, 3.0]]},
         "metrics": {"student_params": 750_000, "tokens_per_s": 2e4}},
        {"index": 3, "kind": "quantize", "wall_s": 0.0,
         "metrics": {"method": "int8-dynamic", "size_bytes_before": 3e6, "size_bytes_after": 1e6}},
    ], "final": _metrics(perplexity=95.0, params=750_000, size_bytes=1_000_000)}))
    data = report_data(store, "wl")
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["baseline", "0 hpo", "1 prune (magnitude)", "2 distill",
                          "3 quantize (int8-dynamic)", "final (after 3 quantize)"]
    assert rows["2 distill"]["d_params_pct"] == pytest.approx(-25.0)
    assert rows["3 quantize (int8-dynamic)"]["d_size_pct"] == pytest.approx(-75.0)
    final = rows["final (after 3 quantize)"]
    assert final["d_perplexity_pct"] == pytest.approx(-5.0) and final["cost_usd"] is None
    assert [t["number"] for t in data["hpo_trials"] if t["best"]] == [1]
    assert set(data["loss_curves"]) == {"1-prune", "2-distill"}
    md = write_report(store, "wl")[0].read_text()
    assert "| final (after 3 quantize) |" in md and "600.00k nonzero" in md


def test_attempts_table_says_why_each_attempt_ended(tmp_path, monkeypatch):
    from optjob.manager.report.text import ATTEMPT_HEADERS, attempt_cells

    row = {"number": 1, "status": "preempted", "exit_code": 137, "duration_s": 3.0, "hourly_usd": 0.1, "nodes": 1,
           "spot": True, "usd": 0.001,
           "detail": "rehearsal kill at step 36 of 0:train; last checkpoint 30; lost 6 steps"}
    cells = attempt_cells(row)
    assert len(cells) == len(ATTEMPT_HEADERS) and ATTEMPT_HEADERS[-1] == "Ended because"
    assert cells[-1].endswith("lost 6 steps") and cells[1] == "preempted (exit 137)"
    assert attempt_cells({**row, "detail": None})[-1] == "preempted"


# ---- plots ---------------------------------------------------------------------------------------

def _svg(text: str) -> ET.Element:
    root = ET.fromstring(text)  # well-formed XML, or this raises
    assert root.tag == f"{SVG}svg"
    return root


def _row(label: str, ppl: float | None, size: float | None = 4e6, latency: float | None = 10.0,
         kind: str = "train") -> dict[str, object]:
    return {"label": label, "kind": kind, "perplexity": ppl, "size_bytes": size, "latency_ms": latency}


def test_nice_and_log_ticks() -> None:
    assert [nice_step(s) for s in (1.0, 7.0, 13.0, 0.3, 4600.0)] == [0.2, 1.0, 2.0, 0.05, 1000.0]
    assert nice_ticks(0, 300, 6) == [0, 50, 100, 150, 200, 250, 300]
    assert nice_ticks(2.43, 8.63) == [3, 4, 5, 6, 7, 8]
    assert nice_ticks(0.1, 0.7) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]  # no float noise
    assert nice_ticks(-0.9, 0.4) == [-0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4]
    assert "-0" not in map(fmt, nice_ticks(-0.9, 0.4))
    assert len(set(map(fmt, nice_ticks(5.0, 5.0000001)))) == len(nice_ticks(5.0, 5.0000001))  # labels apart
    assert 5 in nice_ticks(5, 5) and len(nice_ticks(5, 5)) >= 2  # a single value still gets ticks
    assert log_ticks(150, 5000) == [200, 500, 1000, 2000, 5000]  # under two decades: 2x and 5x too
    assert log_ticks(90, 60000) == [100, 1000, 10000]  # wider: decades only
    assert log_ticks(0.03, 0.9) == [0.05, 0.1, 0.2, 0.5]
    assert log_ticks(3000, 6500) == [3000, 4000, 5000, 6000]  # within one decade: linear nice ticks


def test_loss_plot_svg(tmp_path: Path) -> None:
    curves = {"0-train": [[s, 8.0 - s / 100] for s in range(1, 301)], "1-prune-again": [[1, 5.0], [10, 4.5]]}
    images = plot_all({"loss_curves": curves, "rows": []}, tmp_path)
    assert list(images) == ["Loss curves"] and images["Loss curves"].name == "loss_curves.svg"
    root = _svg(images["Loss curves"].read_text())
    lines = root.findall(f".//{SVG}polyline")
    assert len(lines) == 2 and len(lines[0].get("points", "").split()) == 300
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "Loss by step" in texts and "0 train" in texts and "1 prune-again" in texts  # one dash replaced
    assert len(root.findall(f".//{SVG}circle")) == 2  # markers on the short curve only
    first, last = (tuple(map(float, p.split(","))) for p in lines[0].get("points", "").split()[::299])
    assert first[0] < last[0] and first[1] < last[1]  # the loss falls: y grows downward in SVG


def test_tradeoff_plot_svg(tmp_path: Path) -> None:
    rows = [_row("baseline", 4000.0, kind="baseline"), _row("1 <script>alert(1)</script>", 150.0, latency=None),
            _row("2 prune", 300.0, size=2e6, latency=6.0), _row("3 evaluate", 300.0, kind="evaluate")]
    text = plot_all({"loss_curves": {}, "rows": rows}, tmp_path)["Size and latency vs perplexity"].read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text
    size, latency = _svg(text).findall(f"{SVG}g[@class='panel']")
    ys = [float(c.get("cy", "nan")) for c in size.findall(f"{SVG}circle")]
    assert len(ys) == 3  # one point per model: the evaluate row measures a model already shown
    assert ys[1] > ys[2] > ys[0]  # perplexity 150 < 300 < 4000: lower perplexity, lower on the chart
    assert len(latency.findall(f"{SVG}circle")) == 2
    ticks = {t.text for t in size.iter(f"{SVG}text")}
    assert {"perplexity (log scale)", "model size (MB)", "Size vs perplexity", "1000"} <= ticks
    merged = [_row("a", 50.0), _row("b", 50.0)]
    panel = _svg(plot_all({"loss_curves": {}, "rows": merged}, tmp_path)["Size and latency vs perplexity"]
                 .read_text()).findall(f"{SVG}g[@class='panel']")[0]
    assert [t.text for t in panel.findall(f"{SVG}text[@class='label']")] == ["a = b"]
    unmeasured = [_row("a", 50.0, latency=None), _row("b", 40.0, size=1e6, latency=None)]
    root = _svg(plot_all({"loss_curves": {}, "rows": unmeasured}, tmp_path)["Size and latency vs perplexity"]
                .read_text())
    assert "not measured" in [t.text for t in root.findall(f"{SVG}g[@class='panel']")[1].iter(f"{SVG}text")]


def test_plots_without_data_are_not_written_and_stale_ones_go(tmp_path: Path) -> None:
    for name in ("loss_curves.svg", "tradeoff.svg", "loss_curves.png", "tradeoff.png"):
        (tmp_path / name).write_text("stale")
    assert plot_all({"loss_curves": {"0-train": []}, "rows": [_row("a", None)]}, tmp_path) == {}
    assert list(tmp_path.iterdir()) == []
    bad = {"loss_curves": {"0-train": [[1, "x"]]}, "rows": [{"label": "a", "perplexity": 5.0, "size_bytes": "?"}]}
    (tmp_path / "tradeoff.svg").write_text("stale")
    assert plot_all(bad, tmp_path) == {} and list(tmp_path.iterdir()) == []  # a bad value costs the plot only
