"""Run attempts on any cloud through SkyPilot (``resources.cloud`` != local).

Two modes, chosen by ``resources.spot``:

* ``spot: false`` — ``sky.launch(down=True)`` on the cluster ``optjob-<name>``;
  autostop ``{idle_minutes, down: true}`` removes it once idle, so the manager
  has ``autostop_minutes`` to read the final job status, and a lost manager
  cannot leak it.
* ``spot: true | auto`` — a SkyPilot managed job named ``optjob-<name>``: SkyPilot
  relaunches it after a preemption. Each relaunch is a new optjob attempt:
  ``poll`` reports ``PREEMPTED`` once the attempt's run is gone (the job is
  ``RECOVERING`` or its ``recovery_count`` moved past ``Handle.data
  ["recovery_count"]``), and the next ``launch`` *adopts* the live managed job
  instead of submitting another. ``teardown`` cancels the managed job unless a
  later attempt adopted it (recorded in ``JOB_DIR/skypilot-managed.json``), so
  call ``launch(next)`` before ``teardown(preempted)`` to keep SkyPilot's recovery.

Exit codes: the run script prints ``[optjob] exit-code N``; ``poll`` reads it from
the log for failed/cancelled jobs to tell ``STOPPED`` (4, 143) from ``FAILED``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from optjob.specs.errors import ProviderError, TeardownError
from optjob.steps.exit_codes import STOP_CODES
from optjob.steps.layout import JOB_FILE, write_json_atomic

from .base import AttemptState, Handle, LaunchRequest, Poll, Provider
from .sky_client import ManagedJob, RealSkyClient, SkyClient, TransientSkyError, find_orphans
from .sky_task import build_wheel, exit_code_from_log, input_mounts, task_config, uses_managed_jobs

__all__ = ["SkyPilotProvider", "find_orphans"]
T = TypeVar("T")
log = logging.getLogger(__name__)
OWNER_FILE = "skypilot-managed.json"
_LAUNCHING = {"INIT", "PENDING", "SETTING_UP", "STARTING", "SUBMITTED"}
_RUNNING = {"RUNNING", "WINDING_DOWN", "CANCELLING"}
_FIXED = {"SUCCEEDED": (AttemptState.SUCCEEDED, 0, ""),
          "FAILED_DRIVER": (AttemptState.PREEMPTED, None, "the job driver died (node lost or OOM)"),
          "FAILED_SETUP": (AttemptState.FAILED, None, "setup failed on the node: see the attempt log")}


def _slice(text: str, offset: int) -> tuple[str, int]:
    data = text.encode("utf-8", "replace")
    if len(data) <= offset:
        return "", offset
    chunk = data[offset:]
    cut = chunk.rfind(b"\n")
    if cut < 0:
        return "", offset
    return chunk[: cut + 1].decode("utf-8", "replace"), offset + cut + 1


class SkyPilotProvider(Provider):
    name = "skypilot"

    def __init__(self, client: SkyClient | None = None, *, wheel: str | Path | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.time, retries: int = 5,
                 backoff_s: float = 2.0, teardown_timeout_s: float = 900.0, confirm_interval_s: float = 10.0,
                 stop_grace_s: float = 120.0) -> None:
        """``wheel``: the optjob wheel to ship (default: ``$OPTJOB_WHEEL``, else built from this
        checkout when a task is first submitted — not for an adopted managed job, not at import)."""
        self.client = client if client is not None else RealSkyClient()
        wheel = wheel if wheel is not None else (os.environ.get("OPTJOB_WHEEL") or None)
        self._wheel = Path(wheel) if wheel is not None else None
        self.sleep, self.clock, self.retries, self.backoff_s = sleep, clock, retries, backoff_s
        self.teardown_timeout_s, self.confirm_interval_s, self.stop_grace_s = (
            teardown_timeout_s, confirm_interval_s, stop_grace_s)

    # -- launch ---------------------------------------------------------------------------------
    def launch(self, request: LaunchRequest) -> Handle:
        spec, cluster = request.spec, request.cluster_name
        job_file = request.job_dir / JOB_FILE

        def config() -> dict[str, Any]:  # only when a task is really submitted
            if self._wheel is None:
                self._wheel = build_wheel()
            inputs = input_mounts(json.loads(job_file.read_text())) if job_file.is_file() else {}
            return task_config(spec, attempt=request.attempt, env=request.env, job_file=job_file,
                               wheel=self._wheel, inputs=inputs)

        (request.job_dir / "logs").mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {"nodes": spec.resources.nodes, "spot": spec.resources.spot,
                                "job_dir": str(request.job_dir)}
        # SkyPilot's provisioning output goes to a file of its own, not the manager's terminal.
        with open(request.job_dir / "logs" / f"attempt-{request.attempt}.skypilot.log", "a") as out:
            if uses_managed_jobs(spec):
                data.update(self._launch_managed(config, cluster, request.job_dir, out))
                write_json_atomic(request.job_dir / OWNER_FILE, {"job_id": data["job_id"], "attempt": request.attempt})
            else:
                job_id = self._launch_cluster(config(), cluster, spec.resources.autostop_minutes, out)
                data.update(mode="cluster", job_id=job_id)
        return Handle(provider=self.name, cluster=cluster, attempt=request.attempt, data=data)

    def _launch_cluster(self, config: dict[str, Any], cluster: str, idle: int, out: Any) -> int:
        try:
            return self.client.launch(config, cluster, down=True, idle_minutes=idle, log=out)
        except ProviderError as exc:
            # SkyPilot keeps a cluster that failed setup "for debugging": remove it.
            try:
                self._down_confirmed(cluster)
            except ProviderError as cleanup:
                also = f"{cluster} may still exist ({cleanup.message}): run `sky down {cluster}`"
                raise ProviderError(exc.message, hint="; ".join(filter(None, [exc.hint, also]))) from exc
            raise

    def _launch_managed(self, config: Callable[[], dict[str, Any]], name: str, job_dir: Path,
                        out: Any) -> dict[str, Any]:
        mine = self._owner(job_dir).get("job_id")  # only a job launched for this job folder is adopted
        live = [j for j in self._retry(self.client.managed_jobs)
                if j.job_id == mine and j.name == name and not j.terminal and j.status != "CANCELLING"]
        if live:  # SkyPilot is already relaunching it: this attempt is its next run
            job = live[0]
            count = job.recovery_count + (1 if job.status == "RECOVERING" else 0)  # bumped when recovered
            return {"mode": "managed", "job_id": job.job_id, "recovery_count": count, "adopted": True}
        job_id = self.client.jobs_launch(config(), name, log=out)
        return {"mode": "managed", "job_id": job_id, "recovery_count": 0, "adopted": False}

    # -- poll -----------------------------------------------------------------------------------
    def poll(self, handle: Handle) -> Poll:
        if handle.data.get("mode") == "managed":
            return self._poll_managed(handle)
        job_id = handle.data.get("job_id")
        info = self.client.cluster(handle.cluster)
        if info is None or job_id is None:
            return Poll(AttemptState.LOST, detail=f"SkyPilot no longer knows {handle.cluster} (autostop "
                        "removed it, or it was torn down outside optjob); its exit status is unknown")
        if info.status == "STOPPED":
            return Poll(AttemptState.PREEMPTED, detail=f"{handle.cluster} was stopped outside optjob")
        nodes = info.nodes
        try:
            status = self.client.job_status(handle.cluster, int(job_id))
        except TransientSkyError:
            raise
        except ProviderError as exc:
            again = self.client.cluster(handle.cluster, refresh=True)
            if again is None or again.status != "UP":
                return Poll(AttemptState.PREEMPTED, detail=f"lost the nodes of {handle.cluster}: {exc.message}",
                            nodes=again.nodes if again else 0)
            raise
        if status is None:
            return Poll(AttemptState.LOST, detail=f"{handle.cluster} does not know job {job_id}", nodes=nodes)
        if status in _LAUNCHING:
            return Poll(AttemptState.LAUNCHING, detail=status.lower(), nodes=nodes)
        if status == "RUNNING":
            return Poll(AttemptState.RUNNING, nodes=nodes, detail="cluster unhealthy" if info.status == "INIT" else "")
        if status in _FIXED:
            state, code, detail = _FIXED[status]
            return Poll(state, exit_code=code, detail=detail, nodes=nodes)
        code = exit_code_from_log(self._logs(handle))
        if status == "CANCELLED" and code is None:
            asked = self._stop_requested_at(handle)
            if asked is not None and self.clock() - asked < self.stop_grace_s:
                return Poll(AttemptState.RUNNING, detail="stopping: waiting for the checkpoint", nodes=nodes)
            return Poll(AttemptState.STOPPED, detail="cancelled", nodes=nodes)
        return self._ended(code, status.lower(), nodes)

    @staticmethod
    def _ended(code: int | None, detail: str, nodes: int = 0, spot: bool = False) -> Poll:
        state = AttemptState.STOPPED if code in STOP_CODES else AttemptState.FAILED
        state = AttemptState.SUCCEEDED if code == 0 else state
        return Poll(state, exit_code=code, detail=detail, nodes=nodes, spot=spot)

    def _poll_managed(self, handle: Handle) -> Poll:
        job = self.client.managed_job(int(handle.data["job_id"]))
        if job is None:
            return Poll(AttemptState.LOST, detail=f"SkyPilot no longer knows managed job {handle.data['job_id']}")
        mine = int(handle.data.get("recovery_count", 0))
        spot = job.spot if job.spot is not None else handle.data.get("spot") is True
        nodes = job.nodes or int(handle.data.get("nodes", 1))
        preempted = Poll(AttemptState.PREEMPTED, spot=spot, detail=f"preempted; SkyPilot relaunches it "
                         f"(recovery {job.recovery_count})")
        if job.recovery_count > mine:
            return preempted
        if job.status == "RECOVERING":
            if job.recovery_count < mine:  # adopted during this recovery: our run is coming
                return Poll(AttemptState.LAUNCHING, detail="recovering from a preemption", spot=spot)
            return preempted
        if job.status in _LAUNCHING:
            return Poll(AttemptState.LAUNCHING, detail=job.status.lower(), spot=spot)
        if job.status in _RUNNING:
            return Poll(AttemptState.RUNNING, detail=job.status.lower(), nodes=nodes, spot=spot)
        return self._managed_ended(handle, job, spot)

    def _managed_ended(self, handle: Handle, job: ManagedJob, spot: bool) -> Poll:
        why = f"{job.status.lower()}: {job.failure_reason}".rstrip(": ")
        if job.status in ("SUCCEEDED", "CANCELLED"):
            ok = job.status == "SUCCEEDED"
            return Poll(AttemptState.SUCCEEDED if ok else AttemptState.STOPPED, exit_code=0 if ok else None,
                        detail="" if ok else "cancelled", spot=spot)
        if job.status == "FAILED":
            return self._ended(exit_code_from_log(self._logs(handle)), why, spot=spot)
        if job.status == "FAILED_CONTROLLER":
            return Poll(AttemptState.LOST, detail=f"{why} (the SkyPilot jobs controller failed)", spot=spot)
        hint = {"FAILED_NO_RESOURCE": " — no capacity: widen accelerators/regions or use spot: auto",
                "FAILED_PRECHECKS": " — run `sky check`"}.get(job.status, "")
        return Poll(AttemptState.FAILED, detail=why + hint, spot=spot)

    # -- logs -----------------------------------------------------------------------------------
    def _logs(self, handle: Handle) -> str:
        job_id = handle.data.get("job_id")
        if job_id is None:
            return ""
        try:
            if handle.data.get("mode") == "managed":
                return self.client.managed_logs(int(job_id))
            return self.client.logs(handle.cluster, int(job_id))
        except ProviderError as exc:
            log.debug("no log for %s: %s", handle.cluster, exc)
            return ""

    def read_log(self, handle: Handle, offset: int) -> tuple[str, int]:
        if handle.data.get("mode") == "managed":
            job = self.client.managed_job(int(handle.data["job_id"]))
            if job is None or job.recovery_count != int(handle.data.get("recovery_count", 0)):
                return "", offset  # the log now shown belongs to another attempt's run
        return _slice(self._logs(handle), offset)

    # -- stop / teardown ------------------------------------------------------------------------
    def stop(self, handle: Handle) -> None:
        job_id = handle.data.get("job_id")
        if job_id is None:
            return
        handle.data["stop_requested_at"] = now = self.clock()
        if handle.data.get("job_dir"):  # the manager may not keep the handle we just changed
            with contextlib.suppress(OSError):
                write_json_atomic(self._stop_file(handle), {"stop_requested_at": now})
        try:
            if handle.data.get("mode") == "managed":
                job = self.client.managed_job(int(job_id))
                if job is not None and not job.terminal and not self._adopted_later(handle):
                    self.client.jobs_cancel(int(job_id))
            elif self.client.cluster(handle.cluster) is not None:
                self.client.cancel(handle.cluster, int(job_id))
        except ProviderError as exc:
            log.warning("stop %s: %s", handle.cluster, exc)

    def teardown(self, handle: Handle) -> None:
        if handle.data.get("mode") != "managed":
            self._down_confirmed(handle.cluster)
            return
        job_id = int(handle.data["job_id"])
        if self._adopted_later(handle):
            return  # the job's resources now belong to a later attempt
        try:
            job = self._retry(lambda: self.client.managed_job(job_id))
            if job is not None and not job.terminal and job.status != "CANCELLING":
                self._retry(lambda: self.client.jobs_cancel(job_id))
        except ProviderError as exc:
            raise TeardownError(f"could not cancel managed job {job_id}: {exc.message}",
                                hint=f"retry `optjob down`, or `sky jobs cancel {job_id}`") from exc
        # A terminal managed job's cluster has been cleaned up by SkyPilot's controller.
        self._confirm(lambda: (j := self.client.managed_job(job_id)) is None or j.terminal,
                      f"managed job {job_id} ({handle.cluster})", f"sky jobs cancel {job_id}")

    @staticmethod
    def _stop_file(handle: Handle) -> Path:
        return Path(handle.data["job_dir"]) / "logs" / f"attempt-{handle.attempt}.stop.json"

    def _stop_requested_at(self, handle: Handle) -> float | None:
        if "stop_requested_at" in handle.data:
            return float(handle.data["stop_requested_at"])
        try:
            return float(json.loads(self._stop_file(handle).read_text())["stop_requested_at"])
        except (KeyError, OSError, ValueError, TypeError):
            return None

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

    def _down_confirmed(self, cluster: str) -> None:
        try:
            self._retry(lambda: self.client.down(cluster))
        except ProviderError as exc:
            raise TeardownError(f"could not tear down {cluster}: {exc.message}",
                                hint=exc.hint or f"retry `optjob down`, or `sky down {cluster}`") from exc
        self._confirm(lambda: self.client.cluster(cluster, refresh=True) is None, f"cluster {cluster}",
                      f"sky down {cluster}")

    def _confirm(self, gone: Callable[[], bool], what: str, manual: str) -> None:
        deadline = self.clock() + self.teardown_timeout_s
        while True:
            try:
                if gone():
                    return
            except TransientSkyError as exc:
                log.info("confirming teardown of %s: %s", what, exc)
            except ProviderError as exc:
                raise TeardownError(f"could not confirm {what} is gone: {exc.message}", hint=exc.hint) from exc
            if self.clock() >= deadline:
                raise TeardownError(f"SkyPilot still reports {what} after {self.teardown_timeout_s:.0f}s",
                                    hint=f"retry `optjob down`, or run `{manual}`")
            self.sleep(self.confirm_interval_s)

    def _retry(self, fn: Callable[[], T]) -> T:
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except TransientSkyError as exc:
                if attempt == self.retries:
                    raise
                log.info("SkyPilot: %s; retrying in %.0fs", exc, delay)
                self.sleep(delay)
                delay = min(delay * 2, 60.0)
        raise AssertionError("unreachable")
