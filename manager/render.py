"""Human-readable output: the plan and the job tables (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .units import duration, money

if TYPE_CHECKING:
    from .plan import Plan


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def print_plan(plan: Plan) -> None:
    from rich.table import Table

    con = _console()
    where = "this machine" if plan.local else f"{plan.provider} ({plan.resources.cloud})"
    con.print(f"[bold]Plan for {plan.name}[/bold]{' (dry run: tiny proxy, every step capped)' if plan.dry_run else ''}"
              f" — runs on {where}, teardown: {plan.teardown}")
    for w in plan.warnings:
        con.print(f"[yellow]warning:[/yellow] {w}")
    steps = Table("#", "step", "what", "tokens", "est. time", box=None, pad_edge=False)
    for s in plan.steps:
        steps.add_row(str(s.index), s.kind, s.summary, f"{s.tokens:,}" if s.tokens else "-", duration(s.est_seconds))
    con.print(steps)
    if plan.offers and not plan.local:
        offers = Table("where", "instance", "accel.", "spot", "$/h", "hours", "total", "if on-demand",
                       title=f"Offers, cheapest total first ({len(plan.offers)} in all)", box=None, pad_edge=False)
        for o in plan.offers[:8]:
            mark = "[bold green]→ [/bold green]" if o == plan.chosen else ""
            offers.add_row(f"{mark}{o.cloud}/{o.region or '-'}", o.instance_type or "-", o.accelerators or "CPU",
                           "yes" if o.spot else "no", money(o.hourly_usd), f"{o.est_hours:.2f}", money(o.est_usd),
                           money(o.ondemand_usd) if o.ondemand_usd else "-")
        con.print(offers)
    c = plan.chosen
    if c is not None:
        cal = f", calibrated from {plan.calibrated_runs} runs" if plan.calibrated_runs else ""
        con.print(f"Cost to complete: [bold]{money(c.est_usd)}[/bold] ({c.est_hours:.2f} h at {money(c.hourly_usd)}/h"
                  f" x {plan.nodes} node(s){cal})")
    b = plan.budget
    cap = ", ".join(x for x in (money(b.max_usd) if b.max_usd is not None else "",
                                f"{b.max_hours:g} h" if b.max_hours else "") if x) or "none"
    verdict = "[green]fits[/green]" if b.fits else f"[red]over by {money(b.over_by_usd)}[/red]"
    con.print(f"Budget: {cap} — {verdict}")
    for n in plan.notes:
        con.print(f"[dim]note: {n}[/dim]")


def print_jobs(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    con = _console()
    if not rows:
        con.print("no jobs yet; start one with `optjob apply SPEC`")
        return
    table = Table("name", "status", "step", "progress", "elapsed", "spent", "burn", "attempts",
                  box=None, pad_edge=False)
    for r in rows:
        status = r["status"] + (f" ({r['reason']})" if r["reason"] and r["reason"] != r["status"] else "")
        step = f"{r['step_index']}:{r['step_kind']}" if r["step_kind"] else "-"
        p = r["progress"] or {}
        prog = "-"
        if p.get("event") == "progress":
            prog = f"{p.get('step')}/{p.get('max_steps')} loss {p.get('loss', 0):.3f}"
        elif p.get("event") == "metrics":
            m = p.get("metrics") or {}
            prog = ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))[:40]
        burn = f"{money(r['burn_usd_per_h'])}/h" if r["burn_usd_per_h"] else "-"
        table.add_row(r["name"], status, step, prog, duration(r["elapsed_s"]), money(r["spent_usd"]), burn,
                      str(r["attempts"]))
    con.print(table)
    for r in rows:
        if r["message"] and r["status"] in ("failed", "stopped"):
            con.print(f"[dim]{r['name']}: {r['message']}[/dim]")

