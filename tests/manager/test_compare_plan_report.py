"""``compare`` in the control plane: the plan prices every variant, the report has one row per
variant and draws the Pareto front (no torch)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from optjob.manager import paths
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.planner import make_plan
from optjob.manager.report import report_data, write_report
from optjob.manager.report.pareto import pareto_front
from optjob.manager.store import Store
from optjob.specs import JobSpec
from optjob.specs.errors import SpecError

SVG = "{http://www.w3.org/2000/svg}"
MODEL = {"init": {"family": "llama", "layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "vocab": 512}}


def _spec(variants: dict[str, Any], **model: Any) -> JobSpec:
    return JobSpec.model_validate({
        "name": "cmp", "model": model or MODEL, "resources": {"cloud": "local", "hourly_usd": 0.5},
        "steps": [{"train": {"max_steps": 50}}, {"compare": variants}]})


# ---- the Pareto front ----------------------------------------------------------------------------

def test_pareto_front_keeps_what_nothing_dominates() -> None:
    points = [("a", 1.0, 30.0), ("b", 2.0, 20.0), ("c", 3.0, 25.0),  # c: b is smaller and better
              ("d", 4.0, 10.0), ("e", 4.0, 12.0),  # e: same size as d, worse quality
              ("f", 1.0, 31.0)]  # f: as small as a, worse quality
    assert pareto_front(points) == ["a", "b", "d"]


def test_pareto_front_ties_and_missing_figures() -> None:
    # equal points dominate nothing of each other: both on the front
    assert pareto_front([("x", 2.0, 5.0), ("y", 2.0, 5.0), ("z", 3.0, 6.0)]) == ["x", "y"]
    # a point missing a figure (or a NaN) is not a candidate and dominates nothing
    assert pareto_front([("a", None, 1.0), ("b", 5.0, 5.0), ("c", float("nan"), 0.1)]) == ["b"]
    assert pareto_front([]) == []
    assert pareto_front([("only", 1, 1)]) == ["only"]


# ---- the plan ------------------------------------------------------------------------------------

def test_plan_prices_each_variant_and_the_total_includes_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path))
    one = make_plan(_spec({"mag": [{"prune": {"method": "magnitude"}}]}), local=True)
    variants = {"mag": [{"prune": {"method": "magnitude"}}],
                "distil": [{"distill": {"student": {"layers": 1}, "max_steps": 200}}, {"quantize": {}}]}
    plan = make_plan(_spec(variants), local=True)
    by_name = {v.name: v for v in plan.variants}
    assert list(by_name) == ["mag", "distil"] and by_name["distil"].steps == 2
    assert by_name["distil"].est_seconds > by_name["mag"].est_seconds > 0  # type: ignore[operator]
    assert by_name["mag"].est_seconds == one.variants[0].est_seconds
    hourly = plan.chosen.hourly_usd  # type: ignore[union-attr]
    assert by_name["distil"].est_usd == pytest.approx(by_name["distil"].est_seconds / 3600 * hourly, abs=1e-6)
    rows = [(s.index, s.kind, s.variant, s.variant_step) for s in plan.steps]
    assert rows == [(0, "train", None, None), (1, "prune", "mag", 0), (1, "distill", "distil", 0),
                    (1, "quantize", "distil", 1)]
    assert all(s.est_seconds for s in plan.steps)
    # the total grows by the second variant's steps, the steps before compare counted once
    extra_h = (plan.chosen.est_hours - one.chosen.est_hours) * 3600  # type: ignore[union-attr]
    assert extra_h == pytest.approx(by_name["distil"].est_seconds, rel=1e-3)
    dumped = json.loads(plan.dumps())
    assert [v["name"] for v in dumped["variants"]] == ["mag", "distil"]
    assert dumped["steps"][2]["variant"] == "distil" and dumped["steps"][2]["variant_step"] == 0


def test_plan_refuses_a_step_the_family_cannot_take_inside_a_variant(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 heads over 2 key/value heads: keeping 3 does not split evenly (steps.families refuses it)
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512}
    folder = tmp_path / "gqa"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path))
    steps = [{"compare": {"ok": [{"quantize": {}}],
                          "cut": [{"prune": {"method": "structured", "heads_fraction": 0.25}}]}}]
    spec = JobSpec.model_validate({"name": "cmp", "model": {"path": str(folder)},
                                   "resources": {"cloud": "local"}, "steps": steps})
    with pytest.raises(SpecError, match=r"steps\[0\]\.compare\.cut\[0\]\.prune: .*key/value heads"):
        make_plan(spec, local=True)


# ---- the report ----------------------------------------------------------------------------------

BASE = {"perplexity": 100.0, "latency_ms": 10.0, "size_bytes": 4_000_000, "params": 1_000_000}


def _m(**changes: Any) -> dict[str, Any]:
    return {**BASE, **changes}


def _results() -> dict[str, Any]:
    v = "/x/steps/01-compare"
    return {"name": "cmp", "attempt": 1, "baseline": BASE, "steps": [
        {"index": 0, "kind": "train", "output": "/x/steps/00-train/model", "wall_s": 40.0,
         "metrics": _m(perplexity=20.0), "extra": {}},
        # small and good: on both fronts
        {"index": 1, "kind": "quantize", "variant": "gptq", "variant_step": 0, "output": f"{v}/gptq/00-quantize/model",
         "wall_s": 20.0, "metrics": _m(perplexity=22.0, size_bytes=1_000_000, latency_ms=9.0, method="gptq",
                                        bits=4, group_size=128, gen_tokens_per_s=400.0), "extra": {}},
        # same size as gptq, worse quality: dominated on size; fastest: on the latency front
        {"index": 1, "kind": "quantize", "variant": "rtn", "variant_step": 0, "output": f"{v}/rtn/00-quantize/model",
         "wall_s": 10.0, "metrics": _m(perplexity=25.0, size_bytes=1_000_000, latency_ms=5.0, method="rtn",
                                        bits=4, group_size=128), "extra": {}},
        # two steps: the row is the last one's model, the cost and time are both steps'
        {"index": 1, "kind": "distill", "variant": "distil", "variant_step": 0,
         "output": f"{v}/distil/00-distill/model", "wall_s": 20.0, "metrics": _m(perplexity=40.0),
         "extra": {"losses": [[1, 3.0], [2, 2.5]]}},
        {"index": 1, "kind": "quantize", "variant": "distil", "variant_step": 1,
         "output": f"{v}/distil/01-quantize/model", "wall_s": 10.0,
         "metrics": _m(perplexity=41.0, size_bytes=500_000, latency_ms=12.0, method="int8-weight"), "extra": {}},
    ]}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path))
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def _job(store: Store, spend: float = 1.0) -> Path:
    job_dir = paths.job_dir("cmp")
    store.claim_job("cmp", provider="local", job_dir=str(job_dir), spec_path=None,
                    spec_json=json.dumps({"name": "cmp"}), plan_json=None, owner_alive=lambda j: False)
    attempt = store.add_attempt("cmp", run=1, provider="local", hourly_usd=0.5, nodes=1, spot=False)
    store.update_attempt(attempt.id, status="succeeded", exit_code=0, ended_at=attempt.started_at + 100.0)
    store.add_ledger("cmp", attempt.number, seconds=100.0, usd=spend, hourly_usd=0.5, nodes=1, spot=False)
    store.update_job("cmp", status=JobStatus.SUCCEEDED, reason=Reason.SUCCEEDED)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "results.json").write_text(json.dumps(_results()))
    return job_dir


def test_report_has_one_row_per_variant_and_names_the_fronts(store: Store) -> None:
    _job(store)
    data = report_data(store, "cmp")
    json.dumps(data)
    rows = data["rows"]
    assert [(r["kind"], r["variant"]) for r in rows] == [
        ("baseline", None), ("train", None), ("variant", "gptq"), ("variant", "rtn"), ("variant", "distil")]
    assert all("variant" in r and "output" in r for r in rows)
    by = {r["variant"]: r for r in rows if r["variant"]}
    assert by["distil"]["output"] == "/x/steps/01-compare/distil/01-quantize/model"
    assert by["distil"]["perplexity"] == 41.0 and by["distil"]["wall_s"] == 30.0
    assert by["distil"]["recipe"] == "distill → quantize (int8-weight)"
    assert by["gptq"]["gen_tokens_per_s"] == 400.0 and by["gptq"]["d_size_pct"] == pytest.approx(-75.0)
    # spend split by wall time (no events): 40 + 20 + 10 + 20 + 10 = 100 s; a variant's cost is its steps'
    assert by["distil"]["cost_usd"] == pytest.approx(0.3) and by["rtn"]["cost_usd"] == pytest.approx(0.1)
    assert sum(r["cost_usd"] or 0 for r in rows) == pytest.approx(1.0)
    assert data["fronts"] == {"size": ["gptq", "distil"], "latency": ["gptq", "rtn"]}
    assert by["rtn"]["on_front"] == ["latency"] and by["gptq"]["on_front"] == ["size", "latency"]
    # a variant's loss curve is its own (variants share the compare step's index)
    assert data["loss_curves"] == {"1-distill (distil)": [[1, 3.0], [2, 2.5]]}


def test_report_costs_variants_from_their_own_events(store: Store) -> None:
    _job(store)
    t = store.clock.time()
    marks = [{"event": "step_started", "index": 0, "kind": "train", "ts": t},
             {"event": "step_started", "index": 1, "kind": "quantize", "variant": "gptq", "variant_step": 0,
              "ts": t + 10},
             {"event": "step_started", "index": 1, "kind": "quantize", "variant": "rtn", "variant_step": 0,
              "ts": t + 20},
             {"event": "step_started", "index": 1, "kind": "distill", "variant": "distil", "variant_step": 0,
              "ts": t + 30},
             {"event": "step_started", "index": 1, "kind": "quantize", "variant": "distil", "variant_step": 1,
              "ts": t + 40},
             {"event": "job_done", "ts": t + 100}]
    store.add_events("cmp", 1, marks)
    by = {r["variant"]: r for r in report_data(store, "cmp")["rows"] if r["variant"]}
    assert by["gptq"]["cost_usd"] == pytest.approx(0.1) and by["rtn"]["cost_usd"] == pytest.approx(0.1)
    assert by["distil"]["cost_usd"] == pytest.approx(0.7)  # 10 s + 60 s of the 100 s attempt


def test_written_report_shows_the_compare_table_and_marks_the_front(store: Store) -> None:
    job_dir = _job(store)
    written = write_report(store, "cmp")
    assert "pareto.svg" in [p.name for p in written]
    md = (job_dir / "report.md").read_text()
    assert "## Compare" in md and "| Variant | Recipe | Size | Perplexity |" in md
    assert "| gptq ★ | quantize (gptq int4 g128) |" in md and "| distil ★ |" in md
    assert "Pareto front, perplexity vs size: gptq, distil." in md
    assert "Pareto front, perplexity vs latency: gptq, rtn." in md
    svg = ET.fromstring((job_dir / "pareto.svg").read_text())
    on = {c.find(f"{SVG}title").text.split(":")[0] for c in svg.iter(f"{SVG}circle")  # type: ignore[union-attr]
          if c.get("class") == "on-front"}
    assert on == {"gptq", "distil", "rtn"}
    panels = {g.get("data-front"): g for g in svg.iter(f"{SVG}g") if g.get("data-front")}
    marked = {k: sorted(c.find(f"{SVG}title").text.split(":")[0]  # type: ignore[union-attr]
                        for c in g.iter(f"{SVG}circle") if c.get("class") == "on-front") for k, g in panels.items()}
    assert marked == {"size": ["distil", "gptq"], "latency": ["gptq", "rtn"]}
    page = (job_dir / "report.html").read_text()
    assert "<h2>Compare</h2>" in page and page.count('<tr class="best">') == 3
