"""6. Estimate accuracy on spec shapes never run before: the plan's duration of a local run against
what that run measures, uncalibrated and calibrated on the OTHER shapes' runs (leave one out)."""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import OPTJOB, Ctx, base_env, last_json, run_cmd, warm_cache, write_spec

NAME = "estimate"
TITLE = "Estimate accuracy"
MEASURES = ("Several local specs of different shapes (layers, hidden, seq_len, batch, steps; one a pipeline of "
            "train, Wanda pruning, int8-dynamic quantization and evaluate), Llama on the built-in corpus, one torch "
            "thread. Each is applied once in its own OPTJOB_HOME (`optjob apply --local`, `hourly_usd` set); its "
            "metered seconds (ledger) are the measured duration. Beside it: `optjob plan --json`'s est_hours before "
            "any run (uncalibrated: default efficiency) and in a home holding the calibration records of the "
            "OTHER shapes' runs only (copied from their state.db: the shape measured was never run there), and, "
            "for contrast, calibrated on its own run.")
GOAL = ("on a shape never run before: uncalibrated plan within 2x of the measured, calibrated within 15% (judged on "
        "CPU seconds, as on a quiet machine; wall-time ratios on this shared machine shown beside)")
#: estimate / measured bounds of the goal.
UNCALIBRATED = (0.5, 2.0)
CALIBRATED = (0.85, 1.15)


#: What the estimate still leaves out, measured here (see the pipeline shape's quantize and evaluate rows).
NOT_PRICED = [
    "not priced yet: the ~3x slower generated tokens of an int8-dynamic model in every evaluation after the "
    "quantize step (torchao quantizes each call's activations: 3.1-3.4x a token, one CPU thread, llama 2x128 and "
    "4x256), and the runner's final evaluation of a pipeline that does not end with `evaluate`",
    "calibration measures training throughput only; evaluations and generated tokens keep their defaults "
    "(DECODE_S_PER_TOKEN 3 ms; measured 1.8 ms a token at 2x128 and 4.1 ms at 4x256, one CPU thread)",
]


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    seq_len: int
    batch: int
    steps: int
    pipeline: bool = False

    def label(self) -> str:
        what = "train, wanda 50%, int8-dynamic, evaluate" if self.pipeline else "train, evaluate"
        return (f"{self.layers}x{self.hidden}, seq {self.seq_len}, batch {self.batch}, {self.steps} steps "
                f"({what})")


def shapes(quick: bool) -> list[Shape]:
    k = 4 if quick else 1  # --quick: two shapes, a quarter of the steps
    every = [Shape("a", 2, 128, 64, 8, 160 // k),
             Shape("b", 4, 96, 128, 4, 120 // k),
             Shape("c", 3, 160, 32, 16, 120 // k),
             Shape("d", 2, 128, 32, 16, 100 // k, pipeline=True)]
    return [every[0], every[3]] if quick else every


def spec_text(name: str, s: Shape) -> str:
    steps = [f"  - train: {{max_steps: {s.steps}, lr: 1.0e-3, batch_size: {s.batch}, warmup_steps: 5, seed: 0, "
             f"checkpoint_every: 1000}}"]
    if s.pipeline:
        steps += ["  - prune: {method: wanda, sparsity: 0.5, calibration: {samples: 16}}",
                  "  - quantize: {method: int8-dynamic}"]
    steps += ["  - evaluate: {metrics: [perplexity, accuracy, latency, size], max_batches: 20}"]
    return f"""\
name: {name}
model:
  init: {{family: llama, layers: {s.layers}, hidden: {s.hidden}, heads: 4, intermediate: {3 * s.hidden}, vocab: 2048}}
data:
  source: builtin:python-docs
  seq_len: {s.seq_len}
  max_chars: 600000
steps:
{chr(10).join(steps)}
resources: {{cloud: local, hourly_usd: 3.6}}
budget: {{max_usd: 5.0, max_hours: 1.0}}
"""


def _plan(spec: Path, env: dict[str, str]) -> dict[str, Any]:
    return json.loads(run_cmd([OPTJOB, "plan", str(spec), "--json"], env=env)[1].stdout)


def _seconds(plan: dict[str, Any]) -> float:
    return float(plan["chosen"]["est_hours"]) * 3600


def _calibration_rows(home: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(home / "state.db")
    try:
        return list(db.execute("SELECT ts, job_name, accelerator, model_params, precision, tokens_per_s "
                               "FROM calibration"))
    finally:
        db.close()


def _home_with(home: Path, rows: list[tuple[Any, ...]]) -> None:
    """A fresh OPTJOB_HOME whose state store holds ``rows`` as calibration records."""
    from optjob.manager.store import Store

    Store(home / "state.db").close()
    db = sqlite3.connect(home / "state.db")
    try:
        db.executemany("INSERT INTO calibration (ts, job_name, accelerator, model_params, precision, tokens_per_s) "
                       "VALUES (?, ?, ?, ?, ?, ?)", rows)
        db.commit()
    finally:
        db.close()


def measure(ctx: Ctx, s: Shape) -> dict[str, Any]:
    """Plan (uncalibrated) and apply shape ``s`` in a fresh home; what the plan said and the run measured."""
    home = ctx.mkdtemp(f"home-{s.name}-")
    env = base_env(OPTJOB_HOME=str(home), OMP_NUM_THREADS="1")
    name = f"bench-estimate-{s.name}"
    spec = write_spec(ctx.tmp / "specs", name, spec_text(name, s))
    warm_cache(spec)
    before = _plan(spec, env)
    load = os.getloadavg()[0]
    wall, proc = run_cmd([OPTJOB, "apply", str(spec), "--local", "--yes", "--json"], env=env, timeout=900)
    cpu = float(proc.cpu_s)  # type: ignore[attr-defined]
    outcome = last_json(proc.stdout)
    results = json.loads((Path(outcome["job_dir"]) / "results.json").read_text())
    db = sqlite3.connect(home / "state.db")
    try:
        seconds = float(db.execute("SELECT COALESCE(SUM(seconds), 0) FROM ledger WHERE job_name = ?",
                                   (name,)).fetchone()[0])
    finally:
        db.close()
    itself = _plan(spec, env)  # calibrated on this very run
    rows = _calibration_rows(home)
    # The run's training throughput as if it had the CPU to itself: this one thread's CPU time stood
    # in for wall time (the manager's and the workload's together, so a little pessimistic).
    share = cpu / wall if wall > 0 else 1.0
    quiet = [(*row[:5], float(row[5]) / share) for row in rows]
    return {
        "shape": s.label(), "spec": spec, "home": home, "status": outcome["status"],
        "measured_s": seconds, "measured_usd": float(outcome["spent_usd"]), "cpu_s": cpu, "apply_wall_s": wall,
        "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
        "measured_step_wall_s": [[st["kind"], st.get("wall_s")] for st in results["steps"]],
        "uncalibrated_s": _seconds(before),
        "uncalibrated_step_s": [[st["kind"], st["est_seconds"]] for st in before["steps"]],
        "self_calibrated_s": _seconds(itself), "self_calibrated_runs": itself.get("calibrated_runs"),
        "rows": rows, "quiet_rows": quiet,
    }


def run(ctx: Ctx) -> dict[str, Any]:
    runs = [measure(ctx, s) for s in shapes(ctx.quick)]
    for i, r in enumerate(runs):  # leave one out: calibrated on the others' records only
        home = ctx.mkdtemp(f"home-others-{i}-")
        _home_with(home, [row for j, other in enumerate(runs) if j != i for row in other["rows"]])
        plan = _plan(r["spec"], base_env(OPTJOB_HOME=str(home)))
        r["calibrated_s"] = _seconds(plan)
        r["calibrated_runs"] = plan.get("calibrated_runs") or 0
        r["calibrated_step_s"] = [[st["kind"], st["est_seconds"]] for st in plan["steps"]]
        r["calibration_notes"] = [n for n in plan.get("notes", []) if "calibrated" in n or "efficiency" in n]
        home = ctx.mkdtemp(f"home-others-quiet-{i}-")
        _home_with(home, [row for j, other in enumerate(runs) if j != i for row in other["quiet_rows"]])
        r["calibrated_quiet_s"] = _seconds(_plan(r["spec"], base_env(OPTJOB_HOME=str(home))))
    rows = []
    for r in runs:
        m, cpu = r["measured_s"], r["cpu_s"]
        rows.append({
            "shape": r["shape"], "status": r["status"], "load_avg_1m": r["load_avg_1m"],
            "measured_s": round(m, 2), "cpu_s": round(cpu, 2),
            "uncalibrated_s": round(r["uncalibrated_s"], 2),
            "calibrated_on_others_s": round(r["calibrated_s"], 2),
            "calibrated_on_others_quiet_s": round(r["calibrated_quiet_s"], 2),
            # On wall time (the ledger), as this shared machine ran them:
            "uncalibrated_ratio": r["uncalibrated_s"] / m, "calibrated_ratio": r["calibrated_s"] / m,
            "self_calibrated_ratio": r["self_calibrated_s"] / m,
            # As on a quiet machine: against CPU seconds, calibrated on throughput per CPU second:
            "uncalibrated_cpu_ratio": r["uncalibrated_s"] / cpu, "calibrated_cpu_ratio": r["calibrated_quiet_s"] / cpu,
            "calibrating_runs": r["calibrated_runs"], "calibration_notes": r["calibration_notes"],
            "measured_step_wall_s": r["measured_step_wall_s"], "uncalibrated_step_s": r["uncalibrated_step_s"],
            "calibrated_step_s": r["calibrated_step_s"],
        })

    def within(key: str, bounds: tuple[float, float]) -> list[bool]:
        return [bounds[0] <= x[key] <= bounds[1] for x in rows]

    def listed(key: str) -> str:
        return ", ".join(f"{x[key]:.2f}" for x in rows)

    unc_ok, cal_ok = within("uncalibrated_cpu_ratio", UNCALIBRATED), within("calibrated_cpu_ratio", CALIBRATED)
    n = len(rows)
    summary = (f"estimate / measured CPU seconds (a quiet machine) on {n} unseen shapes: uncalibrated "
               f"{listed('uncalibrated_cpu_ratio')} ({sum(unc_ok)}/{n} within 2x), calibrated on the other shapes "
               f"{listed('calibrated_cpu_ratio')} ({sum(cal_ok)}/{n} within 15%); against wall time on this shared "
               f"machine: uncalibrated {listed('uncalibrated_ratio')} "
               f"({sum(within('uncalibrated_ratio', UNCALIBRATED))}/{n}), calibrated {listed('calibrated_ratio')} "
               f"({sum(within('calibrated_ratio', CALIBRATED))}/{n})")
    met = None if ctx.quick else all(unc_ok) and all(cal_ok)
    notes = ["--quick: two shapes, a quarter of the steps, where fixed costs dominate; the goal is judged on the "
             "full run"] if ctx.quick else []
    notes += NOT_PRICED
    return {"summary": summary, "met": met, "metrics": {"shapes": rows, "readme_table": table(rows)}, "notes": notes}


def table(rows: list[dict[str, Any]]) -> str:
    def mark(ratio: float, bounds: tuple[float, float]) -> str:
        return f"{ratio:.2f}" if bounds[0] <= ratio <= bounds[1] else f"**{ratio:.2f}**"

    lines = ["| shape | load avg (1 min, before / after) | measured wall (ledger) | CPU s | uncalibrated plan | "
             "/ CPU s | / wall | calibrated on the other shapes (runs) | / wall | calibrated per CPU second | "
             "/ CPU s | calibrated on itself / wall |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        runs = x["calibrating_runs"] or "none within 2x of its size"
        lines.append(
            f"| {x['shape']} | {x['load_avg_1m'][0]:.1f} / {x['load_avg_1m'][1]:.1f} | {x['measured_s']:.1f} s | "
            f"{x['cpu_s']:.1f} s | {x['uncalibrated_s']:.1f} s | {mark(x['uncalibrated_cpu_ratio'], UNCALIBRATED)} | "
            f"{mark(x['uncalibrated_ratio'], UNCALIBRATED)} | {x['calibrated_on_others_s']:.1f} s ({runs}) | "
            f"{mark(x['calibrated_ratio'], CALIBRATED)} | {x['calibrated_on_others_quiet_s']:.1f} s | "
            f"{mark(x['calibrated_cpu_ratio'], CALIBRATED)} | {x['self_calibrated_ratio']:.2f} |")
    lines += ["", f"Ratios are estimate / measured; bold: outside the goal (uncalibrated {UNCALIBRATED[0]:g}-"
              f"{UNCALIBRATED[1]:g}, calibrated {CALIBRATED[0]:g}-{CALIBRATED[1]:g}). Wall: the ledger's metered "
              "seconds on this shared machine. CPU s: user + system seconds of `optjob apply` and the workload "
              "(one torch thread), what the run takes with a core to itself; the per-CPU-second calibration divides "
              "each calibrating run's recorded tokens/s by its CPU share (CPU s / wall s)."]
    return "\n".join(lines)
