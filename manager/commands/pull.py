"""``optjob pull NAME`` (a job's artifacts from its storage into its folder), and the results
fetch that ``apply`` does after a cloud run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from optjob.specs.errors import OptjobError, UsageError

from ..store import Store, open_store
from .common import find_job


def _storage(url: str, spec_path: str | None, endpoint_url: str | None = None) -> Any:
    from optjob.steps.storage import open_storage, scheme_of

    if scheme_of(url) is None and not Path(url).expanduser().is_absolute() and spec_path:
        url = str(Path(spec_path).parent / url)  # a folder relative to the spec, as everything else is
    return open_storage(url, endpoint_url=endpoint_url)  # a missing SDK is a StorageError naming the package


def _stored(job: Any) -> tuple[str | None, str | None]:
    """The job's ``storage.artifacts`` and ``storage.endpoint_url`` as its stored spec says."""
    storage = json.loads(job.spec_json).get("storage") or {}
    return storage.get("artifacts"), storage.get("endpoint_url")


def fetch_results(store: Store, name: str) -> bool:
    """After a cloud run: bring ``results.json`` (small) home for the report. Best effort."""
    job = store.job(name)
    url, endpoint = _stored(job) if job else (None, None)
    if job is None or not url:
        return False
    from optjob.steps.layout import RESULTS_FILE, write_json_atomic

    try:
        data = _storage(url, job.spec_path, endpoint).get_bytes(RESULTS_FILE)
        if data is None:
            return False
        write_json_atomic(Path(job.job_dir) / RESULTS_FILE, json.loads(data))
    except (OptjobError, ValueError) as exc:
        click.echo(f"note: could not fetch results.json from {url} ({exc}); try `optjob pull {name}`", err=True)
        return False
    return True


def pull_command(name: str) -> None:
    """Copy the job's artifacts (finished steps' models and done.json, the newest checkpoint of
    an unfinished step, results.json) from ``storage.artifacts`` into its job folder."""
    from optjob.steps.sync import Sync

    store = open_store()
    job = find_job(store, name)
    url, endpoint = _stored(job)
    if not url:
        raise UsageError(f"{name} has no storage.artifacts: its artifacts are in {job.job_dir} already")
    got = Sync(_storage(url, job.spec_path, endpoint), Path(job.job_dir)).pull(overwrite_results=True)
    parts = [f"finished steps: {', '.join(got['steps']) or 'none new'}"]
    if got["checkpoints"]:
        parts.append(f"checkpoint {', '.join(got['checkpoints'])}")
    parts.append("results.json" if got["results"] else "no results.json yet")
    click.echo(f"{name}: pulled from {url} into {job.job_dir} ({'; '.join(parts)})")
