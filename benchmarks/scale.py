"""8. Scale of the control plane: ``optjob list`` and ``optjob status NAME`` over a state store
holding 10,000 jobs and 1,000,000 events, and the event ingestion rate of ``Store.add_events``."""

from __future__ import annotations

import json
import random
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from .common import OPTJOB, PYTHON, Ctx, base_env, interleave, last_json, median, run_cmd, small_spec, write_spec

NAME = "scale"
TITLE = "Control-plane scale"
MEASURES = ("A temporary OPTJOB_HOME whose state.db (manager/store.py's schema) is filled with `executemany`: "
            "10,000 finished jobs (real spec and plan JSON), one attempt and one ledger row each, and "
            "1,000,000 events (100 per job). Times `optjob list` and `optjob status NAME` (fresh processes, "
            "interleaved), and `Store.add_events` ingesting 50-event batches into that database (events/s).")
GOAL = "optjob list and optjob status NAME < 0.3 s each"


def populate(db_path: Path, jobs: int, events_per_job: int, spec_json: str, plan_json: str) -> float:
    """Fill a fresh state store; returns the seconds it took."""
    from optjob.manager.store import Store

    Store(db_path).close()  # the schema, as optjob creates it
    t = time.perf_counter()
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    rng = random.Random(0)
    now = time.time() - 86400 * 30
    names = [f"job-{i:05d}" for i in range(jobs)]
    statuses = ["succeeded"] * 8 + ["failed", "stopped"]
    reasons = {"succeeded": "succeeded", "failed": "failed", "stopped": "budget"}
    rows = []
    for i, name in enumerate(names):
        status = statuses[i % len(statuses)]
        t0 = now + i * 60
        rows.append((name, status, reasons[status], "local", f"/nonexistent/jobs/{name}", None, spec_json,
                     plan_json, 1, t0, t0 + 300, t0, t0 + 300, 1, "evaluate",
                     json.dumps({"event": "metrics", "index": 1, "kind": "evaluate"}), None, None, None))
    columns = ("name, status, reason, provider, job_dir, spec_path, spec_json, plan_json, run, created_at, "
               "updated_at, started_at, ended_at, step_index, step_kind, progress_json, owner_pid, owner_seen, message")
    db.executemany(f"INSERT INTO jobs ({columns}) VALUES ({', '.join('?' * 19)})", rows)
    db.executemany(
        "INSERT INTO attempts (job_name, run, number, provider, handle_json, status, exit_code, started_at, "
        "ended_at, hourly_usd, nodes, spot, log_offset, released) VALUES (?, 1, 1, 'local', ?, 'succeeded', 0, "
        "?, ?, 0.1, 1, 0, 1000, 1)",
        [(n, json.dumps({"provider": "local", "pid": 1}), now + i * 60, now + i * 60 + 300)
         for i, n in enumerate(names)])
    db.executemany(
        "INSERT INTO ledger (job_name, attempt, ts, seconds, usd, hourly_usd, nodes, spot, note) "
        "VALUES (?, 1, ?, 300, 0.00833, 0.1, 1, 0, '')", [(n, now + i * 60 + 300) for i, n in enumerate(names)])

    def events() -> Any:
        for i, name in enumerate(names):
            t0 = now + i * 60
            for k in range(events_per_job):
                payload = {"event": "progress", "ts": t0 + k, "v": 1, "index": 0, "kind": "train", "step": 10 * k,
                           "max_steps": 10 * events_per_job, "loss": 8.0 - k * 0.01 + rng.random() * 0.01,
                           "lr": 0.001, "tokens": 5120 * k, "tokens_per_s": 12000.0, "attempt": 1}
                yield (name, 1, t0 + k, "progress", 0, json.dumps(payload))

    db.executemany("INSERT INTO events (job_name, attempt, ts, kind, step_index, payload) VALUES (?, ?, ?, ?, ?, ?)",
                   events())
    db.execute("COMMIT")
    db.close()
    return time.perf_counter() - t


def ingest_rate(db_path: Path, batches: int, batch: int = 50) -> float:
    """events/s of ``Store.add_events`` (with the log offset and job row updates, as reconcile does)."""
    from optjob.manager.store import Store

    store = Store(db_path)
    try:
        job = store.job("job-00000")
        assert job is not None
        attempt = store.attempts(job.name)[0]
        t = time.perf_counter()
        for b in range(batches):
            evs = [{"event": "progress", "ts": time.time(), "v": 1, "index": 0, "kind": "train", "step": b * batch + k,
                    "loss": 3.0, "tokens_per_s": 1.0e4} for k in range(batch)]
            store.add_events(job.name, 1, evs, log_offset=1000 + b, attempt_id=attempt.id,
                             job_update={"progress_json": json.dumps(evs[-1])})
        return batches * batch / (time.perf_counter() - t)
    finally:
        store.close()


def prepare(home: Path, jobs: int, events_per_job: int, batches: int, spec_path: Path) -> dict[str, Any]:
    """In a child process: fill the store, measure ingestion; (the CLI timings run afterwards)."""
    from optjob.manager.planner import make_plan
    from optjob.specs import load_spec

    spec = load_spec(spec_path)
    plan = make_plan(spec, spec_path)
    db = home / "state.db"
    fill_s = populate(db, jobs, events_per_job, spec.model_dump_json(), plan.dumps())
    rate = ingest_rate(db, batches)
    return {"populate_s": fill_s, "events_per_s": rate, "db_bytes": db.stat().st_size}


def run(ctx: Ctx) -> dict[str, Any]:
    # --quick: a fifth of the size (the goal is judged on the full run).
    jobs, per_job, batches, rounds = (2_000, 100, 100, 2) if ctx.quick else (10_000, 100, 400, 5)
    home = ctx.mkdtemp("home-")
    spec = write_spec(ctx.tmp / "specs", "bench-scale", small_spec("bench-scale", steps=200))
    env = base_env(OPTJOB_HOME=str(home))
    _, proc = run_cmd([PYTHON, "-m", "benchmarks.scale", str(home), str(jobs), str(per_job), str(batches),
                       str(spec)], env=env, timeout=900)
    prep = last_json(proc.stdout)
    name = f"job-{jobs // 2:05d}"
    lines = {}

    def timed(args: list[str], key: str) -> float:
        wall, p = run_cmd(args, env=env, timeout=300)
        lines[key] = len(p.stdout.splitlines())
        return wall

    sides = {"optjob list": lambda: timed([OPTJOB, "list"], "list"),
             f"optjob status {name}": lambda: timed([OPTJOB, "status", name], "status"),
             "optjob list --json": lambda: timed([OPTJOB, "list", "--json"], "list_json")}
    times = interleave(sides, rounds, warmup=1)
    med = {k: median(v) for k, v in times.items()}
    worst = max(med["optjob list"], med[f"optjob status {name}"])
    metrics = {"jobs": jobs, "events": jobs * per_job, "rounds": rounds, "median_s": med, "output_lines": lines,
               **prep}
    summary = (f"{jobs:,} jobs / {jobs * per_job:,} events ({prep['db_bytes'] / 1e6:.0f} MB): `optjob list` "
               f"{med['optjob list']:.2f} s ({lines.get('list')} lines), `optjob status NAME` "
               f"{med[f'optjob status {name}']:.2f} s, `list --json` {med['optjob list --json']:.2f} s; ingestion "
               f"{prep['events_per_s']:,.0f} events/s in 50-event batches")
    return {"summary": summary, "met": None if ctx.quick else worst < 0.3, "metrics": metrics, "notes": []}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(prepare(Path(a[0]), int(a[1]), int(a[2]), int(a[3]), Path(a[4]))))
