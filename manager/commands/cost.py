"""``optjob cost [NAME] [--since 7d]``: where the money went — one row per attempt with when it
was launched, where it ran and what it cost (as ``sky cost-report`` does), a row per job for the
SkyPilot jobs controller that ran its managed jobs (its own ledger lines, counted in the job's
spend and against its budget), totals per cloud and per accelerator, and each job's spend beside
its estimate. Where an attempt ran is what the provider launched when it said so (the ledger's
price source, ``catalog:aws/us-east-1/p3.2xlarge/spot``), else the plan's offer."""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import click
from optjob.specs.errors import UsageError

from ..store import JobRow, Store, open_store
from .common import find_job

_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$", re.I)
_SPAN_S = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
COST_COLUMNS = ("job", "#", "launched (UTC)", "spent", "where", "duration", "ended", "$/h")


def parse_since(text: str, now: float) -> float:
    """``7d``, ``24h``, ``30m``, ``2w`` back from ``now``, or a date ``2026-01-31`` (UTC): epoch seconds."""
    m = _SPAN.match(text)
    if m:
        return now - float(m.group(1)) * _SPAN_S[m.group(2).lower()]
    try:
        day = datetime.datetime.strptime(text.strip(), "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        raise UsageError(f"--since {text}: give a span (7d, 24h, 30m, 2w) or a date (2026-01-31)") from None
    return day.timestamp()


def utc(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def placement(job: JobRow | None) -> tuple[str, str, bool]:
    """(cloud, accelerators, spot) of the offer the job's plan chose: ``("aws", "A100:8", True)``;
    ``("local", "CPU", False)`` on this machine."""
    chosen = (job.plan.get("chosen") if job else None) or {}
    if job is None or job.provider == "local" or chosen.get("cloud") in (None, "local"):
        return "local", "CPU", False
    return str(chosen.get("cloud")), str(chosen.get("accelerators") or "CPU"), bool(chosen.get("spot"))


def cost_rows(store: Store, name: str, since: float | None = None) -> dict[str, Any]:
    job = store.job(name)
    plan = job.plan if job else {}
    cloud, accelerators, _ = placement(job)
    attempts = []
    now = store.clock.time()
    controller: dict[str, Any] = {"usd": 0.0, "seconds": 0.0, "source": None}
    for a in store.attempts(name):
        if since is not None and a.ended_at is not None and a.ended_at < since:
            continue  # over before the window: it cost nothing in it
        end = a.ended_at or now
        launched = (a.placement or "").split("/")
        where_cloud = launched[0] if len(launched) == 4 else cloud
        instance = launched[2] if len(launched) == 4 and launched[2] != "?" else None
        attempts.append({
            "attempt": a.number, "run": a.run, "status": a.status, "launched_at": a.started_at,
            "ended_at": a.ended_at, "duration_s": round(end - a.started_at, 2), "cloud": where_cloud,
            "accelerators": accelerators, "instance_type": instance, "hourly_usd": a.hourly_usd, "nodes": a.nodes,
            "spot": bool(a.spot), "price_source": a.price_source or "plan",
            "billed_from": a.billed_from, "usd": round(store.spend(name, a.number, kind="node"), 6),
            "exit_code": a.exit_code, "ended_because": a.detail or a.status, "released": bool(a.released),
        })
        ctl = store.spend(name, a.number, kind="controller")
        if ctl > 0:
            controller["usd"] += ctl
            controller["source"] = a.overhead_source
            controller["hourly_usd"] = a.overhead_usd
            controller["cloud"] = where_cloud
    controller["usd"] = round(controller["usd"], 6)
    chosen = plan.get("chosen") or {}
    return {"name": name, "status": job.status.value if job else None,
            "reason": job.reason.value if job and job.reason else None,
            "spent_usd": round(store.spend(name), 6), "estimated_usd": chosen.get("est_usd"),
            "estimated_hours": chosen.get("est_hours"), "max_usd": (plan.get("budget") or {}).get("max_usd"),
            "cloud": cloud, "accelerators": accelerators, "attempts": attempts,
            "controller": controller if controller["usd"] > 0 else None}


def totals(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Spend of the attempts shown, by ``cloud`` or ``accelerators`` (the controller: its cloud, and
    ``jobs controller``), largest first."""
    out: dict[str, float] = {}
    for r in rows:
        for a in r["attempts"]:
            out[a[key]] = out.get(a[key], 0.0) + a["usd"]
        if r.get("controller"):
            k = r["controller"].get("cloud", r["cloud"]) if key == "cloud" else "jobs controller"
            out[k] = out.get(k, 0.0) + r["controller"]["usd"]
    return {k: round(v, 6) for k, v in sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))}


def job_spend(row: dict[str, Any]) -> float:
    """What the rows shown of a job cost: its attempts' nodes and its jobs controller."""
    return sum(a["usd"] for a in row["attempts"]) + (row["controller"]["usd"] if row.get("controller") else 0.0)


def _where(a: dict[str, Any]) -> str:
    return " ".join(x for x in (a["cloud"], a.get("instance_type") or a["accelerators"],
                                "spot" if a["spot"] else "") if x)


def cost_command(name: str | None, as_json: bool, since: str | None = None) -> None:
    from ..render import job_status_text, print_fitted
    from ..units import duration, money

    store = open_store()
    if name:
        find_job(store, name)
    start = parse_since(since, store.clock.time()) if since else None
    names = [name] if name else [j.name for j in store.jobs()]
    rows = [cost_rows(store, n, start) for n in names]
    if start is not None:
        rows = [r for r in rows if r["attempts"]]
    total = sum(job_spend(r) for r in rows)
    by_cloud, by_gpu = totals(rows, "cloud"), totals(rows, "accelerators")
    if as_json:
        click.echo(json.dumps({"jobs": rows, "total_usd": round(total, 6), "since": start,
                               "by_cloud": by_cloud, "by_accelerator": by_gpu}, indent=2))
        return
    window = f" since {utc(start)} UTC ({since})" if start is not None else ""
    attempts = sorted(((r, a) for r in rows for a in r["attempts"]), key=lambda ra: ra[1]["launched_at"])
    if not attempts:
        click.echo(f"no attempts{window}" if start is not None else "nothing spent yet: no attempts")
        return
    lines = [{"job": r["name"], "#": str(a["attempt"]), "launched (UTC)": utc(a["launched_at"]),
              "where": _where(a), "duration": duration(a["duration_s"]), "$/h": money(a["hourly_usd"] * a["nodes"]),
              "spent": money(a["usd"]), "ended": a["status"] if a["ended_at"] else "running"}
             for r, a in attempts]
    for r in rows:
        if (ctl := r.get("controller")) is not None:  # its own line: counted in the job's spend and budget
            lines.append({"job": r["name"], "#": "ctl", "launched (UTC)": utc(r["attempts"][0]["launched_at"]),
                          "where": f"SkyPilot jobs controller ({ctl['source'] or '?'})", "duration": "-",
                          "$/h": money(ctl.get("hourly_usd")), "spent": money(ctl["usd"]), "ended": "-"})
    print_fitted(lines, COST_COLUMNS, title=f"Attempts{window}", keep=2)
    click.echo()
    print_fitted([{"job": r["name"], "status": job_status_text(r["status"] or "-", r["reason"]),
                   "spent": money(job_spend(r)), "estimated": money(r["estimated_usd"]),
                   "cap": money(r["max_usd"])} for r in rows],
                 ("job", "spent", "estimated", "status", "cap"), title=f"Jobs{window}", keep=2)
    click.echo()
    click.echo("by cloud: " + ", ".join(f"{k} {money(v)}" for k, v in by_cloud.items()))
    click.echo("by accelerator: " + ", ".join(f"{k} {money(v)}" for k, v in by_gpu.items()))
    click.echo(f"total: {money(total)} across {len(rows)} job(s), {len(attempts)} attempt(s){window}")
