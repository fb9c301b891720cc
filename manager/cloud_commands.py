"""The cloud side of the CLI: orphans (``optjob list`` flags them, ``optjob down --orphans``
removes them) and ``optjob pull NAME`` (a job's artifacts from its storage into its folder).

An *orphan* is a cluster or managed job SkyPilot still holds under the name of a job that
optjob considers finished with its resources released — a teardown that silently failed, or
a manager killed while SkyPilot was still provisioning. A finished job whose resources were
kept on purpose (``teardown: never`` / ``on_success``) is not one: ``optjob down NAME``
releases those. Clusters named ``optjob-*`` that this state store does not know are left
alone too (another machine's optjob may be running them).

SkyPilot and boto3 are imported inside the functions that need them; ``optjob list`` asks
SkyPilot nothing unless some job ran on it, the extra is installed and its API server is
already up, and gives up after ``ORPHAN_CHECK_S``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from optjob.specs.errors import OptjobError, ProviderError, UsageError

from .store import Store

if TYPE_CHECKING:
    from optjob.providers.sky_client import SkyClient
    from optjob.providers.skypilot import SkyPilotProvider

#: Seconds `optjob list` waits for SkyPilot before it carries on without the orphan check.
ORPHAN_CHECK_S = 5.0


def finished_clusters(store: Store) -> list[str]:
    """Names of SkyPilot resources (``optjob-NAME`` and every attempt's cluster) of jobs that
    are finished with nothing kept: what SkyPilot should no longer have."""
    names: set[str] = set()
    for job in store.jobs():
        if job.provider != "skypilot" or not job.status.is_terminal():
            continue
        attempts = store.attempts(job.name, run=job.run)
        if any(a.handle and not a.released for a in attempts):
            continue  # kept per the teardown policy: known, not an orphan
        names.add(f"optjob-{job.name}")
        names.update(str(a.handle["cluster"]) for a in attempts if a.handle and a.handle.get("cluster"))
    return sorted(names)


def orphans(client: SkyClient, finished: list[str]) -> list[str]:
    from optjob.providers.sky_client import find_orphans

    return find_orphans(client, finished)


def local_api_server_down() -> bool:
    """True when SkyPilot would talk to a local API server and nothing listens on its port —
    found without importing ``sky`` (seconds). False whenever an endpoint may be configured."""
    if any(os.environ.get(f"SKYPILOT_{v}") for v in ("API_SERVER_ENDPOINT", "CONFIG", "GLOBAL_CONFIG",
                                                     "PROJECT_CONFIG")):
        return False
    for config in (Path("~/.sky/config.yaml").expanduser(), Path(".sky.yaml")):
        try:
            if "api_server" in config.read_text():
                return False
        except OSError:
            pass
    try:
        port = int(os.environ.get("SKYPILOT_API_SERVER_LOCAL_PORT") or 46580)
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ValueError:
        return False
    except OSError:
        return True
    return False


def orphan_warning(store: Store, *, client: SkyClient | None = None,
                   timeout_s: float = ORPHAN_CHECK_S) -> str | None:
    """What ``optjob list`` prints about orphans, or None — also whenever the check cannot be
    made quickly (no SkyPilot job, no cloud extra, API server down or slow)."""
    if store.db.execute("SELECT 1 FROM jobs WHERE provider = 'skypilot' LIMIT 1").fetchone() is None:
        return None
    if client is None and (importlib.util.find_spec("sky") is None or local_api_server_down()):
        return None
    finished = finished_clusters(store)  # read here: the store's connection stays in this thread
    found: dict[str, Any] = {}

    def check() -> None:
        try:
            sky = client
            if sky is None:
                from optjob.providers.sky_client import RealSkyClient

                sky = RealSkyClient()
            if sky.reachable():  # never starts an API server
                found["names"] = orphans(sky, finished)
        except Exception as exc:  # the check is advisory: `list` must work regardless
            found["error"] = exc

    worker = threading.Thread(target=check, name="optjob-orphan-check", daemon=True)
    worker.start()
    worker.join(timeout_s)
    names = found.get("names")
    if not names:
        return None
    return (f"SkyPilot still has {', '.join(names)}, which optjob considers finished and torn down "
            "(it may still cost money): remove with `optjob down --orphans`")


def warn_orphans(store: Store) -> None:
    message = orphan_warning(store)
    if message:
        click.echo(click.style("warning: ", fg="yellow", bold=True) + message, err=True)


def down_orphans(store: Store, provider: SkyPilotProvider) -> list[str]:
    """Tear every orphan down (cancel a managed job, down a cluster), confirmed; returns the names."""
    from optjob.providers.base import Handle

    client = provider.client
    names = orphans(client, finished_clusters(store))
    for name in names:
        for job in client.managed_jobs():
            if job.name == name and not job.terminal:
                provider.teardown(Handle(provider="skypilot", cluster=name, attempt=0,
                                         data={"mode": "managed", "job_id": job.job_id}))
        if client.cluster(name) is not None:
            provider.teardown(Handle(provider="skypilot", cluster=name, attempt=0))
    return names


def down_orphans_command() -> None:
    from optjob.providers import get_provider

    from .commands import open_store

    provider = get_provider("skypilot")
    names = down_orphans(open_store(), provider)  # type: ignore[arg-type]
    click.echo(f"removed {', '.join(names)}" if names else "no orphans: SkyPilot holds nothing optjob finished")


def _storage(url: str, spec_path: str | None) -> Any:
    from optjob.providers.storage import open_storage

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

    from .commands import open_store

    store = open_store()
    job = store.job(name)
    if job is None:
        raise UsageError(f"no job named {name!r}; see `optjob list`")
    url = (json.loads(job.spec_json).get("storage") or {}).get("artifacts")
    if not url:
        raise UsageError(f"{name} has no storage.artifacts: its artifacts are in {job.job_dir} already")
    got = Sync(_storage(url, job.spec_path), Path(job.job_dir)).pull(overwrite_results=True)
    parts = [f"finished steps: {', '.join(got['steps']) or 'none new'}"]
    if got["checkpoints"]:
        parts.append(f"checkpoint {', '.join(got['checkpoints'])}")
    parts.append("results.json" if got["results"] else "no results.json yet")
    click.echo(f"{name}: pulled from {url} into {job.job_dir} ({'; '.join(parts)})")
