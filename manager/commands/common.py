"""What the command modules share: the provider of a job, the job a name refers to, and the
reconcile every read of a job's status starts with (a job whose manager is gone is brought up to date)."""

from __future__ import annotations

from typing import Any

from optjob.specs.errors import ProviderError, UsageError

from ..reconcile import owner_alive, reconcile_orphaned
from ..store import JobRow, Store


def provider_for(name: str) -> Any:
    from optjob.providers import get_provider

    return get_provider(name)


def find_job(store: Store, name: str) -> JobRow:
    """The job called ``name``, or the one-line usage error every command gives for a wrong name."""
    job = store.job(name)
    if job is None:
        raise UsageError(f"no job named {name!r}; see `optjob list`")
    return job


def reconcile_all(store: Store, jobs: list[JobRow]) -> list[JobRow]:
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



def write_report_quietly(store: Store, name: str) -> list[Any]:
    """Write the job's report; a report that cannot be written never fails the command that asked."""
    from ..report import write_report

    try:
        return write_report(store, name)
    except (OSError, ValueError):
        return []


def notify_ended(store: Store, name: str) -> None:
    """Tell the spec's ``notify`` webhook (and ``tracking`` server) that the job's run ended; a failure
    is one warning line, never an error (the job stands as it is)."""
    import click

    from ..notify import notify_ended as post
    from ..tracking import track_ended

    for warning in (post(store, name), track_ended(store, name)):
        if warning:
            click.echo(click.style("warning: ", fg="yellow", bold=True) + warning, err=True)
