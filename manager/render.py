"""Human-readable output: the plan and the job tables (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .units import duration, money

if TYPE_CHECKING:
    from .plan import Plan


#: Offers the plan's table shows (the JSON has them all).
OFFERS_SHOWN = 8


def _console(width: int | None = None) -> Any:
    from rich.console import Console

    return Console(highlight=False, width=width)


def print_plan(plan: Plan) -> None:
    from rich.table import Column, Table

    con = _console()
    where = "this machine" if plan.local else f"{plan.provider} ({plan.resources.cloud})"
    con.print(f"[bold]Plan for {plan.name}[/bold]{' (dry run: tiny proxy, every step capped)' if plan.dry_run else ''}"
              f" — runs on {where}, teardown: {plan.teardown}")
    for line in plan.sources:  # a file path is never broken by a wrap
        con.print(line, soft_wrap=True)
    for w in plan.warnings:
        con.print(f"[yellow]warning:[/yellow] {w}")
    steps = Table("#", "step", "what", "tokens", "est. time", box=None, pad_edge=False)
    for s in plan.steps:
        kind = s.kind if s.variant is None else f"{s.variant}[{s.variant_step}] {s.kind}"
        steps.add_row(str(s.index), kind, s.summary, f"{s.tokens:,}" if s.tokens else "-", duration(s.est_seconds))
    con.print(steps)
    if plan.variants:
        con.print(f"Compare: {len(plan.variants)} variants, each from the model before it, priced one by one")
        variants = Table("variant", "steps", "est. time", "est. cost", box=None, pad_edge=False)
        for v in plan.variants:
            variants.add_row(v.name, str(v.steps), duration(v.est_seconds),
                             money(v.est_usd) if v.est_usd is not None else "-")
        con.print(variants)
    if plan.offers and not plan.local:
        shown = plan.offers[:OFFERS_SHOWN]
        more = (f"{len(shown)} of {len(plan.offers)} shown; `optjob plan --json` lists all"
                if len(plan.offers) > len(shown) else f"{len(plan.offers)} in all")
        offers = Table(Column("where", no_wrap=True), Column("instance", no_wrap=True), "accel.", "spot", "$/h",
                       "hours", "total", "if on-demand", title=f"Offers, cheapest total first ({more})", box=None,
                       pad_edge=False)
        for o in shown:
            mark = "[bold green]→ [/bold green]" if o == plan.chosen else ""
            offers.add_row(f"{mark}{o.cloud}/{o.region or '-'}", o.instance_type or "-", o.accelerators or "CPU",
                           "yes" if o.spot else "no", money(o.hourly_usd), f"{o.est_hours:.2f}", money(o.est_usd),
                           money(o.ondemand_usd) if o.ondemand_usd else "-")
        con.print(offers)
    c = plan.chosen
    if c is not None:
        runs = plan.calibrated_runs
        cal = f", calibrated from {runs} run{'s' if runs != 1 else ''}" if runs else ""
        con.print(f"Cost to complete: [bold]{money(c.est_usd)}[/bold] ({c.est_hours:.2f} h at {money(c.hourly_usd)}/h"
                  f" x {plan.nodes} node(s){cal})")
        if c.memory_gb is not None and c.gpu_memory_gb is not None:
            con.print(f"GPU memory: {c.memory_gb:.1f} GiB per GPU at the largest step, of {c.gpu_memory_gb:g} GiB")
    b = plan.budget
    cap = ", ".join(x for x in (money(b.max_usd) if b.max_usd is not None else "",
                                f"{b.max_hours:g} h" if b.max_hours else "") if x) or "none"
    if b.fits:
        verdict = "[green]fits[/green]"
    elif b.over_by_usd > 0:
        verdict = f"[red]over by {money(b.over_by_usd)}[/red]"
    else:  # time, not money, is the problem
        verdict = f"[red]does not fit: {b.reason or 'over budget.max_hours'}[/red]"
    con.print(f"Budget: {cap} — {verdict}")
    for n in plan.notes:
        con.print(f"[dim]note: {n}[/dim]")


def job_status_text(status: str, reason: str | None) -> str:
    """``stopped (budget)``; a reason that only repeats the status is left out."""
    return status + (f" ({reason})" if reason and reason != status else "")


def progress_text(r: dict[str, Any]) -> str:
    """What a job is doing (its current phase, with the position and loss of a training step), or its
    headline result."""
    p = r["progress"] or {}
    if r.get("phase_text"):
        loss = p.get("loss") if p.get("event") == "progress" and (r.get("phase") or {}).get("phase") == "step" else None
        return r["phase_text"] + (f" loss {loss:.3f}" if isinstance(loss, (int, float)) else "")
    if p.get("event") == "progress":
        loss = p.get("loss")
        return f"{p.get('step')}/{p.get('max_steps')}" + (f" loss {loss:.3f}" if isinstance(loss, (int, float)) else "")
    if p.get("event") == "metrics":
        m = p.get("metrics") or {}
        for key, label in (("perplexity", "ppl"), ("eval_loss", "loss"), ("accuracy", "acc")):
            if isinstance(m.get(key), (int, float)):
                return f"{label} {m[key]:.4g}"
    return "-"


#: The jobs table's columns, most important first: the ones that do not fit the width are dropped
#: (a column is never cut, and a name never is).
JOB_COLUMNS = ("name", "status", "spent", "progress", "step", "elapsed", "where", "burn", "attempts")


def print_jobs(rows: list[dict[str, Any]], *, width: int | None = None) -> None:
    """The jobs table, designed for 80 columns first: every cell whole, names above all (``logs NAME``
    needs them); the least important columns go when the terminal is narrow, and the burn column
    appears only while something burns."""
    from rich.table import Table

    con = _console(width)
    if not rows:
        con.print("no jobs yet; start one with `optjob apply SPEC`")
        return
    cells = [{"name": r["name"], "status": job_status_text(r["status"], r["reason"]),
              "step": f"{r['step_index']}:{r['step_kind']}" if r["step_kind"] else "-",
              "progress": progress_text(r), "where": r.get("where") or r["provider"],
              "elapsed": duration(r["elapsed_s"]), "spent": money(r["spent_usd"]),
              "burn": f"{money(r['burn_usd_per_h'])}/h" if r["burn_usd_per_h"] else "-",
              "attempts": str(r["attempts"])} for r in rows]
    wanted = [c for c in JOB_COLUMNS if c != "burn" or any(r["burn_usd_per_h"] for r in rows)]
    natural = {c: max(len(c), *(len(row[c]) for row in cells)) for c in wanted}
    room, chosen = con.width, list[str]()
    for c in wanted:
        need = natural[c] + (2 if chosen else 0)
        if need <= room or c == "name":
            chosen.append(c)
            room -= need
    shown = [c for c in JOB_COLUMNS if c in chosen]
    table = Table(*shown, box=None, pad_edge=False)
    for row in cells:
        table.add_row(*(row[c] for c in shown))
    con.print(table)
    for r in rows:
        if r["message"] and r["status"] in ("failed", "stopped"):
            con.print(f"[dim]{r['name']}: {r['message']}[/dim]")


def print_fitted(rows: list[dict[str, str]], columns: tuple[str, ...], *, title: str | None = None,
                 width: int | None = None, keep: int = 1) -> None:
    """A table of ``rows`` whose columns, most important first, go whole or not at all: those that
    do not fit the width are dropped, the first ``keep`` never (a cell is never cut)."""
    from rich.table import Column, Table

    con = _console(width)
    if title:
        con.print(title, soft_wrap=True)
    room, chosen = con.width, list[str]()
    for i, c in enumerate(columns):
        need = max(len(c), *(len(r.get(c, "")) for r in rows)) + (2 if chosen else 0)
        if need <= room or i < keep:
            chosen.append(c)
            room -= need
    table = Table(*(Column(c, no_wrap=True) for c in chosen), box=None, pad_edge=False)
    for r in rows:
        table.add_row(*(r.get(c, "") for c in chosen))
    con.print(table)
