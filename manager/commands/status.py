"""``optjob status [NAME]`` and ``optjob list``: each job's phase, step, elapsed time and spend."""

from __future__ import annotations

import json
from typing import Any

import click

from ..store import JobRow, Store, open_store
from . import common
from .common import find_job, write_report_quietly

#: Rows `optjob list` prints (the most recently updated, plus every unfinished job); --json lists all.
#: Rendering is ~1 ms a row, so 10,000 jobs would take seconds.
LIST_LIMIT = 50


def where(job: JobRow) -> str:
    """Where the job runs, short: ``local``, ``aws A100:8 spot``."""
    chosen = job.plan.get("chosen") or {}
    if job.provider == "local" or chosen.get("cloud") in (None, "local"):
        return "local"
    return " ".join(str(x) for x in (chosen.get("cloud"), chosen.get("accelerators") or "CPU",
                                     "spot" if chosen.get("spot") else "") if x)


def job_summary(store: Store, job: JobRow) -> dict[str, Any]:
    attempts = store.attempts(job.name)
    spent = store.spend(job.name)
    running = [a for a in attempts if not a.ended_at]
    burn = sum(a.hourly_usd * a.nodes for a in running)
    # Elapsed as the ledger counts it, across every attempt and run: the same span `spent` is for.
    elapsed = store.elapsed_seconds(job.name)
    return {
        "name": job.name, "status": job.status.value, "reason": job.reason.value if job.reason else None,
        "provider": job.provider, "where": where(job), "step_index": job.step_index, "step_kind": job.step_kind,
        "progress": job.progress, "elapsed_s": round(elapsed, 1), "spent_usd": round(spent, 6),
        "burn_usd_per_h": burn, "attempts": len(attempts), "run": job.run, "job_dir": job.job_dir,
        "message": job.message, "created_at": job.created_at, "launched_at": job.started_at,
        "updated_at": job.updated_at, **phase_of(store, job),
    }


#: Events that open or close a phase (``manager.phases``); a training step's position comes from the
#: job row's latest progress event, so a long run's thousands of them are not read.
PHASE_EVENTS = ("phase", "stopped", "error", "job_done")


def phase_of(store: Store, job: JobRow) -> dict[str, Any]:
    """A running job's current phase (``phase``: its JSON, ``phase_text``: a table cell), with the ETA
    counted down to now; nothing for a finished job."""
    from ..phases import current_phase

    if job.status.is_terminal():
        return {}
    events = [e for _, e in store.events(job.name, kinds=PHASE_EVENTS)]
    if (job.progress or {}).get("event") == "progress":
        events.append(job.progress)  # the latest: it moves the step's phase if that is still open
    phase = current_phase(events, job.plan)
    if phase is None:
        return {}
    elapsed = max(0.0, store.clock.time() - phase.last_ts) if phase.last_ts is not None else 0.0
    return {"phase": phase.to_json(elapsed), "phase_text": phase.short(elapsed)}


def status_command(name: str | None, *, as_json: bool) -> None:
    from ..render import print_jobs

    store = open_store()
    if name is not None:
        jobs = [find_job(store, name)]
    elif as_json:
        jobs = store.jobs()
    else:
        jobs = store.jobs(limit=LIST_LIMIT)
        shown = {j.name for j in jobs}
        jobs += [j for j in store.unfinished_jobs() if j.name not in shown]
    before = {j.name: j.status for j in jobs}
    current = common.reconcile_all(store, jobs)
    for job in current:  # finished while nobody watched (--detach, a killed manager): its report now
        if job.status.is_terminal() and not before[job.name].is_terminal():
            write_report_quietly(store, job.name)
            common.notify_ended(store, job.name)
    rows = [job_summary(store, j) for j in current]
    if as_json:
        click.echo(json.dumps(rows[0] if name else rows, indent=2))
    else:
        print_jobs(rows)
        hidden = store.job_count() - len(rows) if name is None else 0
        if hidden > 0:
            click.echo(f"... and {hidden:,} older finished job(s) not shown (`optjob list --json` lists all)")
