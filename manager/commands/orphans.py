"""Orphans: ``optjob list`` flags them, ``optjob down --orphans`` removes them.

An *orphan* is a cluster or managed job SkyPilot still holds under the name of a job that
optjob considers finished with its resources released — a teardown that silently failed, or
a manager killed while SkyPilot was still provisioning — recognised by the ids this OPTJOB_HOME
recorded (a managed job's id, a cluster's ``launched_at``), not by name alone. A finished job
whose resources were kept on purpose (``teardown: never`` / ``on_success``) is not one:
``optjob down NAME`` releases those. Clusters and jobs named ``optjob-*`` that this state store
did not launch are left alone too (another OPTJOB_HOME or machine may be running them).

SkyPilot and boto3 are imported inside the functions that need them; ``optjob list`` asks
SkyPilot nothing unless some job ran on it, the extra is installed and its API server is
already up, and gives up after ``ORPHAN_CHECK_S``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..store import Store, open_store

if TYPE_CHECKING:
    from optjob.providers.sky_client import Owned, SkyClient
    from optjob.providers.skypilot import SkyPilotProvider

#: Seconds `optjob list` waits for SkyPilot before it carries on without the orphan check.
ORPHAN_CHECK_S = 5.0


def owned_resources(store: Store) -> Owned:
    """What this OPTJOB_HOME launched on SkyPilot for jobs that are finished with nothing kept —
    what SkyPilot should no longer have — by identity, not by name: managed job ids and cluster
    incarnations (``launched_at``) recorded in every attempt's handle, or in the launch request
    recorded before the handle (a manager stopped inside launch). Another OPTJOB_HOME on the same
    API server has jobs of the same names, never the same ids. A cluster whose incarnation was not
    recorded (state from an older optjob, a launch cut short) is matched by its name."""
    from optjob.providers.sky_client import Owned
    from optjob.providers.skypilot import read_request

    ids: set[int] = set()
    clusters: dict[str, set[float | None]] = {}
    for job in store.jobs():
        if job.provider != "skypilot" or not job.status.is_terminal():
            continue
        if any(a.handle and not a.released for a in store.attempts(job.name, run=job.run)):
            continue  # kept per the teardown policy: known, not an orphan
        for attempt in store.attempts(job.name):
            record = {} if attempt.handle else read_request(Path(job.job_dir), attempt.number)
            handle = attempt.handle or record.get("handle")
            if not isinstance(handle, dict):
                continue
            data = dict(handle.get("data") or {})
            job_id = data.get("job_id", record.get("job_id"))
            if data.get("mode") == "managed":
                if job_id is not None:
                    ids.add(int(job_id))
            elif handle.get("cluster"):
                clusters.setdefault(str(handle["cluster"]), set()).add(data.get("launched_at"))
    return Owned(frozenset(ids), {name: frozenset(marks) for name, marks in clusters.items()})


def orphans(client: SkyClient, owned: Owned) -> list[str]:
    """What SkyPilot still holds of ``owned``, one name each (a managed job with its id)."""
    from optjob.providers.sky_client import find_owned_orphans

    jobs, clusters = find_owned_orphans(client, owned)
    return sorted([f"{j.name} (managed job {j.job_id})" for j in jobs] + [c.name for c in clusters])


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
    if not store.has_jobs_on("skypilot"):
        return None
    if client is None and (importlib.util.find_spec("sky") is None or local_api_server_down()):
        return None
    owned = owned_resources(store)  # read here: the store's connection stays in this thread
    found: dict[str, Any] = {}

    def check() -> None:
        try:
            sky = client
            if sky is None:
                from optjob.providers.sky_client import RealSkyClient

                sky = RealSkyClient()
            if sky.reachable():  # never starts an API server
                found["names"] = orphans(sky, owned)
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
    """Tear every orphan down (cancel a managed job by its id, down a cluster whose incarnation this
    OPTJOB_HOME launched), confirmed; returns their names. Nothing of another OPTJOB_HOME is touched."""
    from optjob.providers.base import Handle
    from optjob.providers.sky_client import find_owned_orphans

    jobs, clusters = find_owned_orphans(provider.client, owned_resources(store))
    for job in jobs:
        provider.teardown(Handle(provider="skypilot", cluster=job.name, attempt=0,
                                 data={"mode": "managed", "job_id": job.job_id}))
    for cluster in clusters:
        provider.teardown(Handle(provider="skypilot", cluster=cluster.name, attempt=0))
    return sorted([f"{j.name} (managed job {j.job_id})" for j in jobs] + [c.name for c in clusters])


def down_orphans_command() -> None:
    from optjob.providers import get_provider

    provider = get_provider("skypilot")
    names = down_orphans(open_store(), provider)  # type: ignore[arg-type]
    click.echo(f"removed {', '.join(names)}" if names else "no orphans: SkyPilot holds nothing optjob finished")
