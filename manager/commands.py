"""What each CLI command does, behind ``cli.py``'s thin click layer."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

import click
from optjob.specs.errors import PlanInfeasible, UsageError

from . import paths
from .status import Reason
from .store import JobRow, Store

if TYPE_CHECKING:
    from .plan import Plan

#: Rows `optjob list` prints (the most recently updated, plus every unfinished job); --json lists all.
#: Rendering is ~1 ms a row, so 10,000 jobs would take seconds.
LIST_LIMIT = 50


def open_store() -> Store:
    return Store(paths.db_path())


def provider_for(name: str) -> Any:
    from optjob.providers import get_provider

    return get_provider(name)


def check_feasible(plan: Plan) -> None:
    if not plan.budget.get("fits", True):
        over = plan.budget.get("over_by_usd") or 0.0
        if over > 0 and plan.chosen is not None:
            raise PlanInfeasible(
                f"{plan.name}: the cheapest way to complete costs ${plan.chosen.est_usd:.2f}, "
                f"${over:.2f} over budget.max_usd ${plan.budget.get('max_usd'):.2f}",
                hint="raise the budget, shrink the steps, or allow cheaper resources",
            )
        raise PlanInfeasible(f"{plan.name}: {plan.budget.get('reason') or 'the plan does not fit the budget'}",
                             hint="raise budget.max_hours, shrink the steps, or allow faster resources")
    if plan.chosen is None:
        raise PlanInfeasible(f"{plan.name}: no offer satisfies resources ({'; '.join(plan.notes) or 'none found'})")


def plan_command(spec_path: str, *, local: bool, as_json: bool) -> None:
    # The spec models (pydantic) load here, not at import: status/list/logs never need them.
    from optjob.specs import load_spec

    from .plan import make_plan
    from .render import print_plan

    spec = load_spec(spec_path)
    plan = make_plan(spec, spec_path, local=local)
    if as_json:
        click.echo(plan.dumps())
    else:
        print_plan(plan)
    check_feasible(plan)


def apply_command(spec_path: str, *, local: bool, dry_run: bool, yes: bool, detach: bool, as_json: bool,
                  kills: int = 0, preemption_seed: int = 0) -> None:
    from optjob.specs import load_spec

    from .apply import Controller
    from .plan import make_plan
    from .render import print_plan

    spec = load_spec(spec_path)
    cloud_plan = make_plan(spec, spec_path, local=local) if dry_run else None
    if dry_run:
        spec = spec.model_copy(update={"name": f"{spec.name[:32]}-dry-run"})
    plan = make_plan(spec, spec_path, local=local, dry_run=dry_run)
    if kills and not plan.local:
        raise UsageError("--simulate-preemption rehearses on this machine: add --local or --dry-run")
    if kills and detach:
        raise UsageError("--simulate-preemption needs the manager attached: drop --detach")
    if not as_json:
        print_plan(plan)
    check_feasible(plan)
    if not yes and not dry_run:
        if not sys.stdin.isatty():
            raise UsageError("apply needs confirmation: pass --yes when not running in a terminal")
        click.confirm("Apply this plan?", default=True, abort=True)
    from .live import LiveReporter

    store = open_store()
    provider = provider_for(plan.provider)
    reporter = None if as_json else LiveReporter(plan)
    from .rehearsal import Rehearsal

    rehearsal = Rehearsal(kills, preemption_seed) if kills else None
    controller = Controller(store, provider, reporter=reporter, rehearsal=rehearsal)
    try:
        outcome = controller.apply(plan, spec, detach=detach)
    finally:
        if reporter is not None:
            reporter.close()
    if outcome.status.is_terminal() and plan.provider == "skypilot" and spec.storage.is_remote:
        from .cloud_commands import fetch_results

        fetch_results(store, outcome.name)  # the node's results.json, for the report
    if outcome.status.is_terminal():
        _write_report(store, outcome.name, quiet=as_json)
    if as_json:
        click.echo(json.dumps({"name": outcome.name, "status": outcome.status.value,
                               "reason": outcome.reason.value if outcome.reason else None,
                               "spent_usd": round(outcome.spent_usd, 6), "attempts": outcome.attempts,
                               "job_dir": str(outcome.job_dir), "message": outcome.message}))
    else:
        click.echo(f"{outcome.name}: {outcome.status.value}"
                   + (f" ({outcome.reason.value})" if outcome.reason else "")
                   + f", spent ${outcome.spent_usd:.4f} over {outcome.attempts} attempt(s); {outcome.job_dir}")
        if rehearsal is not None:
            lost = [k.lost_steps for k in rehearsal.done]
            click.echo(f"rehearsal: {len(rehearsal.done)} kill(s) survived; work lost per kill (steps): {lost}")
        if cloud_plan is not None and cloud_plan.chosen is not None and outcome.reason == Reason.SUCCEEDED:
            c = cloud_plan.chosen
            click.echo(f"dry run passed; on {c.cloud} {c.accelerators or 'CPU'}{' spot' if c.spot else ''} "
                       f"the full spec is projected at {c.est_hours:.2f} h, ${c.est_usd:.2f}")
    outcome.raise_for_status()


def _write_report(store: Store, name: str, *, quiet: bool) -> None:
    try:
        from .report import write_report
    except ImportError:  # pragma: no cover - report module lands with the steps issue
        return
    paths_written = write_report(store, name)
    if not quiet and paths_written:
        click.echo(f"report: {paths_written[0]}")


def reconcile_all(store: Store, jobs: list[JobRow]) -> list[JobRow]:
    from optjob.specs.errors import ProviderError

    from .reconcile import owner_alive, reconcile_orphaned

    out = []
    for job in jobs:
        if not job.status.is_terminal() and not owner_alive(job):
            try:
                job = reconcile_orphaned(store, provider_for(job.provider), job)
            except ProviderError as exc:  # e.g. teardown not confirmed: show the job as it stands, not a crash
                store.update_job(job.name, message=f"{exc.message} (retry with `optjob down {job.name}`)"[:2000])
                job = store.job(job.name) or job
        out.append(job)
    return out


def job_summary(store: Store, job: JobRow) -> dict[str, Any]:
    attempts = store.attempts(job.name)
    spent = store.spend(job.name)
    start = job.started_at or job.created_at
    elapsed = (job.ended_at or time.time()) - start
    running = [a for a in attempts if not a.ended_at]
    burn = sum(a.hourly_usd * a.nodes for a in running)
    return {
        "name": job.name, "status": job.status.value, "reason": job.reason.value if job.reason else None,
        "provider": job.provider, "step_index": job.step_index, "step_kind": job.step_kind,
        "progress": job.progress, "elapsed_s": round(elapsed, 1), "spent_usd": round(spent, 6),
        "burn_usd_per_h": burn, "attempts": len(attempts), "run": job.run, "job_dir": job.job_dir,
        "message": job.message, "created_at": job.created_at, "updated_at": job.updated_at,
    }


def status_command(name: str | None, *, as_json: bool) -> None:
    from .render import print_jobs

    store = open_store()
    if name is not None:
        job = store.job(name)
        if job is None:
            raise UsageError(f"no job named {name!r}; see `optjob list`")
        jobs = [job]
    elif as_json:
        jobs = store.jobs()
    else:
        jobs = store.jobs(limit=LIST_LIMIT)
        shown = {j.name for j in jobs}
        jobs += [j for j in store.unfinished_jobs() if j.name not in shown]
    rows = [job_summary(store, j) for j in reconcile_all(store, jobs)]
    if as_json:
        click.echo(json.dumps(rows[0] if name else rows, indent=2))
    else:
        print_jobs(rows)
        hidden = store.job_count() - len(rows) if name is None else 0
        if hidden > 0:
            click.echo(f"... and {hidden:,} older finished job(s) not shown (`optjob list --json` lists all)")


def logs_command(name: str, *, follow: bool) -> None:
    from optjob.providers.base import Handle

    store = open_store()
    job = store.job(name)
    if job is None:
        raise UsageError(f"no job named {name!r}; see `optjob list`")
    provider = provider_for(job.provider)
    offsets: dict[int, int] = {}
    while True:
        for attempt in store.attempts(name):
            if not attempt.handle:
                continue
            text, offsets[attempt.number] = provider.read_log(Handle.from_json(attempt.handle),
                                                              offsets.get(attempt.number, 0))
            if text:
                click.echo(text, nl=False)
        job = store.job(name)
        if not follow or job is None or job.status.is_terminal():
            return
        reconcile_all(store, [job])
        time.sleep(0.5)


def down_command(name: str) -> None:
    from optjob.providers.base import Handle

    from .reconcile import final_status, finalize, release
    from .status import JobStatus, Reason

    store = open_store()
    job = store.job(name)
    if job is None:
        raise UsageError(f"no job named {name!r}; see `optjob list`")
    provider = provider_for(job.provider)
    # How the last attempt ended before `down` touched it: a job that finished but whose teardown
    # failed is recorded as it ended, not as cancelled.
    launched = [a for a in store.attempts(name, run=job.run) if a.handle]
    ended = provider.poll(Handle.from_json(launched[-1].handle or {})) if launched else None
    for attempt in store.attempts(name):
        if attempt.handle and not attempt.released:
            provider.stop(Handle.from_json(attempt.handle))
            release(store, provider, attempt)
    if not job.status.is_terminal():
        if ended is not None and ended.state.is_terminal():
            status, reason = final_status(ended)
            finalize(store, provider, job, status, reason, "resources released by `optjob down`")
        else:
            finalize(store, provider, job, JobStatus.STOPPED, Reason.CANCELLED, "stopped by `optjob down`")
    click.echo(f"{name}: resources released")


def report_command(name: str, *, as_json: bool) -> None:
    from .report import report_data, write_report

    store = open_store()
    if store.job(name) is None:
        raise UsageError(f"no job named {name!r}; see `optjob list`")
    if as_json:
        click.echo(json.dumps(report_data(store, name), indent=2, default=str))
        return
    for p in write_report(store, name):
        click.echo(str(p))


