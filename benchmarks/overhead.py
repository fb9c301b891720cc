"""3. Manager overhead: ``optjob apply --local`` of a small spec against a plain script that calls
the same step functions directly (``benchmarks/plain_pipeline.py``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .common import (
    OPTJOB,
    PYTHON,
    Ctx,
    base_env,
    interleave,
    median,
    pair_ratios,
    ratio,
    run_cmd,
    small_spec,
    warm_cache,
    write_spec,
)

NAME = "overhead"
TITLE = "Manager overhead"
MEASURES = ("Wall time of `optjob apply SPEC --local --yes` (plan, state store, workload subprocess, log "
            "ingestion every 0.5 s and within 20 ms of the workload's exit, metering, teardown, report) against "
            "`python -m benchmarks.plain_pipeline SPEC` doing the same work in one process (same model, data, "
            "baseline evaluation, step functions, saved models, evaluation of each step's output; both processes "
            "end with steps/shutdown.py's fast exit). SPEC: 2-layer 128-wide Llama, seq 64, batch 8, train N "
            "steps + evaluate; each apply in a fresh OPTJOB_HOME, corpus/tokenizer cache warm for both, one torch "
            "thread on both sides (steadier on shared cores). Wall-time ratio of medians; CPU-time ratio beside it.")
GOAL = "apply / plain < 1.05"


def _timeline(job_dir: Path, start: float, end: float) -> dict[str, float]:
    """Where an apply's time went: before the workload's first event, the workload (first event to
    job_done), job_done to the report being written, and the rest."""
    events = [json.loads(line) for line in (job_dir / "logs" / "attempt-1.log").read_text().splitlines()
              if line.startswith('{"event"')]
    first, done = events[0]["ts"], next(e["ts"] for e in events if e["event"] == "job_done")
    report = (job_dir / "report.html").stat().st_mtime if (job_dir / "report.html").exists() else end
    spec = (job_dir / "job.json").stat().st_mtime
    return {"cli_and_plan": spec - start, "launch_to_first_event": first - spec, "workload_events": done - first,
            "job_done_to_report_written": report - done, "after_report": end - report}


def run(ctx: Ctx) -> dict[str, Any]:
    steps, rounds = (40, 1) if ctx.quick else (200, 2)
    spec = write_spec(ctx.tmp / "specs", "bench-overhead", small_spec("bench-overhead", steps=steps))
    warm_cache(spec)
    cpu: dict[str, list[float]] = {"apply": [], "plain": []}
    timelines: list[dict[str, float]] = []

    def apply() -> float:
        home = ctx.mkdtemp("home-")
        env = base_env(OPTJOB_HOME=str(home), OMP_NUM_THREADS="1")
        start = time.time()
        wall, proc = run_cmd([OPTJOB, "apply", str(spec), "--local", "--yes"], env=env, timeout=900)
        timelines.append(_timeline(home / "jobs" / "bench-overhead", start, start + wall))
        cpu["apply"].append(proc.cpu_s)  # type: ignore[attr-defined]
        return wall

    def plain() -> float:
        work = ctx.mkdtemp("plain-")
        wall, proc = run_cmd([PYTHON, "-m", "benchmarks.plain_pipeline", str(spec), str(work)],
                             env=base_env(OMP_NUM_THREADS="1"), timeout=900)
        cpu["plain"].append(proc.cpu_s)  # type: ignore[attr-defined]
        return wall

    times = interleave({"optjob apply --local": apply, "plain script": plain}, rounds)
    a, p = times["optjob apply --local"], times["plain script"]
    per_round = pair_ratios(a, p)
    overhead = ratio(median(a), median(p))
    metrics = {"train_steps": steps, "rounds": rounds, "median_s": {"apply": median(a), "plain": median(p)},
               "ratio": overhead, "ratio_per_round": per_round, "ratio_per_round_median": median(per_round),
               "extra_s": median(a) - median(p),
               "cpu_s": {k: median(v) for k, v in cpu.items()},
               "cpu_ratio": ratio(median(cpu["apply"]), median(cpu["plain"])),
               "apply_timeline_s": {k: median([t[k] for t in timelines]) for k in timelines[0]}}
    summary = (f"wall apply / plain = {overhead:.3f} (per-round median {median(per_round):.3f}; "
               f"+{metrics['extra_s']:.1f} s on {median(p):.1f} s); CPU time apply / plain = "
               f"{metrics['cpu_ratio']:.3f}; {steps} train steps, {rounds} round(s)")
    return {"summary": summary, "met": None if ctx.quick else overhead < 1.05, "metrics": metrics,
            "notes": ["--quick: 40 steps, one round: the fixed cost weighs more; the goal is judged on the "
                      "full run"] if ctx.quick else []}
