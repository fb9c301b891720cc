"""The managed-job half of the SkyPilot provider (``spot: true | auto``): one SkyPilot managed job per
optjob job, each of its runs (named by ``last_recovered_at``) an optjob attempt.

What the meter gets from here (``Poll``): the run's launched resources (``placement``, re-read every
poll, so a recovery onto another instance type is priced as such), when its node came to exist
(``node_since``: no node while PENDING / STARTING without a cluster, ``no_node``), SkyPilot's own
``end_at`` once the job is over (``gone_at``: SkyPilot's controller has torn its cluster down by
then, so a manager that looks late does not bill its absence), and the jobs controller that runs it
(``overhead``: its own record from ``sky.status`` when SkyPilot lists it, else SkyPilot's default
controller resources in the job's cloud, to be priced as an estimate).

A budget stop asks the workload through the stop flag in its storage (written by the manager before
``stop``; the node's run script watches it, providers/sky_task.py) and cancels only when the manager
escalates (``kill``), with ``graceful=True``: SkyPilot's cancel SIGTERMs the job and tears the
cluster down at once (sky/skylet/job_lib.py ``cancel_jobs``; sky/jobs/controller.py:3405-3530), so
cancelling first could remove the node before the workload's checkpoint reached storage.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optjob.specs.errors import ProviderError, TeardownError
from optjob.steps.layout import write_json_atomic

from .base import AttemptState, Handle, Placement, Poll
from .sky_calls import SkyCalls, ended
from .sky_client import (
    CONTROLLER_CPUS,
    CONTROLLER_DISK_GB,
    CONTROLLER_MEMORY_RATIO,
    MANAGED_LAUNCHING,
    ControllerUnavailable,
    ManagedJob,
)
from .sky_task import exit_code_from_log

log = logging.getLogger(__name__)
OWNER_FILE = "skypilot-managed.json"


class ManagedJobs(SkyCalls):
    """Launch, poll, stop and tear down a SkyPilot managed job (see the module's docstring)."""

    # -- launch ----------------------------------------------------------------------------------
    def _launch_managed(self, config: Callable[[], dict[str, Any]], handle: Handle, out: Any) -> dict[str, Any]:
        name, job_dir = handle.cluster, Path(handle.data["job_dir"])
        mine = self._owner(job_dir).get("job_id")  # only a job launched for this job folder is adopted
        job = None
        if mine is not None:
            try:
                job = self._retry(lambda: self.client.managed_job(int(mine)))
            except ControllerUnavailable as exc:
                if not (exc.stopped or exc.absent):
                    raise  # cannot tell whether it still runs: never submit a second one blind
                job = None  # a stopped controller runs nothing, an absent one has nothing: the job has ended
        if job is not None and job.name == name and not job.terminal and job.status != "CANCELLING":
            # SkyPilot is already relaunching it: this attempt is its next run.
            data: dict[str, Any] = {"mode": "managed", "job_id": job.job_id, "recovery_count": job.recovery_count,
                                    "adopted": True}
            if job.status == "RECOVERING" or job.run_mark is None:
                data["prev_mark"] = job.run_mark  # the run after this one is ours
            else:
                data["mark"] = job.run_mark  # recovered already: the current run is ours
            return {**data, **self._controller_record()}
        handle.data["mode"] = "managed"
        job_id = self._submit_and_wait(lambda: self.client.submit_jobs_launch(config(), name), handle, out)
        return {"mode": "managed", "job_id": job_id, "recovery_count": 0, "adopted": False, "prev_mark": None,
                **self._controller_record()}

    def _controller_record(self) -> dict[str, Any]:
        """The jobs controller's launched resources, read once per attempt (``sky.status`` lists it)."""
        try:
            info = self._again(self.client.jobs_controller)
        except ProviderError as exc:
            log.debug("the jobs controller's resources are unknown: %s", exc)
            return {}
        if info is None or info.launched is None:
            return {}
        return {"controller": info.launched.to_json()}

    def _controller_of(self, handle: Handle, job: ManagedJob | None) -> Placement:
        """The jobs controller this attempt keeps up: its own record, else SkyPilot's default controller
        resources (4+ vCPUs, 4x memory, 50 GB disk, on demand) in the job's cloud and region."""
        recorded = handle.data.get("controller")
        if isinstance(recorded, dict):
            return Placement.from_json({**recorded, "disk_gb": recorded.get("disk_gb", CONTROLLER_DISK_GB)})
        launched = job.launched if job is not None else None
        cloud = handle.data.get("cloud") or (launched.cloud if launched else None)
        if cloud in (None, "any"):
            cloud = launched.cloud if launched else "aws"
        region = handle.data.get("region") or (launched.region if launched else None)
        return Placement(cloud=str(cloud), region=region, spot=False, nodes=1, cpus=CONTROLLER_CPUS,
                         memory_ratio=CONTROLLER_MEMORY_RATIO, disk_gb=CONTROLLER_DISK_GB)

    # -- poll ------------------------------------------------------------------------------------
    def _poll_managed(self, handle: Handle) -> Poll:
        job_id = int(handle.data["job_id"])
        try:
            job = self.client.managed_job(job_id)
        except ControllerUnavailable as exc:
            why = ("it stops once no managed job runs, so the job has ended; how is read from the job's "
                   "storage or SkyPilot's table" if exc.stopped else "the job may still be running")
            return Poll(AttemptState.UNKNOWN, detail=f"{exc.message} ({why})", spot=handle.data.get("spot") is True)
        if job is None:
            return Poll(AttemptState.LOST, detail=f"SkyPilot's managed-job table has no job {job_id}")
        spot = job.spot if job.spot is not None else handle.data.get("spot") is True
        nodes = job.nodes or int(handle.data.get("nodes", 1))
        bound = self._run_of(handle)
        meter: dict[str, Any] = {"spot": spot, "overhead": self._controller_of(handle, job)}
        if job.terminal:
            meter.update(gone_at=job.end_at, ended_at=job.end_at, placement=job.launched,
                         node_since=bound if bound is not None else self._first_run(handle, job),
                         no_node=job.run_mark is None and job.launched is None)
            if bound is not None and job.run_mark is not None and job.run_mark != bound:
                # A later run ended it: ours was over when that one started.
                meter.update(gone_at=job.run_mark, ended_at=job.run_mark, placement=None)
                return Poll(AttemptState.PREEMPTED, detail="a later run of the managed job ended it", **meter)
            return self._managed_ended(handle, job, **meter)
        if job.status == "RECOVERING":
            if bound is None:  # adopted during this recovery (or never saw a run): our run is coming
                return Poll(AttemptState.LAUNCHING, detail="recovering from a preemption", no_node=True, **meter)
            return Poll(AttemptState.PREEMPTED, detail=f"preempted; SkyPilot relaunches it "
                        f"(recovery {job.recovery_count})", **meter)
        if job.status in MANAGED_LAUNCHING or job.run_mark is None:
            if job.launched is None:  # queued, or provisioning with no cluster yet: nothing to bill
                return Poll(AttemptState.LAUNCHING, detail=job.status.lower(), no_node=True, **meter)
            return Poll(AttemptState.LAUNCHING, detail=job.status.lower(), placement=job.launched,
                        node_since=self.clock(), nodes=nodes, **meter)
        if bound is None:
            bound = self._bound_run(handle, job)
            if bound is None:  # SkyPilot still shows the previous attempt's run
                return Poll(AttemptState.LAUNCHING, detail="recovering from a preemption", no_node=True, **meter)
        if job.run_mark != bound:
            meter.update(gone_at=job.run_mark, ended_at=job.run_mark)
            return Poll(AttemptState.PREEMPTED, detail="SkyPilot relaunched it while optjob was not "
                        f"looking (recovery {job.recovery_count})", **meter)
        return Poll(AttemptState.RUNNING, detail=job.status.lower(), nodes=nodes, placement=job.launched,
                    node_since=bound, **meter)

    def _bound_run(self, handle: Handle, job: ManagedJob) -> float | None:
        """The run this attempt is: its recorded mark; else, bound now, the job's first run for an
        attempt that submitted it or the current run for an adopted one. None while the run SkyPilot
        shows is still the previous attempt's (recovering, or still at ``prev_mark``)."""
        bound = self._run_of(handle)
        if bound is not None:
            return bound
        mark = job.run_mark
        if mark is None or job.status == "RECOVERING" or mark == handle.data.get("prev_mark"):
            return None
        if (first := self._first_run(handle, job)) is not None:
            mark = first
        self._bind(handle, mark)
        return mark

    @staticmethod
    def _first_run(handle: Handle, job: ManagedJob) -> float | None:
        """The run an attempt that has not seen one yet is. An attempt that submitted the job is its
        first run (``start_at``): a manager away from the submission across SkyPilot's recoveries
        then bills every run since, not only the latest (the runs it never saw are billed as one span,
        recoveries included, at the price it knows). An adopted attempt is the run after its mark."""
        if handle.data.get("adopted") or handle.data.get("prev_mark") is not None:
            return job.run_mark
        return job.first_run

    def _managed_ended(self, handle: Handle, job: ManagedJob, spot: bool, **meter: Any) -> Poll:
        why = f"{job.status.lower()}: {job.failure_reason}".rstrip(": ")
        if job.status in ("SUCCEEDED", "CANCELLED"):
            ok = job.status == "SUCCEEDED"
            return Poll(AttemptState.SUCCEEDED if ok else AttemptState.STOPPED, exit_code=0 if ok else None,
                        detail="" if ok else "cancelled", spot=spot, **meter)
        if job.status == "FAILED":
            return ended(exit_code_from_log(self._logs(handle)), why, spot=spot, **meter)
        if job.status == "FAILED_CONTROLLER":
            return Poll(AttemptState.LOST, detail=f"{why} (the SkyPilot jobs controller failed)", spot=spot, **meter)
        hint = {"FAILED_NO_RESOURCE": " — no capacity: widen accelerators/regions or use spot: auto",
                "FAILED_PRECHECKS": " — run `sky check`"}.get(job.status, "")
        return Poll(AttemptState.FAILED, detail=why + hint, spot=spot, **meter)

    def _managed_outcome(self, handle: Handle) -> Poll | None:
        job = self.client.managed_job(int(handle.data["job_id"]), refresh=True)
        if job is None or not job.terminal:
            return None
        spot = job.spot if job.spot is not None else handle.data.get("spot") is True
        return self._managed_ended(handle, job, spot, gone_at=job.end_at, ended_at=job.end_at)

    # -- which run of a managed job an attempt is ------------------------------------------------
    @staticmethod
    def _run_file(handle: Handle) -> Path | None:
        job_dir = handle.data.get("job_dir")
        return Path(job_dir) / "logs" / f"attempt-{handle.attempt}.skypilot-run.json" if job_dir else None

    def _run_of(self, handle: Handle) -> float | None:
        """The ``last_recovered_at`` of the run this attempt is (None: not seen yet)."""
        if handle.data.get("mark") is not None:
            return float(handle.data["mark"])
        path = self._run_file(handle)
        try:
            mark = json.loads(path.read_text())["mark"] if path is not None else None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return float(mark) if mark is not None else None

    def _bind(self, handle: Handle, mark: float) -> None:
        """Record that this attempt is the run ``mark`` (write-once; the manager rebuilds handles)."""
        handle.data["mark"] = mark
        path = self._run_file(handle)
        if path is not None:
            with contextlib.suppress(OSError):
                write_json_atomic(path, {"job_id": handle.data.get("job_id"), "mark": mark})

    # -- ownership -------------------------------------------------------------------------------
    @staticmethod
    def _owner(job_dir: Path) -> dict[str, Any]:
        """``JOB_DIR/skypilot-managed.json``: the managed job of this job folder and its latest attempt."""
        try:
            owner = json.loads((job_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _adopted_later(self, handle: Handle) -> bool:
        if not handle.data.get("job_dir"):
            return False
        owner = self._owner(Path(handle.data["job_dir"]))
        return owner.get("job_id") == handle.data.get("job_id") and int(owner.get("attempt", 0)) > handle.attempt

    def _managed_now(self, job_id: int) -> ManagedJob | None:
        """The managed job, retried; None when it is not in the table or the controller is stopped or
        absent (a stopped controller runs no job: it stops only when idle)."""
        try:
            return self._retry(lambda: self.client.managed_job(job_id))
        except ControllerUnavailable as exc:
            if exc.stopped or exc.absent:
                return None
            raise

    # -- stop / kill / teardown ------------------------------------------------------------------
    def _stop_managed(self, handle: Handle, job_id: int) -> None:
        """Asked through the storage flag (``handle.data["stop_flag"]``, set by the manager once it
        wrote it): the workload checkpoints, uploads and exits on its own; the cancel waits for the
        manager's escalation (``kill``). No flag: cancel now, gracefully."""
        if handle.data.get("stop_flag"):
            return
        self._cancel_live(handle, job_id)

    def _cancel_live(self, handle: Handle, job_id: int) -> None:
        job = self._managed_now(job_id)
        if job is not None and not job.terminal and job.status != "CANCELLING" and not self._adopted_later(handle):
            self._retry(lambda: self.client.jobs_cancel(job_id, graceful=True))

    def _teardown_managed(self, handle: Handle) -> None:
        if handle.data.get("job_id") is None:
            return  # nothing was submitted
        job_id = int(handle.data["job_id"])
        if self._adopted_later(handle):
            return  # the job's resources now belong to a later attempt
        try:
            job = self._managed_now(job_id)
            if job is not None and not job.terminal and job.status != "CANCELLING":
                self._retry(lambda: self.client.jobs_cancel(job_id, graceful=True))
        except ProviderError as exc:
            raise TeardownError(f"could not cancel managed job {job_id}: {exc.message}",
                                hint=f"retry `optjob down`, or `sky jobs cancel {job_id}`") from exc

        # A terminal managed job's cluster has been cleaned up by SkyPilot's controller.
        def gone() -> bool:
            try:
                job = self.client.managed_job(job_id)
            except ControllerUnavailable as exc:
                if exc.stopped or exc.absent:
                    return True
                raise
            return job is None or job.terminal

        self._confirm(gone, f"managed job {job_id} ({handle.cluster})", f"sky jobs cancel {job_id}")
