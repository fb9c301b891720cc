"""6. Estimate accuracy: after one calibrating run, the plan's estimated duration and cost of a
local run against what the next run measures."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from .common import OPTJOB, Ctx, base_env, last_json, run_cmd, small_spec, warm_cache, write_spec

NAME = "estimate"
TITLE = "Estimate accuracy"
MEASURES = ("In one OPTJOB_HOME: `optjob apply` a local spec with `hourly_usd` set (2-layer 128-wide Llama, "
            "train + evaluate), which records its measured throughput (manager/pricing/calibration_store.py); "
            "then `optjob plan "
            "--json` the same spec under a second name, `optjob apply` it, and compare the plan's est_hours / "
            "est_usd with the second run's metered seconds (ledger) and spend. The plan before any run "
            "(default efficiency) is shown for contrast. One torch thread, so the two runs see the same speed.")
GOAL = "calibrated estimate of duration and cost within 25% of the measured"


def _plan(spec: Path, env: dict[str, str]) -> dict[str, Any]:
    return json.loads(run_cmd([OPTJOB, "plan", str(spec), "--json"], env=env)[1].stdout)


def run(ctx: Ctx) -> dict[str, Any]:
    steps = 30 if ctx.quick else 200
    home = ctx.mkdtemp("home-")
    env = base_env(OPTJOB_HOME=str(home), OMP_NUM_THREADS="1")
    first = write_spec(ctx.tmp / "specs", "bench-estimate-1", small_spec("bench-estimate-1", steps=steps,
                                                                          hourly_usd=3.6, max_usd=5.0))
    second = write_spec(ctx.tmp / "specs", "bench-estimate-2", small_spec("bench-estimate-2", steps=steps,
                                                                           hourly_usd=3.6, max_usd=5.0))
    warm_cache(first)
    before = _plan(second, env)["chosen"]
    run_cmd([OPTJOB, "apply", str(first), "--local", "--yes", "--json"], env=env, timeout=900)
    plan = _plan(second, env)
    est = plan["chosen"]
    _, proc = run_cmd([OPTJOB, "apply", str(second), "--local", "--yes", "--json"], env=env, timeout=900)
    outcome = last_json(proc.stdout)
    results = json.loads((Path(outcome["job_dir"]) / "results.json").read_text())
    measured_steps = {s["kind"]: s["wall_s"] for s in results["steps"]}
    db = sqlite3.connect(home / "state.db")
    try:
        seconds = float(db.execute("SELECT COALESCE(SUM(seconds), 0) FROM ledger WHERE job_name = ?",
                                   ("bench-estimate-2",)).fetchone()[0])
        calibrations = db.execute("SELECT COUNT(*) FROM calibration").fetchone()[0]
    finally:
        db.close()
    spent = float(outcome["spent_usd"])
    err_t = est["est_hours"] * 3600 / seconds - 1 if seconds else float("nan")
    err_c = est["est_usd"] / spent - 1 if spent else float("nan")
    steps_est = {s["kind"]: s["est_seconds"] for s in plan["steps"]}
    metrics = {
        "train_steps": steps,
        "calibrated_runs": plan.get("calibrated_runs"),
        "calibration_records": calibrations,
        "estimate": {"seconds": est["est_hours"] * 3600, "usd": est["est_usd"], "per_step_s": steps_est},
        "measured_step_wall_s": measured_steps,
        "uncalibrated_estimate": {"seconds": before["est_hours"] * 3600, "usd": before["est_usd"]},
        "measured": {"seconds": seconds, "usd": spent, "status": outcome["status"]},
        "error_duration": err_t,
        "error_cost": err_c,
        "uncalibrated_error_duration": before["est_hours"] * 3600 / seconds - 1 if seconds else None,
        "notes": plan.get("notes"),
    }
    summary = (f"estimate / measured - 1: duration {err_t:+.0%}, cost {err_c:+.0%} after {plan.get('calibrated_runs')} "
               f"calibrating run(s) (estimated {est['est_hours'] * 3600:.1f} s / ${est['est_usd']:.4f}, measured "
               f"{seconds:.1f} s / ${spent:.4f}); uncalibrated the plan said {before['est_hours'] * 3600:.1f} s "
               f"({metrics['uncalibrated_error_duration']:+.0%})")
    met = None if ctx.quick else abs(err_t) <= 0.25 and abs(err_c) <= 0.25
    notes = ["--quick: 30 steps, where fixed costs dominate; the goal is judged on the full run"] if ctx.quick else []
    return {"summary": summary, "met": met, "metrics": metrics, "notes": notes}
