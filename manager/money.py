"""``optjob prices`` and ``optjob cost``: the offers on the market, and where the money went."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from optjob.specs.errors import UsageError

from . import paths


def cached_prices() -> Path:
    """Where ``optjob prices refresh`` writes its snapshot (used when no SkyPilot catalog is present)."""
    return paths.home() / "prices.csv"


def current_catalog() -> Any:
    from .pricing import catalog_dir, load_catalog

    if catalog_dir() is None and cached_prices().exists():
        return load_catalog(cached_prices())
    return load_catalog()


def prices_command(gpu: str | None, spot: bool, cloud: str, region: str | None, limit: int, as_json: bool) -> None:
    from optjob.specs.resources import ResourcesSpec

    from .pricing import find_offers
    from .render import money

    try:
        resources = ResourcesSpec(cloud=cloud, accelerators=gpu, spot=True if spot else "auto",  # type: ignore[arg-type]
                                  region=region)
    except ValueError as exc:
        raise UsageError(f"bad filter: {exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc}") from None
    catalog = current_catalog()
    offers = [o for o in find_offers(resources, catalog) if o.spot or not spot]
    offers.sort(key=lambda o: o.hourly_usd)
    if as_json:
        click.echo(json.dumps([{"cloud": o.cloud, "region": o.region, "instance_type": o.instance_type,
                                "accelerators": o.accelerators, "spot": o.spot, "hourly_usd": o.hourly_usd,
                                "vcpus": o.vcpus, "memory_gb": o.memory_gb} for o in offers[:limit]], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("cloud", "region", "instance", "accelerators", "spot", "$/h", "vCPUs", "mem GB", box=None,
                  title=f"{len(offers)} offers from {getattr(catalog, 'source', 'catalog')}", pad_edge=False)
    for o in offers[:limit]:
        table.add_row(o.cloud, o.region, o.instance_type, o.accelerators or "CPU", "yes" if o.spot else "no",
                      money(o.hourly_usd), f"{o.vcpus or 0:g}", f"{o.memory_gb or 0:g}")
    Console(highlight=False).print(table)


def refresh_command() -> None:
    from .pricing import refresh

    try:
        dest = refresh(cached_prices())
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not refresh prices: {exc} (no SkyPilot catalog and no network?)") from None
    click.echo(f"prices written to {dest}")


def cost_rows(store: Any, name: str) -> dict[str, Any]:
    job = store.job(name)
    plan = job.plan if job else {}
    attempts = []
    for a in store.attempts(name):
        end = a.ended_at or time.time()
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
    from .commands import open_store
    from .render import duration, money

    store = open_store()
    names = [name] if name else [j.name for j in store.jobs()]
    if name and store.job(name) is None:
        raise UsageError(f"no job named {name!r}; see `optjob list`")
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
