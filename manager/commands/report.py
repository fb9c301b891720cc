"""``optjob report NAME``: write the job's comparison report (or print its data as JSON)."""

from __future__ import annotations

import json

import click

from ..store import open_store
from .common import find_job


def report_command(name: str, *, as_json: bool) -> None:
    from ..report import report_data, write_report

    store = open_store()
    find_job(store, name)
    if as_json:
        click.echo(json.dumps(report_data(store, name), indent=2, default=str))
        return
    for p in write_report(store, name):
        click.echo(str(p))
