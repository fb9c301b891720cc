"""The one fake the SkyPilot provider's tests use: an in-memory ``SkyClient``.

Why a fake: the provider's logic (state mapping, preemption -> new attempt, unknown versus gone,
teardown retries and confirmation, log offsets, launch requests) must be tested, and no cloud or
SkyPilot API server can be reached here. Everything *below* ``SkyClient`` — the task YAML,
``sky.Task`` / ``sky.Resources`` validation, error translation of real ``sky.exceptions``, the
resources strings — is tested against the real SkyPilot package instead
(tests/providers/test_sky_contract.py runs the same assertions against this fake and, where it
can offline, against SkyPilot's real client).

It copies SkyPilot 0.14.1 as observed in its installed source (paths under
``.venv/lib/python3.11/site-packages/sky/``):

* The jobs controller (``controller``: UP, STOPPED, UNREACHABLE, NONE) — ``sky.jobs.queue_v2``,
  ``jobs.cancel`` and ``jobs.tail_logs`` raise ``ClusterNotUpError`` when it is stopped, not
  provisioned, or unreachable (jobs/client/sdk.py:389-391 "Request Raises"; jobs/server/core.py:1381
  ``_maybe_restart_controller``; backends/backend_utils.py:3660-3795 ``is_controller_accessible``;
  exceptions.py:349 ``ClusterNotUpError(message, cluster_status, handle)``), which the
  client turns into ``ControllerUnavailable`` (``stopped`` for STOPPED). ``refresh=True`` restarts a
  STOPPED controller. It autostops only when idle: ``stop_controller`` refuses while a job runs.
  ``jobs.tail_logs`` with no controller returns no output rather than raising (observed against a
  local 0.14.1 API server).
* A cluster SkyPilot does not have raises ``ClusterDoesNotExist`` from ``job_status``, ``tail_logs``
  and ``cancel`` (backends/backend_utils.py:3550-3617 ``check_cluster_available``; exceptions.py:366,
  a ``ValueError``): ``ClusterGone`` here, never
  ``KeyError``. ``sky.status`` without refresh answers from SkyPilot's cache, so a cluster autostop
  removed can still read UP there (``stale``) until a refreshed call; AUTOSTOPPING is a status
  (utils/status_lib.py ``ClusterStatus``).
* Spot-ness comes from the launched resources: ``[spot]`` only when the task asked for spot
  (``use_spot``); ``spot: auto`` lands on spot unless ``auto_lands_on_demand`` (utils/resources_utils.py
  ``format_resource``, line 422 ``spot = '[spot]'``; the requested ``[Spot]`` / ``[On-demand|Spot]`` of
  backends/backend_utils.py:4355-4410). Before a managed job's first run it is unknown (None).
* A managed job's ``last_recovered_at`` is -1 until it runs, its start time once RUNNING, the time
  of every completed recovery; ``recovery_count`` is bumped only by a counted recovery — a controller
  restart recovers without a bump (jobs/state.py:110 ``last_recovered_at`` default -1, :3500
  ``set_started_async``, :3681-3722 ``set_recovered_async``, :912-936 ``RecoverySource``). A recovered
  run starts with a new log.
* Launches are requests: ``submit_*`` returns an id at once; the request provisions on the "server"
  whether or not anyone waits, ``wait`` (``sky.stream_and_get``) blocks until it ends
  (``launch_gate``: a ``threading.Event`` it waits on; ``on_wait``: a hook run while waiting, e.g. to
  raise ``KeyboardInterrupt`` as Ctrl-C would) and does not cancel it when interrupted
  (client/sdk.py:2487-2578 ``stream_and_get``, :2581 ``api_cancel``); a cancelled launch leaves its
  half-made (INIT) cluster behind.
* Cancels: a cluster job is SIGTERMed and marked CANCELLED at once (skylet/job_lib.py:1105-1145); a
  managed job goes CANCELLING while the controller collects its logs and terminates its cluster,
  then CANCELLED (jobs/controller.py:3455-3530, the cancel path of the job loop) — here
  after ``cancel_lag`` more table reads. ``on_sigterm`` lets a test play the workload's answer.
* What ran (``launched``, a ``providers.base.Placement``): a cluster record's
  ``handle.launched_resources`` / ``launched_nodes`` (schemas/api/responses.py:99 ``StatusResponse``),
  a managed job's ``cloud`` / ``region`` / ``cluster_resources_full`` while its cluster exists
  (jobs/utils.py:3276-3292); none while a managed job is PENDING or STARTING before its cluster is
  made (``provision`` makes it: STARTING with a node). A recovery can land on another instance type
  (``recover(onto=...)``: SkyPilot's recovery strategy relaunches on any candidate of the task's
  resources, jobs/recovery_strategy.py). ``lands_on`` is what provisioning gets; None (the default)
  is a record that says nothing of what was launched, as SkyPilot's ``-`` before a handle exists.
* ``end_at`` is set when a managed job reaches a terminal status (jobs/state.py:3932-3952
  ``set_succeeded_async``, :1300-1368 ``set_failed``, :4145-4157 ``set_cancelled_async``); None before.
* The jobs controller is a cluster ``sky-jobs-controller-<id>`` in ``sky.status`` (sky/core.py
  ``status`` lists controllers; utils/common.py:13): ``jobs_controller`` answers it while it exists,
  with ``controller_launched`` as its launched resources (SkyPilot's default: jobs/constants.py:57
  ``cpus: 4+, memory: 4x, disk_size: 50``).
* ``jobs.cancel(graceful=...)`` (jobs/client/sdk.py:547-608): recorded as ``("jobs_cancel", id)`` and
  ``("jobs_cancel_graceful", id)`` when graceful.
* Log lines carry Ray's prefix with the task's name: ``(optjob-NAME, pid=N)`` on one node,
  ``(head, rank=0, pid=N)`` / ``(worker1, rank=1, pid=N)`` on several (backends/task_codegen.py:660-668,
  ``name_str``).
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pytest
import yaml
from optjob.providers.base import Placement
from optjob.providers.sky_client import (
    JOB_CONTROLLER_PREFIX,
    MANAGED_TERMINAL,
    ClusterGone,
    ClusterInfo,
    ClusterNotUp,
    ControllerUnavailable,
    ManagedJob,
    SkyClient,
    TransientSkyError,
)
from optjob.providers.sky_task import EXIT_MARKER
from optjob.specs import JobSpec
from optjob.specs.errors import ProviderError

BASE = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml").read_text())
BUCKET = "s3://optjob-test-bucket/ckpt"
SKYPILOT_VERSION = "0.14.1"


def make_spec(resources: Mapping[str, Any], *, storage: str | None = BUCKET, name: str = "cloudy") -> JobSpec:
    """The quickstart pipeline with other resources (and s3 storage, which spot needs)."""
    doc = copy.deepcopy(BASE)
    doc.update(name=name, resources=dict(resources))
    if storage:
        doc["storage"] = {"artifacts": storage}
    return JobSpec.model_validate(doc)


def _wants_spot(task: Mapping[str, Any]) -> bool | str:
    res = task.get("resources") or {}
    cands = res.get("ordered") or res.get("any_of") or [res]
    spots = {bool(c.get("use_spot", res.get("use_spot", False))) for c in cands}
    return "auto" if spots == {True, False} else spots == {True}


@dataclass
class FakeJob:
    status: str = "PENDING"
    log: list[str] = field(default_factory=list)
    task: str = "task"
    nodes: int = 1


@dataclass
class FakeCluster:
    name: str
    nodes: int
    status: str = "UP"
    jobs: dict[int, FakeJob] = field(default_factory=dict)
    downed_at_call: int | None = None
    spot: bool = False
    launched_at: float = 0.0
    #: Removed by autostop while SkyPilot's cache still says UP: unrefreshed status calls list it.
    stale: bool = False
    launched: Placement | None = None


@dataclass
class FakeManaged:
    job_id: int
    name: str
    nodes: int
    status: str = "PENDING"
    recovery_count: int = 0
    last_recovered_at: float = -1.0
    failure_reason: str = ""
    log: list[str] = field(default_factory=list)
    wants_spot: bool | str = True
    submitted_at: float = 0.0
    cancel_reads: int | None = None  # CANCELLING: reads left before CANCELLED
    launched: Placement | None = None  # the current run's cluster (None: no cluster yet, or not said)
    end_at: float | None = None
    start_at: float | None = None  # the first run's start (set_started_async sets it with last_recovered_at)

    @property
    def task(self) -> str:
        return self.name


@dataclass
class FakeRequest:
    request_id: str
    kind: str  # "launch" | "jobs_launch"
    target: str  # cluster or job name
    task: Mapping[str, Any]
    down: bool = False
    idle_minutes: int = 0
    status: str = "RUNNING"
    result: int | None = None
    error: ProviderError | None = None


class FakeSky(SkyClient):
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clusters_: dict[str, FakeCluster] = {}
        self.managed: dict[int, FakeManaged] = {}
        self.requests: dict[str, FakeRequest] = {}
        self.calls: list[tuple[str, Any]] = []  # what the provider asked SkyPilot to do
        self.reads: list[tuple[str, Any]] = []  # what it asked to know (queue, logs, wait)
        self.configs: list[Mapping[str, Any]] = []
        self.fail_downs = 0  # the next N down() calls raise TransientSkyError
        self.down_lag = 0  # a downed cluster stays listed for N more status calls
        self.stuck: set[str] = set()  # clusters that never go away
        self.launch_error: ProviderError | None = None
        self.cancel_lag = 0  # managed jobs stay CANCELLING for N reads
        self.controller = "UP"  # the jobs controller: UP | STOPPED | UNREACHABLE | NONE
        self.flaky: dict[str, int] = {}  # method -> the next N calls raise TransientSkyError
        self.flap: set[str] = set()  # methods whose every other call raises TransientSkyError
        self._flapped: dict[str, int] = {}
        self.on_call: Callable[[str], None] | None = None  # runs first in cluster()/managed_jobs(): a test's "cloud"
        self.launch_gate: threading.Event | None = None  # wait() blocks until it is set
        self.on_wait: Callable[[FakeRequest], None] | None = None  # runs inside wait(), before it blocks
        self.on_sigterm: Callable[[FakeJob | FakeManaged], None] | None = None
        self.auto_lands_on_demand = False
        self.lands_on: Placement | None = None  # what provisioning gets (None: records do not say)
        self.controller_launched: Placement | None = None  # the jobs controller's launched resources
        self._status_calls = 0
        self._ids = itertools.count(1)
        self._rids = itertools.count(1)
        self._counter = itertools.count(1)
        self._last = 0.0
        self._clock = clock or self._real_time
        self.lock = threading.RLock()  # the test thread plays the cloud while a manager thread polls

    def _real_time(self) -> float:
        """Wall time, as SkyPilot stamps its records, made strictly increasing (each run mark differs)."""
        self._last = max(time.time(), self._last + 0.001)
        return self._last

    # -- scripting helpers used by tests ------------------------------------------------------
    def line(self, target: FakeJob | FakeManaged, text: str, pid: int = 4242) -> None:
        prefix = f"({target.task}, pid={pid})" if target.nodes <= 1 else f"(head, rank=0, pid={pid})"
        target.log.append(f"{prefix} {text}\n")

    def emit(self, target: FakeJob | FakeManaged, event: str, **fields: Any) -> None:
        self.line(target, json.dumps({"event": event, "ts": 0.0, "v": 1, **fields}))

    def exit(self, target: FakeJob | FakeManaged, code: int, status: str | None = None) -> None:
        self.line(target, f"{EXIT_MARKER} {code}")
        target.status = status or ("SUCCEEDED" if code == 0 else "FAILED")
        if isinstance(target, FakeManaged) and target.status in MANAGED_TERMINAL:
            target.end_at = self._clock()  # the controller then removes the cluster

    def job(self, cluster: str, job_id: int) -> FakeJob:
        return self.clusters_[cluster].jobs[job_id]

    def provision(self, job_id: int) -> FakeManaged:
        """The managed job's cluster is made (STARTING, a node exists: setup runs); not started yet."""
        job = self.managed[job_id]
        job.status, job.launched = "STARTING", job.launched or self.lands_on
        return job

    def start(self, job_id: int) -> FakeManaged:
        """The managed job's first run starts (``set_started_async``: last_recovered_at = now)."""
        job = self.managed[job_id]
        job.status, job.last_recovered_at = "RUNNING", self._clock()
        job.start_at = job.last_recovered_at
        job.launched = job.launched or self.lands_on
        return job

    def preempt(self, job_id: int) -> None:
        self.managed[job_id].status = "RECOVERING"

    def recover(self, job_id: int, counted: bool = True, onto: Placement | None = None) -> None:
        """A recovery completes (``set_recovered_async``): a new run with a new log; the count is
        bumped only for a failure recovery, not for a controller restart (``counted=False``);
        ``onto``: the instance it landed on this time (else what provisioning gets now)."""
        job = self.managed[job_id]
        job.status, job.last_recovered_at = "RUNNING", self._clock()
        job.recovery_count += 1 if counted else 0
        job.log = []
        job.launched = onto or self.lands_on

    def stop_controller(self) -> None:
        """The jobs controller autostops — only when no managed job is live, as SkyPilot's does."""
        live = [j.job_id for j in self.managed.values() if j.status not in MANAGED_TERMINAL]
        assert not live, f"SkyPilot's jobs controller does not autostop while jobs {live} run"
        self.controller = "STOPPED"

    def autostop_down(self, cluster: str, *, stale: bool = True) -> None:
        """Autostop with ``down: true`` removed the cluster; SkyPilot's cache may still say UP."""
        c = self.clusters_[cluster]
        if stale:
            c.stale = True
        else:
            del self.clusters_[cluster]

    def finish_request(self, request_id: str) -> None:
        """The API server finishes a launch request (whether or not anyone waits for it)."""
        with self.lock:
            self._complete(self.requests[request_id])

    def count(self, method: str) -> int:
        return sum(1 for name, _ in self.calls + self.reads if name == method)

    def live(self) -> list[str]:
        """What still costs money: clusters (not downed) and managed jobs not over, and requests running."""
        out = [f"cluster:{n}" for n, c in self.clusters_.items() if c.downed_at_call is None and not c.stale]
        out += [f"managed:{j.job_id}" for j in self.managed.values() if j.status not in MANAGED_TERMINAL]
        out += [f"request:{r.request_id}" for r in self.requests.values() if r.status in ("PENDING", "RUNNING")]
        return out

    def _flake(self, method: str) -> None:
        if self.on_call is not None and method in ("cluster", "managed_jobs"):
            self.on_call(method)
        if method in self.flap:
            self._flapped[method] = self._flapped.get(method, 0) + 1
            if self._flapped[method] % 2:
                raise TransientSkyError(f"SkyPilot could not {method}: the API server is restarting (503)")
        if self.flaky.get(method, 0) > 0:
            self.flaky[method] -= 1
            raise TransientSkyError(f"SkyPilot could not {method}: the API server is busy (503)")

    def _controller(self, action: str, refresh: bool = False) -> None:
        if self.controller == "STOPPED" and refresh:
            self.calls.append(("controller_restart", None))
            self.controller = "UP"
        if self.controller != "UP":
            stopped, absent = self.controller == "STOPPED", self.controller == "NONE"
            raise ControllerUnavailable(f"SkyPilot could not {action}: jobs controller is "
                                        f"{'stopped' if stopped else 'not up'}", stopped=stopped, absent=absent)

    # -- launch requests --------------------------------------------------------------------------
    def submit_launch(self, task: Mapping[str, Any], cluster: str, *, down: bool, idle_minutes: int) -> str:
        with self.lock:
            self._flake("submit_launch")
            self.calls.append(("launch", (cluster, down, idle_minutes)))
            self.configs.append(task)
            rid = f"req-{next(self._rids)}"
            self.requests[rid] = FakeRequest(rid, "launch", cluster, task, down, idle_minutes)
            c = self.clusters_.get(cluster)
            if c is None or c.stale or c.downed_at_call is not None:  # provisioning starts on the server at once
                spot = _wants_spot(task)
                self.clusters_[cluster] = FakeCluster(cluster, int(task.get("num_nodes", 1)), status="INIT",
                                                      spot=spot is True, launched_at=self._clock(),
                                                      launched=self.lands_on)
            return rid

    def submit_jobs_launch(self, task: Mapping[str, Any], name: str) -> str:
        with self.lock:
            self._flake("submit_jobs_launch")
            self.calls.append(("jobs_launch", name))
            self.configs.append(task)
            rid = f"req-{next(self._rids)}"
            self.requests[rid] = FakeRequest(rid, "jobs_launch", name, task)
            return rid

    def _complete(self, req: FakeRequest) -> None:
        if req.status != "RUNNING":
            return
        if self.launch_error is not None:
            req.status, req.error = "FAILED", self.launch_error
            if req.kind == "launch" and req.target in self.clusters_:
                self.clusters_[req.target].status = "INIT"  # SkyPilot keeps a half-made cluster "for debugging"
            return
        if req.kind == "launch":
            c = self.clusters_.get(req.target)
            if c is None or c.stale or c.downed_at_call is not None:
                c = self.clusters_[req.target] = FakeCluster(req.target, int(req.task.get("num_nodes", 1)),
                                                             spot=_wants_spot(req.task) is True,
                                                             launched_at=self._clock(), launched=self.lands_on)
            c.status = "UP"  # also restarts a STOPPED cluster, as sky.launch does
            job_id = next(self._ids)
            c.jobs[job_id] = FakeJob(task=str(req.task.get("name", "task")), nodes=c.nodes)
        else:
            job_id = next(self._ids)
            self.managed[job_id] = FakeManaged(job_id, req.target, int(req.task.get("num_nodes", 1)),
                                               wants_spot=_wants_spot(req.task), submitted_at=self._clock())
        req.status, req.result = "SUCCEEDED", job_id

    def wait(self, request_id: str, log: TextIO | None = None) -> int:
        self._flake("wait")
        req = self.requests[request_id]
        self.reads.append(("wait", request_id))
        if log is not None:
            log.write(f"Launching {req.target}...\n")
        if self.on_wait is not None:
            self.on_wait(req)  # e.g. Ctrl-C: KeyboardInterrupt, the request left running
        if self.launch_gate is not None and req.status == "RUNNING":
            self.launch_gate.wait()
        with self.lock:
            self._complete(req)
        if req.status == "CANCELLED":
            raise ProviderError(f"SkyPilot could not finish launch request {request_id}: it was cancelled",
                                hint="the SkyPilot request was cancelled (`sky api cancel`?)")
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def request_status(self, request_id: str) -> str | None:
        req = self.requests.get(request_id)
        return None if req is None else req.status

    def cancel_request(self, request_id: str) -> None:
        self.calls.append(("cancel_request", request_id))
        req = self.requests.get(request_id)
        if req is not None and req.status in ("PENDING", "RUNNING"):
            req.status = "CANCELLED"  # what it provisioned so far stays (an INIT cluster)

    # -- clusters ---------------------------------------------------------------------------------
    def cluster(self, name: str, refresh: bool = False) -> ClusterInfo | None:
        with self.lock:
            self._flake("cluster")
            self._status_calls += 1
            c = self.clusters_.get(name)
            if c is None:
                return None
            if c.stale:
                if refresh:
                    del self.clusters_[name]
                    return None
                return ClusterInfo(name=name, status="UP", nodes=c.nodes, spot=c.spot, launched_at=c.launched_at,
                                   launched=c.launched)
            downed = c.downed_at_call
            if downed is not None and name not in self.stuck and self._status_calls - downed > self.down_lag:
                del self.clusters_[name]
                return None
            return ClusterInfo(name=name, status=c.status, nodes=c.nodes, spot=c.spot, launched_at=c.launched_at,
                               launched=c.launched)

    def clusters(self) -> list[ClusterInfo]:
        return [info for n in list(self.clusters_) if (info := self.cluster(n)) is not None]

    def jobs_controller(self) -> ClusterInfo | None:
        if self.controller in ("NONE",):
            return None
        status = {"UP": "UP", "STOPPED": "STOPPED"}.get(self.controller, "INIT")
        return ClusterInfo(name=f"{JOB_CONTROLLER_PREFIX}1a2b3c4d", status=status, launched=self.controller_launched)

    def _live_cluster(self, cluster: str) -> FakeCluster:
        c = self.clusters_.get(cluster)
        if c is None or c.stale or (c.downed_at_call is not None and cluster not in self.stuck):
            raise ClusterGone(f"SkyPilot could not reach {cluster}: Cluster {cluster!r} does not exist.")
        if c.status not in ("UP", "AUTOSTOPPING") and c.status != "INIT":
            raise ClusterNotUp(f"SkyPilot could not reach {cluster}: it is {c.status}")
        return c

    def job_status(self, cluster: str, job_id: int) -> str | None:
        with self.lock:
            self._flake("job_status")
            c = self._live_cluster(cluster)
            if c.status != "UP":
                raise ClusterNotUp(f"SkyPilot could not get job {job_id} on {cluster}: it is {c.status}")
            job = c.jobs.get(job_id)
            return None if job is None else job.status

    def logs(self, cluster: str, job_id: int) -> str:
        with self.lock:
            self._flake("logs")
            self.reads.append(("logs", (cluster, job_id)))
            job = self._live_cluster(cluster).jobs.get(job_id)
            return "" if job is None else "".join(job.log)

    def cancel(self, cluster: str, job_id: int) -> None:
        with self.lock:
            self.calls.append(("cancel", (cluster, job_id)))
            job = self._live_cluster(cluster).jobs.get(job_id)
            if job is not None and job.status in ("PENDING", "SETTING_UP", "RUNNING"):
                job.status = "CANCELLED"  # SIGTERM sent; the status is set at once
                if self.on_sigterm is not None:
                    self.on_sigterm(job)

    def down(self, cluster: str) -> None:
        with self.lock:
            self.calls.append(("down", cluster))
            if self.fail_downs > 0:
                self.fail_downs -= 1
                raise TransientSkyError(f"SkyPilot could not tear down {cluster}: server busy")
            c = self.clusters_.get(cluster)
            if c is not None and c.downed_at_call is None:
                c.downed_at_call = self._status_calls

    # -- managed jobs -----------------------------------------------------------------------------
    def _record(self, j: FakeManaged) -> ManagedJob:
        if j.status == "CANCELLING" and j.cancel_reads is not None:
            j.cancel_reads -= 1
            if j.cancel_reads < 0:
                j.status, j.cancel_reads = "CANCELLED", None  # logs collected, cluster terminated
                j.end_at = self._clock()
        if j.status == "RUNNING" and j.last_recovered_at < 0:
            j.last_recovered_at = j.start_at = self._clock()  # set_started_async
        ran = j.last_recovered_at > 0
        spot: bool | None = None
        if ran:
            spot = j.wants_spot is True or (j.wants_spot == "auto" and not self.auto_lands_on_demand)
        live = j.status not in MANAGED_TERMINAL and j.status not in ("PENDING", "SUBMITTED", "RECOVERING")
        return ManagedJob(j.job_id, j.name, j.status, j.recovery_count, j.last_recovered_at, j.failure_reason,
                          j.nodes if j.status in ("RUNNING", "WINDING_DOWN", "CANCELLING") else 0, spot,
                          j.submitted_at, launched=j.launched if live else None,  # over: the requested string only
                          end_at=j.end_at if j.status in MANAGED_TERMINAL else None, start_at=j.start_at)

    def managed_jobs(self, job_ids: list[int] | None = None, refresh: bool = False) -> list[ManagedJob]:
        with self.lock:
            self._flake("managed_jobs")
            self.reads.append(("queue", job_ids))
            self._controller("list managed jobs", refresh)
            return [self._record(j) for j in self.managed.values() if job_ids is None or j.job_id in job_ids]

    def managed_logs(self, job_id: int) -> str:
        with self.lock:
            self._flake("managed_logs")
            self.reads.append(("managed_logs", job_id))
            if self.controller != "UP" or job_id not in self.managed:
                return ""  # sky.jobs.tail_logs prints its complaint and returns: no job output
            return "".join(self.managed[job_id].log)

    def jobs_cancel(self, job_id: int, graceful: bool = False) -> None:
        with self.lock:
            self.calls.append(("jobs_cancel", job_id))
            if graceful:
                self.calls.append(("jobs_cancel_graceful", job_id))
            self._controller(f"cancel managed job {job_id}")
            job = self.managed[job_id]
            if job.status not in MANAGED_TERMINAL:
                job.status, job.cancel_reads = "CANCELLING", self.cancel_lag
                if self.on_sigterm is not None:
                    self.on_sigterm(job)


class FakeClock:
    """``time.time`` / ``time.sleep`` stand-ins: sleeping advances the clock at once."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture(scope="module")
def sky_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private HOME for SkyPilot (it writes ~/.sky when imported), set before
    ``import sky`` and restored after the module; usage collection off."""
    home = tmp_path_factory.mktemp("skyhome")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
        mp.delenv("SKYPILOT_API_SERVER_ENDPOINT", raising=False)
        mp.delenv("SKYPILOT_GLOBAL_CONFIG", raising=False)
        yield home
