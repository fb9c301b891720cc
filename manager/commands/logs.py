"""``optjob logs NAME``: the workload's output, every attempt in order (``--follow`` until it ends)."""

from __future__ import annotations

import click

from ..store import open_store
from . import common
from .common import find_job


def logs_command(name: str, *, follow: bool) -> None:
    from optjob.providers.base import Handle

    store = open_store()
    job = find_job(store, name)
    provider = common.provider_for(job.provider)
    offsets: dict[int, int] = {}
    while True:
        for attempt in store.attempts(name):
            if not attempt.handle:
                continue
            text, offsets[attempt.number] = provider.read_log(Handle.from_json(attempt.handle),
                                                              offsets.get(attempt.number, 0))
            if text:
                click.echo(text, nl=False)
        current = store.job(name)
        if not follow or current is None or current.status.is_terminal():
            return
        common.reconcile_all(store, [current])
        store.clock.sleep(0.5)
