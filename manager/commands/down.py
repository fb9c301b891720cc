"""``optjob down NAME``: stop a job and release its resources (idempotent)."""

from __future__ import annotations

import click

from ..job_states import JobStatus, Reason
from ..reconcile import final_status, finalize, release
from ..store import open_store
from . import common
from .common import find_job


def down_command(name: str) -> None:
    from optjob.providers.base import Handle

    store = open_store()
    job = find_job(store, name)
    provider = common.provider_for(job.provider)
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
