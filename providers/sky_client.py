"""The narrow interface the SkyPilot provider talks through, and its real implementation.

``SkyClient`` speaks plain data (task config dicts in, ``ClusterInfo`` /
``ManagedJob`` / strings out) so the provider's logic is tested against a fake
(tests/providers/fake_sky.py) — the cloud itself cannot be reached in tests.
``RealSkyClient`` maps each method onto SkyPilot 0.14's client SDK (every call
returns a request id, resolved with ``sky.get`` / ``sky.stream_and_get``) and
turns every SkyPilot exception into a ``ProviderError`` with one actionable
line (``translate_error``). ``sky`` is imported only inside methods.

What SkyPilot 0.14.1 really does, and what this interface turns it into (the fake in
tests/providers/fake_sky.py copies the same; tests/providers/test_sky_contract.py checks both):

* ``sky.jobs.queue_v2(refresh=False)`` raises ``ClusterNotUpError`` when the jobs controller is
  stopped (it autostops once no managed job runs), not yet provisioned, or unreachable
  (sky/jobs/server/core.py ``_maybe_restart_controller``, sky/backends/backend_utils.py
  ``is_controller_accessible``): that is "SkyPilot cannot say now", never "no jobs" —
  ``ControllerUnavailable`` (transient; ``stopped`` when the exception's ``cluster_status`` is
  STOPPED). ``refresh=True`` restarts a stopped controller (minutes) and reads its table.
* A cluster SkyPilot no longer has raises ``ClusterDoesNotExist`` (a ``ValueError``) from
  ``job_status``, ``tail_logs`` and ``cancel``: ``ClusterGone``. A cluster that is not UP raises
  ``ClusterNotUpError``: ``ClusterNotUp``.
* Resources strings: a launched cluster is ``2x[spot](gpus=A100:8, ...)`` — lowercase ``[spot]``
  (sky/utils/resources_utils.py ``format_resource``) — while a managed job not launched yet
  falls back to the requested string, ``1x[A100:8][Spot]`` or ``[On-demand|Spot]``
  (sky/backends/backend_utils.py ``get_task_resources_str``).
* A managed job's ``last_recovered_at`` is -1 before it starts, its start time once RUNNING, and
  the time of every completed recovery — also those that do not bump ``recovery_count``
  (controller restarts, sky/jobs/state.py ``set_recovered_async``): it names the run.
* What ran: a ``sky.status`` record (sky/schemas/api/responses.py:99 ``StatusResponse``) carries
  ``handle`` (``launched_resources``: cloud, region, zone, instance_type, use_spot, accelerators;
  ``launched_nodes``), ``resources_str_full`` and ``cloud`` / ``region``; a managed-job record
  (sky/jobs/utils.py:3276-3292 ``_populate_job_record_from_handle``) carries ``cloud``, ``region``,
  ``zone``, ``accelerators`` and ``cluster_resources_full`` (``2x[spot](gpus=A100:8, cpus=96,
  mem=1152, p4d.24xlarge, disk=256)``, sky/utils/resources_utils.py:360-430 ``format_resource``:
  the instance type is the one element without ``=``) while its cluster exists; once the job is
  over the launched string falls back to the requested one (no instance type) and ``cloud`` /
  ``region`` to the last ones cached (sky/jobs/utils.py:3462-3500). ``end_at`` is set when the job
  ends (sky/jobs/state.py:1300-1368, :3932-3952, :4145-4157), None before. ``Launched`` = ``providers.base.Placement``.
* The jobs controller is a cluster ``sky-jobs-controller-<id>`` in ``sky.status`` (controllers are
  listed, sky/core.py ``status``; sky/utils/common.py:13 ``JOB_CONTROLLER_PREFIX``), launched with
  ``CONTROLLER_RESOURCES`` (sky/jobs/constants.py:57: ``cpus: 4+``, ``memory: 4x``, ``disk_size: 50``)
  unless ``jobs.controller.resources`` in the SkyPilot config says otherwise.
* ``sky.jobs.cancel(graceful=True)`` (sky/jobs/client/sdk.py:547-608) only waits for MOUNT_CACHED
  uploads (sky/core.py:789 ``_graceful_job_cancel``) after SIGTERMing the job (sky/skylet/job_lib.py
  ``cancel_jobs``: ``killpg(SIGTERM)``, status CANCELLED at once); it does not wait for the workload's
  own checkpoint upload. So a budget stop first asks the workload through a flag in its storage
  (``sky_task.STOP_FLAG_KEY``), and cancels (gracefully) only when the grace has passed.
* ``sky.launch`` / ``sky.jobs.launch`` return a request id at once; ``sky.stream_and_get`` blocks
  until the request ends and does not cancel it on Ctrl-C (sky/client/sdk.py): the request goes
  on running on the API server until ``sky.api_cancel``. Hence ``submit_*`` + ``wait`` +
  ``cancel_request``: the provider records the id before it waits.
"""

from __future__ import annotations

import abc
import io
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar, cast

from optjob.specs.errors import ProviderError

from .base import Placement, TransientProviderError
from .sky_records import _field, _nodes_spot, _value, instance_type_of, placement_of  # noqa: F401 (re-exported)
from .sky_task import build_task, job_output

T = TypeVar("T")

#: ManagedJobStatus values after which the job's cluster has been cleaned up.
MANAGED_TERMINAL = frozenset({"SUCCEEDED", "CANCELLED", "FAILED", "FAILED_SETUP", "FAILED_PRECHECKS",
                              "FAILED_NO_RESOURCE", "FAILED_CONTROLLER"})


#: ManagedJobStatus values before the job's run starts.
MANAGED_LAUNCHING = frozenset({"PENDING", "SUBMITTED", "STARTING"})
#: sky.server.requests RequestStatus values of a request that has ended.
REQUEST_DONE = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
#: The jobs controller's cluster name starts so (sky/utils/common.py:13).
JOB_CONTROLLER_PREFIX = "sky-jobs-controller-"
#: SkyPilot's default jobs-controller resources (sky/jobs/constants.py:57-61 CONTROLLER_RESOURCES):
#: at least 4 vCPUs, 4 GiB per vCPU, a 50 GB disk, on demand.
CONTROLLER_CPUS, CONTROLLER_MEMORY_RATIO, CONTROLLER_DISK_GB = 4.0, 4.0, 50.0
#: Its autostop (sky/jobs/constants.py:65-68 CONTROLLER_AUTOSTOP): stopped (not down) after 10 idle minutes.
CONTROLLER_IDLE_MINUTES = 10


class TransientSkyError(TransientProviderError):
    """A failure that a retry may cure (API server busy or restarting, network blip)."""


class ControllerUnavailable(TransientSkyError):
    """SkyPilot's jobs controller cannot be asked now (``ClusterNotUpError`` from a jobs call): it is
    stopped (``stopped``: it autostops once no managed job runs), not provisioned (``absent``: never
    launched, torn down, or being launched for the first time), or unreachable. Says nothing about
    any one job's state."""

    def __init__(self, message: str, *, stopped: bool = False, absent: bool = False, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.stopped, self.absent = stopped, absent


class ClusterGone(ProviderError):
    """SkyPilot answered that the cluster does not exist (``ClusterDoesNotExist``)."""


class ClusterNotUp(ProviderError):
    """SkyPilot answered that the cluster exists but is not UP (``ClusterNotUpError``)."""


@dataclass(frozen=True)
class ClusterInfo:
    name: str
    status: str  # sky.ClusterStatus value: INIT, UP, STOPPED, AUTOSTOPPING, PENDING
    nodes: int = 1
    spot: bool = False
    launched_at: float | None = None  # names this incarnation of the cluster (a relaunch changes it)
    launched: Placement | None = None  # what runs (None: not provisioned yet, or not said)


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
    submitted_at: float | None = None
    #: What the current run was launched on (None before it has a cluster, or not said).
    launched: Placement | None = None
    #: When the job ended (SkyPilot's ``end_at``; None while it is not over).
    end_at: float | None = None
    #: When its first run started (SkyPilot's ``start_at``, set with the first ``last_recovered_at``:
    #: sky/jobs/state.py ``set_started_async``, 0.14.1); None before it ran.
    start_at: float | None = None

    @property
    def first_run(self) -> float | None:
        """The mark of the job's first run (``start_at``), or the current run's when SkyPilot does not say."""
        return float(self.start_at) if self.start_at is not None and self.start_at > 0 else self.run_mark

    @property
    def terminal(self) -> bool:
        return self.status in MANAGED_TERMINAL

    @property
    def run_mark(self) -> float | None:
        """Names the job's current run: ``last_recovered_at`` (its start, or its latest recovery,
        counted or not); None before the first run starts (SkyPilot stores -1)."""
        mark = self.last_recovered_at
        return float(mark) if mark is not None and mark > 0 else None


class SkyClient(abc.ABC):
    """What the provider needs from SkyPilot. Errors: ``ProviderError`` (permanent) or
    ``TransientSkyError`` (retry may help; ``ControllerUnavailable`` when the jobs controller
    cannot be asked); a missing cluster is ``None`` from ``cluster``, ``ClusterGone`` from the
    calls that act on one."""

    @abc.abstractmethod
    def submit_launch(self, task: Mapping[str, Any], cluster: str, *, down: bool, idle_minutes: int) -> str:
        """Ask SkyPilot to provision (or reuse) ``cluster`` and run the task; returns the request id
        at once (the request runs on the API server until it ends or is cancelled)."""

    @abc.abstractmethod
    def submit_jobs_launch(self, task: Mapping[str, Any], name: str) -> str:
        """Ask SkyPilot to submit a managed job; returns the request id at once."""

    @abc.abstractmethod
    def wait(self, request_id: str, log: TextIO | None = None) -> int:
        """Block until a launch request ends (streaming its output to ``log``); returns the job id it
        created (the cluster job, or the managed job). Its failure is raised as SkyPilot raised it
        (translated); a cancelled request raises ``ProviderError``. Ctrl-C does *not* cancel it."""

    @abc.abstractmethod
    def request_status(self, request_id: str) -> str | None:
        """PENDING, WAITING, RUNNING, SUCCEEDED, FAILED or CANCELLED; None if the server does not know it."""

    @abc.abstractmethod
    def cancel_request(self, request_id: str) -> None:
        """Abort a request on the API server (``sky.api_cancel``); an ended one is left as it is."""

    def launch(self, task: Mapping[str, Any], cluster: str, *, down: bool, idle_minutes: int,
               log: TextIO | None = None) -> int:
        """``submit_launch`` then ``wait``: the cluster job id."""
        return self.wait(self.submit_launch(task, cluster, down=down, idle_minutes=idle_minutes), log)

    def jobs_launch(self, task: Mapping[str, Any], name: str, log: TextIO | None = None) -> int:
        """``submit_jobs_launch`` then ``wait``: the managed job id."""
        return self.wait(self.submit_jobs_launch(task, name), log)

    @abc.abstractmethod
    def cluster(self, name: str, refresh: bool = False) -> ClusterInfo | None: ...
    @abc.abstractmethod
    def clusters(self) -> list[ClusterInfo]: ...

    @abc.abstractmethod
    def job_status(self, cluster: str, job_id: int) -> str | None:
        """sky.JobStatus value of a cluster job, None if the cluster does not know it. Raises
        ``ClusterGone`` / ``ClusterNotUp`` when the cluster does not exist / is not UP."""

    @abc.abstractmethod
    def managed_jobs(self, job_ids: list[int] | None = None, refresh: bool = False) -> list[ManagedJob]:
        """The managed-job table (``job_ids``: only those). Raises ``ControllerUnavailable`` when the
        jobs controller cannot be asked; ``refresh`` restarts a stopped one first (minutes)."""

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
    def jobs_cancel(self, job_id: int, graceful: bool = False) -> None:
        """``sky.jobs.cancel``; ``graceful``: SkyPilot flushes MOUNT_CACHED uploads before the teardown."""

    @abc.abstractmethod
    def down(self, cluster: str) -> None:
        """Tear the cluster down; a cluster that does not exist is fine."""

    def managed_job(self, job_id: int, refresh: bool = False) -> ManagedJob | None:
        """The managed job, or None when the controller answered and has no such job."""
        return next((j for j in self.managed_jobs([job_id], refresh=refresh) if j.job_id == job_id), None)

    def reachable(self) -> bool:
        """Whether SkyPilot answers now without being started (``optjob list`` asks before looking)."""
        return True

    def jobs_controller(self) -> ClusterInfo | None:
        """The jobs controller's cluster as ``sky.status`` lists it; None when there is none."""
        return next((c for c in self.clusters() if c.name.startswith(JOB_CONTROLLER_PREFIX)), None)


def find_orphans(client: SkyClient, known_finished_clusters: Iterable[str],
                 known_active: Iterable[str] | None = None) -> list[str]:
    """Names SkyPilot still holds that optjob thinks are finished (and, given
    ``known_active``, any ``optjob-*`` name optjob does not know at all)."""
    finished, active = set(known_finished_clusters), set(known_active or ())
    live = {c.name for c in client.clusters()}
    live |= {j.name for j in live_managed_jobs(client)}
    stray = {n for n in live if n.startswith("optjob-") and n not in active} if known_active is not None else set()
    return sorted((live & finished) | stray)


def live_managed_jobs(client: SkyClient) -> list[ManagedJob]:
    """Managed jobs that are not over. A jobs controller that is stopped runs no job (it stops only
    when idle) and one that does not exist has none, so that is an empty list; one that is
    unreachable raises ``ControllerUnavailable``."""
    try:
        return [j for j in client.managed_jobs() if not j.terminal]
    except ControllerUnavailable as exc:
        if exc.stopped or exc.absent:
            return []
        raise


@dataclass(frozen=True)
class Owned:
    """What one OPTJOB_HOME recorded launching: managed job ids, and per cluster name the
    ``launched_at`` of each incarnation it launched (None: launched, incarnation not recorded)."""

    managed_job_ids: frozenset[int] = frozenset()
    clusters: Mapping[str, frozenset[float | None]] = field(default_factory=dict)


def find_owned_orphans(client: SkyClient, owned: Owned) -> tuple[list[ManagedJob], list[ClusterInfo]]:
    """What SkyPilot still holds that ``owned`` says this OPTJOB_HOME launched: live managed jobs by
    id, clusters by name *and* incarnation. A cluster or job of the same name launched by another
    OPTJOB_HOME (a shared API server) has another id / ``launched_at`` and is left alone; a cluster
    whose incarnation was never recorded (a launch interrupted before SkyPilot answered) matches
    only if its name was recorded with ``None``."""
    jobs = [j for j in live_managed_jobs(client) if j.job_id in owned.managed_job_ids]
    clusters = []
    for info in client.clusters():
        marks = owned.clusters.get(info.name)
        if marks is None:
            continue
        if info.launched_at in marks or None in marks:
            clusters.append(info)
    return jobs, clusters


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


class RealSkyClient(SkyClient):
    """SkyPilot 0.14's SDK. Each call goes to the SkyPilot API server (started
    locally on first use if no remote endpoint is configured)."""

    _JOB_FIELDS = ("job_id", "task_id", "job_name", "status", "recovery_count", "last_recovered_at",
                   "failure_reason", "cluster_resources", "cluster_resources_full", "resources", "submitted_at",
                   "end_at", "start_at", "cloud", "region", "zone", "accelerators")

    def reachable(self) -> bool:
        """A health check of the API server; unlike every other call it never starts a local one."""
        from sky.server import common

        try:
            return bool(common.get_api_server_status().status == common.ApiServerStatus.HEALTHY)
        except Exception:  # any failure means "not now": callers skip the check
            return False

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        from sky import exceptions

        try:
            return fn()
        except ProviderError:
            raise
        except exceptions.ClusterDoesNotExist as exc:
            raise ClusterGone(translate_error(exc, action).message) from exc
        except exceptions.ClusterNotUpError as exc:
            raise ClusterNotUp(translate_error(exc, action).message) from exc
        except Exception as exc:
            raise translate_error(exc, action) from exc

    def submit_launch(self, task: Mapping[str, Any], cluster: str, *, down: bool, idle_minutes: int) -> str:
        import sky

        return self._call(f"launch {cluster}", lambda: str(sky.launch(
            build_task(task), cluster_name=cluster, down=down, idle_minutes_to_autostop=idle_minutes)))

    def submit_jobs_launch(self, task: Mapping[str, Any], name: str) -> str:
        from sky import jobs

        return self._call(f"launch managed job {name}", lambda: str(jobs.launch(build_task(task), name=name)))

    def wait(self, request_id: str, log: TextIO | None = None) -> int:
        import sky

        def go() -> int:
            result = sky.stream_and_get(cast(Any, request_id), output_stream=cast(Any, log))
            return _job_id_of(result, request_id)

        return self._call(f"finish launch request {request_id}", go)

    def request_status(self, request_id: str) -> str | None:
        import sky

        def go() -> str | None:
            found = [r for r in sky.api_status([request_id]) if str(r.request_id).startswith(request_id)]
            return _value(found[0].status) if found else None

        return self._call(f"get the status of request {request_id}", go)

    def cancel_request(self, request_id: str) -> None:
        import sky

        self._call(f"cancel request {request_id}", lambda: sky.get(sky.api_cancel(request_id, silent=True)))

    def _status(self, names: list[str] | None, refresh: bool) -> list[ClusterInfo]:
        import sky

        mode = sky.StatusRefreshMode.AUTO if refresh else sky.StatusRefreshMode.NONE
        records = sky.get(sky.status(names, refresh=mode))
        out = []
        for r in records:
            _, spot = _nodes_spot(str(_field(r, "resources_str", "")))
            launched = _field(r, "launched_at")
            out.append(ClusterInfo(name=_field(r, "name"), status=_value(_field(r, "status")),
                                   nodes=int(_field(r, "nodes", 1)), spot=bool(spot),
                                   launched_at=float(launched) if launched is not None else None,
                                   launched=placement_of(r)))
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

    def managed_jobs(self, job_ids: list[int] | None = None, refresh: bool = False) -> list[ManagedJob]:
        import sky
        from sky import exceptions, jobs

        def go() -> list[ManagedJob]:
            try:
                result = sky.get(jobs.queue_v2(refresh=refresh, job_ids=job_ids, fields=list(self._JOB_FIELDS)))
            except exceptions.ClusterNotUpError as exc:  # stopped, not provisioned, or unreachable
                raise controller_unavailable(exc) from exc
            records = result[0] if isinstance(result, tuple) else result
            out = []
            for r in records:
                resources = str(_field(r, "cluster_resources", ""))
                if resources.strip() in ("", "-"):
                    resources = str(_field(r, "resources", ""))
                nodes, spot = _nodes_spot(resources)
                end_at, start_at = _field(r, "end_at"), _field(r, "start_at")
                out.append(ManagedJob(
                    job_id=int(_field(r, "job_id")), name=str(_field(r, "job_name", "")),
                    status=_value(_field(r, "status", "")),
                    recovery_count=int(_field(r, "recovery_count", 0)),
                    last_recovered_at=_field(r, "last_recovered_at"),
                    failure_reason=str(_field(r, "failure_reason", "")), nodes=nodes, spot=spot,
                    submitted_at=_field(r, "submitted_at"), launched=placement_of(r),
                    end_at=float(end_at) if isinstance(end_at, (int, float)) and end_at > 0 else None,
                    start_at=float(start_at) if isinstance(start_at, (int, float)) and start_at > 0 else None))
            return out

        return self._call("list managed jobs", go)

    def logs(self, cluster: str, job_id: int) -> str:
        import sky

        buf = io.StringIO()
        self._call(f"read the log of job {job_id} on {cluster}",
                   lambda: sky.tail_logs(cluster, job_id, follow=False, output_stream=buf))
        return job_output(buf.getvalue())

    def managed_logs(self, job_id: int) -> str:
        from sky import exceptions, jobs

        buf = io.StringIO()

        def go() -> None:
            try:
                jobs.tail_logs(job_id=job_id, follow=False, output_stream=buf)
            except exceptions.ClusterNotUpError as exc:
                raise controller_unavailable(exc) from exc

        self._call(f"read the log of managed job {job_id}", go)
        return job_output(buf.getvalue())

    def cancel(self, cluster: str, job_id: int) -> None:
        import sky

        self._call(f"cancel job {job_id} on {cluster}",
                   lambda: sky.get(sky.cancel(cluster, job_ids=[job_id])))

    def jobs_cancel(self, job_id: int, graceful: bool = False) -> None:
        import sky
        from sky import exceptions, jobs

        def go() -> None:
            try:
                sky.get(jobs.cancel(job_ids=[job_id], graceful=graceful))
            except exceptions.ClusterNotUpError as exc:
                raise controller_unavailable(exc) from exc

        self._call(f"cancel managed job {job_id}", go)

    def down(self, cluster: str) -> None:
        import sky
        from sky import exceptions

        def go() -> None:
            try:
                sky.get(sky.down(cluster))
            except exceptions.ClusterDoesNotExist:
                return

        self._call(f"tear down {cluster}", go)


def controller_unavailable(exc: BaseException) -> ControllerUnavailable:
    """``ClusterNotUpError`` from a jobs call -> ``ControllerUnavailable`` (``stopped`` from the
    exception's ``cluster_status``, set by sky/backends/backend_utils.py ``is_controller_accessible``)."""
    status = getattr(exc, "cluster_status", None)
    stopped = _value(status) == "STOPPED" if status is not None else False
    handle = getattr(exc, "handle", None)
    absent = status is None or handle is None or getattr(handle, "head_ip", None) is None
    absent = absent and not stopped
    text = " ".join(_ANSI.sub("", str(exc)).split())[:300] or type(exc).__name__
    what = ("is stopped (SkyPilot stops it once no managed job runs)" if stopped
            else "does not exist (yet)" if absent else "cannot be reached")
    return ControllerUnavailable(f"SkyPilot's jobs controller {what}: {text}", stopped=stopped, absent=absent,
                                 hint="`sky jobs queue --refresh` restarts it; `sky status` shows it")


def _job_id_of(result: Any, request_id: str) -> int:
    """The job id in a launch request's result: ``(job_id, handle)`` from ``sky.launch``,
    ``(job_ids, handle)`` from ``sky.jobs.launch``."""
    first = result[0] if isinstance(result, tuple) else result
    if isinstance(first, list):
        first = first[0] if first else None
    if first is None:
        raise ProviderError(f"SkyPilot's launch request {request_id} ended without submitting a job")
    return int(first)
