"""``optjob cost [NAME]``: where the money went, per job and per attempt, beside the estimate."""

from __future__ import annotations

import json
from typing import Any

import click

from ..store import open_store
from .common import find_job


def cost_rows(store: Any, name: str) -> dict[str, Any]:
    job = store.job(name)
    plan = job.plan if job else {}
    attempts = []
    for a in store.attempts(name):
        end = a.ended_at or store.clock.time()
        attempts.append({
            "attempt": a.number, "run": a.run, "status": a.status, "duration_s": round(end - a.started_at, 2),
            "hourly_usd": a.hourly_usd, "nodes": a.nodes, "spot": bool(a.spot),
            "usd": round(store.spend(name, a.number), 6),
            "exit_code": a.exit_code, "ended_because": a.detail or a.status, "released": bool(a.released),
        })
    chosen = plan.get("chosen") or {}
    return {"name": name, "status": job.status.value if job else None,
            "reason": job.reason.value if job and job.reason else None,
            "spent_usd": round(store.spend(name), 6), "estimated_usd": chosen.get("est_usd"),
            "estimated_hours": chosen.get("est_hours"), "max_usd": (plan.get("budget") or {}).get("max_usd"),
            "attempts": attempts}


def cost_command(name: str | None, as_json: bool) -> None:
    from ..units import duration, money

    store = open_store()
    if name:
        find_job(store, name)
    names = [name] if name else [j.name for j in store.jobs()]
    rows = [cost_rows(store, n) for n in names]
    total = sum(r["spent_usd"] for r in rows)
    if as_json:
        click.echo(json.dumps({"jobs": rows, "total_usd": round(total, 6)}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    con = Console(highlight=False)
    for r in rows:
        est = f"estimated {money(r['estimated_usd'])}" if r["estimated_usd"] is not None else "no estimate"
        cap = f", cap {money(r['max_usd'])}" if r["max_usd"] is not None else ""
        con.print(f"[bold]{r['name']}[/bold] {r['status']}: spent {money(r['spent_usd'])} ({est}{cap})")
        table = Table("attempt", "status", "duration", "$/h", "nodes", "spot", "spent", box=None, pad_edge=False)
        for a in r["attempts"]:
            table.add_row(str(a["attempt"]), a["ended_because"], duration(a["duration_s"]), money(a["hourly_usd"]),
                          str(a["nodes"]), "yes" if a["spot"] else "no", money(a["usd"]))
        con.print(table)
    con.print(f"total: {money(total)} across {len(rows)} job(s)")
