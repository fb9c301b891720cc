"""``optjob pull NAME`` (a job's artifacts from its storage into its folder), and the results
fetch that ``apply`` does after a cloud run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from optjob.specs.errors import OptjobError, ProviderError, UsageError

from ..store import Store, open_store
from .common import find_job


def _storage(url: str, spec_path: str | None) -> Any:
    from optjob.steps.storage import open_storage

    if not url.startswith("s3://") and not Path(url).expanduser().is_absolute() and spec_path:
        url = str(Path(spec_path).parent / url)  # a folder relative to the spec, as everything else is
    try:
        return open_storage(url)
    except ImportError as exc:
        raise ProviderError(f"reading {url} needs boto3 ({exc}); install it with: pip install 'optjob[cloud]'",
                            ) from None


def fetch_results(store: Store, name: str) -> bool:
    """After a cloud run: bring ``results.json`` (small) home for the report. Best effort."""
    job = store.job(name)
    url = (json.loads(job.spec_json).get("storage") or {}).get("artifacts") if job else None
    if job is None or not url:
        return False
    from optjob.steps.layout import RESULTS_FILE, write_json_atomic

    try:
        data = _storage(url, job.spec_path).get_bytes(RESULTS_FILE)
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
    url = (json.loads(job.spec_json).get("storage") or {}).get("artifacts")
    if not url:
        raise UsageError(f"{name} has no storage.artifacts: its artifacts are in {job.job_dir} already")
    got = Sync(_storage(url, job.spec_path), Path(job.job_dir)).pull(overwrite_results=True)
    parts = [f"finished steps: {', '.join(got['steps']) or 'none new'}"]
    if got["checkpoints"]:
        parts.append(f"checkpoint {', '.join(got['checkpoints'])}")
    parts.append("results.json" if got["results"] else "no results.json yet")
    click.echo(f"{name}: pulled from {url} into {job.job_dir} ({'; '.join(parts)})")
