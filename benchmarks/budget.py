"""7. Budget cap: spend at stop against ``max_usd`` over several runs priced at $1 a second."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from .common import OPTJOB, Ctx, base_env, last_json, run_cmd, small_spec, warm_cache, write_spec

NAME = "budget"
TITLE = "Budget cap"
MEASURES = ("`optjob apply --local` of a spec that cannot finish within its budget (hourly_usd 3600, i.e. $1/s; "
            "training that the uncalibrated plan thinks fits), each run in a fresh OPTJOB_HOME, with different "
            "`max_usd` and with the workload's deadline margin at its default (20 s) and at 0 "
            "(`OPTJOB_DEADLINE_MARGIN=0`, the tightest); records the exit code and the ledger's spend at stop.")
#: Its figures are spend against a cap, not timings against a peer: ``--quick`` runs it beside the timed
#: comparisons (benchmarks/__main__.py).
BESIDE = True
GOAL = "spend never above max_usd (exit 4, checkpoint kept)"


def run(ctx: Ctx) -> dict[str, Any]:
    cases = [(30.0, None)] if ctx.quick else [(30.0, None), (45.0, None), (30.0, "0")]
    runs = []
    for i, (max_usd, margin) in enumerate(cases):
        name = f"bench-budget-{i}"
        home = ctx.mkdtemp("home-")
        extra = {"OPTJOB_DEADLINE_MARGIN": margin} if margin is not None else {}
        env = base_env(OPTJOB_HOME=str(home), **extra)
        # As many training steps as the (uncalibrated, optimistic) plan says fit in the budget:
        # on this CPU they take longer, so the cap has to stop the run.
        steps = 3000
        while True:
            spec = write_spec(ctx.tmp / "specs", name, small_spec(name, steps=steps, hourly_usd=3600.0,
                                                                  max_usd=max_usd, checkpoint_every=50))
            _, proc = run_cmd([OPTJOB, "plan", str(spec), "--json"], env=env, check=(0, 3))
            if proc.returncode == 0 or steps < 50:
                break
            steps = int(steps * 0.7)
        plan = json.loads(proc.stdout)
        if not plan["budget"]["fits"]:
            raise RuntimeError(f"no step count fits ${max_usd}: {plan['budget']}")
        warm_cache(spec)
        wall, proc = run_cmd([OPTJOB, "apply", str(spec), "--local", "--yes", "--json"], env=env, timeout=900,
                             check=(0, 4))
        outcome = last_json(proc.stdout)
        db = sqlite3.connect(home / "state.db")
        try:
            spent = float(db.execute("SELECT COALESCE(SUM(usd), 0) FROM ledger WHERE job_name = ?",
                                     (name,)).fetchone()[0])
            ckpts = db.execute("SELECT COUNT(*) FROM events WHERE job_name = ? AND kind = 'checkpoint'",
                               (name,)).fetchone()[0]
            stopped = db.execute("SELECT payload FROM events WHERE job_name = ? AND kind = 'stopped'",
                                 (name,)).fetchone()
        finally:
            db.close()
        runs.append({"max_usd": max_usd, "train_steps": steps,
                     "deadline_margin_s": float(margin) if margin is not None else 20.0,
                     "planned_usd": plan["chosen"]["est_usd"], "exit_code": proc.returncode,
                     "status": outcome["status"], "reason": outcome["reason"], "spent_usd": spent,
                     "spent_fraction": spent / max_usd, "checkpoints": ckpts, "apply_wall_s": wall,
                     "stopped_event": json.loads(stopped[0]) if stopped else None})
    capped = [r for r in runs if r["reason"] == "budget"]
    over = [r for r in runs if r["spent_usd"] > r["max_usd"] + 1e-9]
    worst = max(r["spent_fraction"] for r in runs)
    summary = (f"{len(runs)} run(s), {len(capped)} stopped by the cap (exit 4), {len(over)} over it; spend at stop "
               + ", ".join(f"${r['spent_usd']:.2f} of ${r['max_usd']:.0f} (margin {r['deadline_margin_s']:.0f} s)"
                           for r in runs)
               + f"; highest {worst:.0%} of max_usd")
    notes = [] if len(capped) == len(runs) else [
        "budget: a run finished under budget, so the cap was not exercised in it (a faster machine?)"]
    return {"summary": summary, "met": not over, "metrics": {"runs": runs}, "notes": notes}
