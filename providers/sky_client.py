"""The narrow interface the SkyPilot provider talks through, and its real implementation.

``SkyClient`` speaks plain data (task config dicts in, ``ClusterInfo`` /
``ManagedJob`` / strings out) so the provider's logic is tested against a fake
(tests/providers/fake_sky.py) — the cloud itself cannot be reached in tests.
``RealSkyClient`` maps each method onto SkyPilot 0.14's client SDK (every call
returns a request id, resolved with ``sky.get`` / ``sky.stream_and_get``) and
turns every SkyPilot exception into a ``ProviderError`` with one actionable
line (``translate_error``). ``sky`` is imported only inside methods.
"""

from __future__ import annotations

import abc
import io
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar, cast

from optjob.specs.errors import ProviderError

from .sky_task import build_task, job_output

T = TypeVar("T")

#: ManagedJobStatus values after which the job's cluster has been cleaned up.
MANAGED_TERMINAL = frozenset({"SUCCEEDED", "CANCELLED", "FAILED", "FAILED_SETUP", "FAILED_PRECHECKS",
                              "FAILED_NO_RESOURCE", "FAILED_CONTROLLER"})


class TransientSkyError(ProviderError):
    """A failure that a retry may cure (API server busy or restarting, network blip)."""


@dataclass(frozen=True)
class ClusterInfo:
    name: str
    status: str  # sky.ClusterStatus value: INIT, UP, STOPPED, AUTOSTOPPING
    nodes: int = 1
    spot: bool = False


@dataclass(frozen=True)
class ManagedJob:
    job_id: int
    name: str
    status: str  # sky.jobs.ManagedJobStatus value
    recovery_count: int = 0
    last_recovered_at: float | None = None
    failure_reason: str = ""
    nodes: int = 0
    spot: bool | None = None

    @property
    def terminal(self) -> bool:
        return self.status in MANAGED_TERMINAL


class SkyClient(abc.ABC):
    """What the provider needs from SkyPilot. Errors: ``ProviderError`` (permanent)
    or ``TransientSkyError`` (retry may help); a missing cluster is ``None``, not an error."""

    @abc.abstractmethod
    def launch(self, task: Mapping[str, Any], cluster: str, *, down: bool, idle_minutes: int,
               log: TextIO | None = None) -> int:
        """Provision (or reuse) ``cluster``, submit the task; returns the cluster job id."""

    @abc.abstractmethod
    def jobs_launch(self, task: Mapping[str, Any], name: str, log: TextIO | None = None) -> int:
        """Submit a managed job; returns its id."""

    @abc.abstractmethod
    def cluster(self, name: str, refresh: bool = False) -> ClusterInfo | None: ...
    @abc.abstractmethod
    def clusters(self) -> list[ClusterInfo]: ...

    @abc.abstractmethod
    def job_status(self, cluster: str, job_id: int) -> str | None:
        """sky.JobStatus value of a cluster job, None if the cluster does not know it."""

    @abc.abstractmethod
    def managed_jobs(self, job_ids: list[int] | None = None) -> list[ManagedJob]: ...

    @abc.abstractmethod
    def logs(self, cluster: str, job_id: int) -> str:
        """What the cluster job printed so far (does not follow). Successive calls must
        extend each other — the provider's byte offsets rely on it — so SkyPilot's own
        status lines, which come and go between calls, are left out (``job_output``)."""

    @abc.abstractmethod
    def managed_logs(self, job_id: int) -> str: ...  # like logs(), for the managed job's current run
    @abc.abstractmethod
    def cancel(self, cluster: str, job_id: int) -> None: ...
    @abc.abstractmethod
    def jobs_cancel(self, job_id: int) -> None: ...

    @abc.abstractmethod
    def down(self, cluster: str) -> None:
        """Tear the cluster down; a cluster that does not exist is fine."""

    def managed_job(self, job_id: int) -> ManagedJob | None:
        return next((j for j in self.managed_jobs([job_id]) if j.job_id == job_id), None)

    def reachable(self) -> bool:
        """Whether SkyPilot answers now without being started (``optjob list`` asks before looking)."""
        return True


def find_orphans(client: SkyClient, known_finished_clusters: Iterable[str],
                 known_active: Iterable[str] | None = None) -> list[str]:
    """Names SkyPilot still holds that optjob thinks are finished (and, given
    ``known_active``, any ``optjob-*`` name optjob does not know at all)."""
    finished, active = set(known_finished_clusters), set(known_active or ())
    live = {c.name for c in client.clusters()}
    live |= {j.name for j in client.managed_jobs() if not j.terminal}
    stray = {n for n in live if n.startswith("optjob-") and n not in active} if known_active is not None else set()
    return sorted((live & finished) | stray)


_TRANSIENT = ("ApiServerConnectionError", "ServerTemporarilyUnavailableError", "RequestInterruptedError",
              "NetworkError", "ClusterStatusFetchingError", "ConcurrentWorkerExhaustedError",
              "ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout")
_HINTS: list[tuple[str, str]] = [
    ("ApiServerConnectionError", "the SkyPilot API server is not reachable: start it with `sky api start` "
                                 "(or check the endpoint with `sky api info`)"),
    ("ApiServerAuthenticationError", "the SkyPilot API server refused us: run `sky api login`"),
    ("APIVersionMismatchError", "SkyPilot client and API server versions differ: run `sky api stop` "
                                "then `sky api start`, or upgrade with pip install -U 'optjob[cloud]'"),
    ("NoCloudAccessError", "no cloud is enabled in SkyPilot: set up credentials, then run `sky check`"),
    ("CloudUserIdentityError", "cloud credentials are missing or expired: refresh them, then run `sky check`"),
    ("InvalidCloudCredentials", "cloud credentials are invalid: fix them, then run `sky check`"),
    ("InvalidCloudConfigs", "the cloud configuration is invalid: fix it, then run `sky check`"),
    ("InvalidSkyPilotConfigError", "~/.sky/config.yaml is invalid: fix it (see `sky check`)"),
    ("ClusterOwnerIdentityMismatchError", "the cluster belongs to another cloud identity: switch "
                                          "credentials or `sky down` it from that identity"),
    ("PermissionDeniedError", "the SkyPilot API server denied this (workspace or role): ask its admin"),
    ("UserRequestRejectedByPolicy", "a SkyPilot admin policy rejected the request"),
    ("ProvisionPrechecksError", "SkyPilot's pre-launch checks failed: run `sky check`"),
    ("ResourcesUnavailableError", "no capacity for these resources: list more accelerators (any-of), "
                                  "widen region/zone, try spot: auto, or retry later"),
    ("NotSupportedError", "SkyPilot does not support this on the chosen cloud"),
    ("ManagedJobReachedMaxRetriesError", "the managed job gave up relaunching: see `sky jobs logs`"),
    ("RequestCancelled", "the SkyPilot request was cancelled (`sky api cancel`?)"),
]
_QUOTA = re.compile(r"quota|limitexceeded|vcpulimit", re.I)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def translate_error(exc: BaseException, action: str) -> ProviderError:
    """One SkyPilot exception -> a ``ProviderError`` whose message says what to do.
    Matched by class name along the MRO, so it needs no ``sky`` import."""
    if isinstance(exc, ProviderError):
        return exc
    names = [c.__name__ for c in type(exc).__mro__]
    text = " ".join(_ANSI.sub("", str(exc)).split())[:400] or type(exc).__name__
    hint = next((h for name, h in _HINTS if name in names), "see `sky api logs`, then `sky check`")
    if "ResourcesUnavailableError" in names and _QUOTA.search(text):
        hint = "a cloud quota is too low: request an increase in the cloud console, or choose " \
               "smaller/other accelerators"
    if "ValueError" in names and "No cloud" in text:
        hint = "no cloud is enabled in SkyPilot: set up credentials, then run `sky check`"
    if "skypilot-catalog" in text:
        hint = "SkyPilot could not download its instance catalog: check the network (or proxy) of the API server"
    cls = TransientSkyError if any(n in names for n in _TRANSIENT) else ProviderError
    return cls(f"SkyPilot could not {action}: {text}", hint=hint)


def _field(rec: Any, name: str, default: Any = None) -> Any:
    if isinstance(rec, Mapping):
        value = rec.get(name, default)
    else:
        value = getattr(rec, name, default)
    return default if value is None else value


def _value(status: Any) -> str:
    return str(getattr(status, "value", status))


def _nodes_spot(resources: str) -> tuple[int, bool | None]:
    m = re.match(r"\s*(\d+)x", resources or "")
    return (int(m.group(1)) if m else 1), ("[Spot]" in resources if resources else None)


class RealSkyClient(SkyClient):
    """SkyPilot 0.14's SDK. Each call goes to the SkyPilot API server (started
    locally on first use if no remote endpoint is configured)."""

    _JOB_FIELDS = ("job_id", "task_id", "job_name", "status", "recovery_count", "last_recovered_at",
                   "failure_reason", "cluster_resources", "resources", "submitted_at")

    def reachable(self) -> bool:
        """A health check of the API server; unlike every other call it never starts a local one."""
        from sky.server import common

        try:
            return bool(common.get_api_server_status().status == common.ApiServerStatus.HEALTHY)
        except Exception:  # any failure means "not now": callers skip the check
            return False

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ProviderError:
            raise
        except Exception as exc:
            raise translate_error(exc, action) from exc

    def launch(self, task: Mapping[str, Any], cluster: str, *, down: bool, idle_minutes: int,
               log: TextIO | None = None) -> int:
        import sky

        def go() -> int:
            rid = sky.launch(build_task(task), cluster_name=cluster, down=down,
                             idle_minutes_to_autostop=idle_minutes)
            job_id, _handle = sky.stream_and_get(rid, output_stream=cast(Any, log))
            if job_id is None:
                raise ProviderError(f"SkyPilot launched {cluster} but submitted no job")
            return int(job_id)

        return self._call(f"launch {cluster}", go)

    def jobs_launch(self, task: Mapping[str, Any], name: str, log: TextIO | None = None) -> int:
        import sky
        from sky import jobs

        def go() -> int:
            job_ids, _handle = sky.stream_and_get(jobs.launch(build_task(task), name=name),
                                                  output_stream=cast(Any, log))
            ids = job_ids if isinstance(job_ids, list) else [job_ids]
            if not ids or ids[0] is None:
                raise ProviderError(f"SkyPilot accepted managed job {name} but returned no id")
            return int(ids[0])

        return self._call(f"launch managed job {name}", go)

    def _status(self, names: list[str] | None, refresh: bool) -> list[ClusterInfo]:
        import sky

        mode = sky.StatusRefreshMode.AUTO if refresh else sky.StatusRefreshMode.NONE
        records = sky.get(sky.status(names, refresh=mode))
        out = []
        for r in records:
            _, spot = _nodes_spot(str(_field(r, "resources_str", "")))
            out.append(ClusterInfo(name=_field(r, "name"), status=_value(_field(r, "status")),
                                   nodes=int(_field(r, "nodes", 1)), spot=bool(spot)))
        return out

    def cluster(self, name: str, refresh: bool = False) -> ClusterInfo | None:
        found = self._call(f"get the status of {name}", lambda: self._status([name], refresh))
        return next((c for c in found if c.name == name), None)

    def clusters(self) -> list[ClusterInfo]:
        return self._call("list clusters", lambda: self._status(None, False))

    def job_status(self, cluster: str, job_id: int) -> str | None:
        import sky

        def go() -> str | None:
            statuses = sky.get(sky.job_status(cluster, [job_id]))
            status = statuses.get(job_id, statuses.get(str(job_id)))  # type: ignore[call-overload]
            return None if status is None else _value(status)

        return self._call(f"get job {job_id} on {cluster}", go)

    def managed_jobs(self, job_ids: list[int] | None = None) -> list[ManagedJob]:
        import sky
        from sky import exceptions, jobs

        def go() -> list[ManagedJob]:
            try:
                result = sky.get(jobs.queue_v2(refresh=False, job_ids=job_ids, fields=list(self._JOB_FIELDS)))
            except exceptions.ClusterNotUpError:  # no jobs controller: no managed job is running
                return []
            records = result[0] if isinstance(result, tuple) else result
            out = []
            for r in records:
                nodes, spot = _nodes_spot(str(_field(r, "cluster_resources", "")))
                out.append(ManagedJob(
                    job_id=int(_field(r, "job_id")), name=str(_field(r, "job_name", "")),
                    status=_value(_field(r, "status", "")),
                    recovery_count=int(_field(r, "recovery_count", 0)),
                    last_recovered_at=_field(r, "last_recovered_at"),
                    failure_reason=str(_field(r, "failure_reason", "")), nodes=nodes, spot=spot))
            return out

        return self._call("list managed jobs", go)

    def logs(self, cluster: str, job_id: int) -> str:
        import sky

        buf = io.StringIO()
        self._call(f"read the log of job {job_id} on {cluster}",
                   lambda: sky.tail_logs(cluster, job_id, follow=False, output_stream=buf))
        return job_output(buf.getvalue())

    def managed_logs(self, job_id: int) -> str:
        from sky import jobs

        buf = io.StringIO()
        self._call(f"read the log of managed job {job_id}",
                   lambda: jobs.tail_logs(job_id=job_id, follow=False, output_stream=buf))
        return job_output(buf.getvalue())

    def cancel(self, cluster: str, job_id: int) -> None:
        import sky

        self._call(f"cancel job {job_id} on {cluster}",
                   lambda: sky.get(sky.cancel(cluster, job_ids=[job_id])))

    def jobs_cancel(self, job_id: int) -> None:
        import sky
        from sky import jobs

        self._call(f"cancel managed job {job_id}", lambda: sky.get(jobs.cancel(job_ids=[job_id])))

    def down(self, cluster: str) -> None:
        import sky
        from sky import exceptions

        def go() -> None:
            try:
                sky.get(sky.down(cluster))
            except exceptions.ClusterDoesNotExist:
                return

        self._call(f"tear down {cluster}", go)
