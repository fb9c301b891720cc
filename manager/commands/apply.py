"""``optjob apply SPEC``: plan, confirm, run the controller attached (or detached), report."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import click
from optjob.specs.errors import UsageError

from ..job_states import Reason
from ..store import Store, open_store
from . import common
from .plan import check_feasible, load_for_plan

if TYPE_CHECKING:
    from optjob.specs import JobSpec

    from ..controller import Outcome
    from ..dry_run_report import DryRunReport
    from ..plan import Plan


def apply_command(spec_path: str, *, local: bool, dry_run: bool, yes: bool, detach: bool, as_json: bool,
                  kills: int = 0, preemption_seed: int = 0, sets: Sequence[str] = (), name: str | None = None
                  ) -> None:
    from ..controller import Controller
    from ..planner import make_plan
    from ..render import print_plan

    spec, sources = load_for_plan(spec_path, sets, name)
    cloud_plan = make_plan(spec, spec_path, local=local) if dry_run else None
    if dry_run:
        spec = spec.model_copy(update={"name": f"{spec.name[:32]}-dry-run"})
    plan = replace(make_plan(spec, spec_path, local=local, dry_run=dry_run), sources=sources)
    if kills and not plan.local:
        raise UsageError("--simulate-preemption rehearses on this machine: add --local or --dry-run")
    if kills and detach:
        raise UsageError("--simulate-preemption needs the manager attached: drop --detach")
    store = open_store()
    store.check_name(spec.name, dry_run=dry_run)  # a dry run and a real job never share a name
    if not as_json:
        print_plan(plan)
    check_feasible(plan)
    if not yes and not dry_run:
        if not sys.stdin.isatty():
            raise UsageError("apply needs confirmation: pass --yes when not running in a terminal")
        click.confirm("Apply this plan?", default=True, abort=True)
    from ..live import LiveReporter

    provider = common.provider_for(plan.provider)
    reporter = None if as_json else LiveReporter(plan)
    from ..rehearsal import Rehearsal

    rehearsal = Rehearsal(kills, preemption_seed) if kills else None
    controller = Controller(store, provider, reporter=reporter, rehearsal=rehearsal)
    try:
        outcome = controller.apply(plan, spec, detach=detach)
    finally:
        if reporter is not None:
            reporter.close()
    if outcome.status.is_terminal() and plan.provider == "skypilot" and spec.storage.is_remote:
        from .pull import fetch_results

        fetch_results(store, outcome.name)  # the node's results.json, for the report
    if outcome.status.is_terminal():
        _write_report(store, outcome.name, quiet=as_json)
        common.notify_ended(store, outcome.name)
    checked = None
    if dry_run and outcome.reason == Reason.SUCCEEDED:
        checked = dry_run_report(store, outcome.name, spec, spec_path, cloud_plan, kills,
                                 len(rehearsal.done) if rehearsal else 0)
    if as_json:
        click.echo(json.dumps({"name": outcome.name, "status": outcome.status.value,
                               "reason": outcome.reason.value if outcome.reason else None,
                               "spent_usd": round(outcome.spent_usd, 6), "attempts": outcome.attempts,
                               "job_dir": str(outcome.job_dir), "message": outcome.message,
                               "up_to_date": outcome.up_to_date,
                               **({"rehearsal": {"kills_asked": kills, "kills": len(rehearsal.done),
                                                 "lost_steps": [k.lost_steps for k in rehearsal.done],
                                                 "shortfall": rehearsal.shortfall()}} if rehearsal else {}),
                               **({"dry_run": checked.to_json()} if checked else {})}))
    else:
        click.echo(final_line(outcome))
        if rehearsal is not None:
            lost = [k.lost_steps for k in rehearsal.done]
            click.echo(f"rehearsal: {len(rehearsal.done)} kill(s) survived; work lost per kill (steps): {lost}")
        if checked is not None:
            for line in checked.lines():
                click.echo(line)
            verdict = checked.verdict()
            if cloud_plan is not None and cloud_plan.chosen is not None:
                c = cloud_plan.chosen
                verdict += (f"; on {c.cloud} {c.accelerators or 'CPU'}{' spot' if c.spot else ''} "
                            f"the full spec is projected at {c.est_hours:.2f} h, ${c.est_usd:.2f}")
            click.echo(verdict)
    if rehearsal is not None and (short := rehearsal.shortfall()):
        click.echo(click.style("warning: ", fg="yellow", bold=True) + f"rehearsal: {short}", err=True)
    outcome.raise_for_status()


def final_line(outcome: Outcome) -> str:
    """``NAME: succeeded, spent $0.0123 over 1 attempt(s); JOB_DIR``: the reason only where it adds
    to the status (``stopped (budget)``, never ``succeeded (succeeded)``)."""
    from ..render import job_status_text

    if outcome.up_to_date:
        return f"nothing to do ({outcome.name} is up to date; {outcome.job_dir})"
    status = job_status_text(outcome.status.value, outcome.reason.value if outcome.reason else None)
    return (f"{outcome.name}: {status}, spent ${outcome.spent_usd:.4f} over {outcome.attempts} attempt(s); "
            f"{outcome.job_dir}")


def dry_run_report(store: Store, name: str, spec: JobSpec, spec_path: str, cloud_plan: Plan | None, kills: int,
                   kills_done: int) -> DryRunReport:
    """What the dry run ``name`` (of ``spec``) verified and what it could not (its latest run's events)."""
    from ..dry_run_report import build

    job = store.job(name)
    numbers = {a.number for a in store.attempts(name) if job is None or a.run == job.run}
    events: list[dict[str, Any]] = []
    earlier: list[dict[str, Any]] = []
    for n, e in store.attempt_events(name):
        (events if n in numbers else earlier).append(e)
    # The dry run renamed the job (NAME-dry-run); what it checks is the spec as written.
    return build(spec, spec_path, cloud_plan, events, kills=kills, kills_done=kills_done, earlier=earlier)


def _write_report(store: Store, name: str, *, quiet: bool) -> None:
    from ..report import write_report

    paths_written = write_report(store, name)
    if not quiet and paths_written:
        click.echo(f"report: {paths_written[0]}")
