"""Run attempts on any cloud through SkyPilot (``resources.cloud`` != local).

Two modes, chosen by ``resources.spot``:

* ``spot: false`` — ``sky.launch(down=True)`` on the cluster ``optjob-<name>``;
  autostop ``{idle_minutes, down: true}`` removes it once idle, so the manager
  has ``autostop_minutes`` to read the final job status, and a lost manager
  cannot leak it.
* ``spot: true | auto`` — a SkyPilot managed job named ``optjob-<name>``: SkyPilot
  relaunches it after a preemption. Each relaunch (a *run*, named by the job's
  ``last_recovered_at``, which every completed recovery changes — also the ones that
  do not bump ``recovery_count``, such as a controller restart) is a new optjob
  attempt. An attempt is bound to the first run it sees (recorded in
  ``JOB_DIR/logs/attempt-N.skypilot-run.json``); ``poll`` reports ``PREEMPTED`` once
  that run is over (the job is ``RECOVERING`` or shows another run), and the next
  ``launch`` *adopts* the live managed job instead of submitting another.
  ``teardown`` cancels the managed job unless a later attempt adopted it (recorded
  in ``JOB_DIR/skypilot-managed.json``), so call ``launch(next)`` before
  ``teardown(preempted)`` to keep SkyPilot's recovery.

Knowing versus not knowing (``providers.base``): when SkyPilot cannot answer — its
jobs controller stopped (it autostops once idle) or unreachable, the API server
busy — ``poll`` says ``UNKNOWN``, never ``LOST``; ``LOST`` needs SkyPilot to say the
cluster or job is gone. ``outcome`` reads the durable record SkyPilot keeps: the
managed-job table (restarting a stopped controller to read it).

Launches are idempotent per attempt: the request id is written to
``JOB_DIR/logs/attempt-N.skypilot-request.json`` before waiting, so ``launch`` again
(after a transient error) or ``adopt`` (after the manager died inside launch) waits
for that request instead of submitting another. Ctrl-C while waiting cancels the
request on the API server (``sky.api_cancel``) and tears down the cluster it was
provisioning (or cancels the managed job it created) before re-raising.

Logs: SkyPilot only returns a job's whole log, so ``read_log`` fetches it at most every
``log_interval_s`` and, once ``poll`` has seen the run end, once more and never again.

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
from .sky_client import (
    MANAGED_LAUNCHING,
    REQUEST_DONE,
    ClusterGone,
    ClusterNotUp,
    ControllerUnavailable,
    ManagedJob,
    RealSkyClient,
    SkyClient,
    TransientSkyError,
    find_orphans,
)
from .sky_task import (
    build_wheel,
    check_outputs_kept,
    exit_code_from_log,
    input_mounts,
    require_secrets,
    task_config,
    uses_managed_jobs,
)

__all__ = ["SkyPilotProvider", "find_orphans", "read_request", "request_file"]
T = TypeVar("T")
log = logging.getLogger(__name__)
OWNER_FILE = "skypilot-managed.json"
_LAUNCHING = {"INIT", "PENDING", "SETTING_UP", "STARTING", "SUBMITTED"}
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
                 stop_grace_s: float = 120.0, log_interval_s: float = 5.0) -> None:
        """``wheel``: the optjob wheel to ship (default: ``$OPTJOB_WHEEL``, else built from this
        checkout when a task is first submitted — not for an adopted managed job, not at import)."""
        self.client = client if client is not None else RealSkyClient()
        wheel = wheel if wheel is not None else (os.environ.get("OPTJOB_WHEEL") or None)
        self._wheel = Path(wheel) if wheel is not None else None
        self.sleep, self.clock, self.retries, self.backoff_s = sleep, clock, retries, backoff_s
        self.teardown_timeout_s, self.confirm_interval_s, self.stop_grace_s = (
            teardown_timeout_s, confirm_interval_s, stop_grace_s)
        self.log_interval_s = log_interval_s
        #: (key of a run's log) -> (fetched at, text, final); key -> the run was seen ended.
        self._log_cache: dict[tuple[Any, ...], tuple[float, str, bool]] = {}
        self._ended_runs: set[tuple[Any, ...]] = set()

    # -- launch ---------------------------------------------------------------------------------
    def launch(self, request: LaunchRequest) -> Handle:
        spec, cluster = request.spec, request.cluster_name
        job_file = request.job_dir / JOB_FILE
        check_outputs_kept(spec)
        secrets = require_secrets(spec, os.environ)  # read now, handed to SkyPilot, never written by optjob

        def config() -> dict[str, Any]:  # only when a task is really submitted
            if self._wheel is None and not spec.resources.image:
                self._wheel = build_wheel()
            inputs = input_mounts(json.loads(job_file.read_text())) if job_file.is_file() else {}
            return task_config(spec, attempt=request.attempt, env=request.env, job_file=job_file,
                               wheel=self._wheel or "optjob-in-image.whl", inputs=inputs, secrets=secrets)

        (request.job_dir / "logs").mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {"nodes": spec.resources.nodes, "spot": spec.resources.spot,
                                "job_dir": str(request.job_dir)}
        handle = Handle(provider=self.name, cluster=cluster, attempt=request.attempt, data=data)
        # SkyPilot's provisioning output goes to a file of its own, not the manager's terminal.
        with open(request.job_dir / "logs" / f"attempt-{request.attempt}.skypilot.log", "a") as out:
            if uses_managed_jobs(spec):
                data.update(self._launch_managed(config, handle, out))
                write_json_atomic(request.job_dir / OWNER_FILE, {"job_id": data["job_id"], "attempt": request.attempt})
            else:
                data["mode"] = "cluster"
                idle = spec.resources.autostop_minutes
                data["job_id"] = self._launch_cluster(
                    lambda: self.client.submit_launch(config(), cluster, down=True, idle_minutes=idle), handle, out)
                data.update(self._incarnation(cluster))
        return handle

    def _incarnation(self, cluster: str) -> dict[str, Any]:
        """The cluster's ``launched_at``: which incarnation of ``optjob-NAME`` this attempt ran on
        (``down --orphans`` removes only incarnations this OPTJOB_HOME launched)."""
        try:
            info = self._retry(lambda: self.client.cluster(cluster))
        except ProviderError:
            return {}
        return {"launched_at": info.launched_at} if info is not None and info.launched_at is not None else {}

    def _launch_cluster(self, submit: Callable[[], str], handle: Handle, out: Any) -> int:
        try:
            return self._submit_and_wait(submit, handle, out)
        except TransientSkyError:
            raise  # the request may still be provisioning: launch again adopts it (nothing to clean up yet)
        except ProviderError as exc:
            # SkyPilot keeps a cluster that failed setup "for debugging": remove it.
            try:
                self._down_confirmed(handle.cluster)
            except ProviderError as cleanup:
                also = f"{handle.cluster} may still exist ({cleanup.message}): run `sky down {handle.cluster}`"
                raise ProviderError(exc.message, hint="; ".join(filter(None, [exc.hint, also]))) from exc
            raise

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
            return data
        handle.data["mode"] = "managed"
        job_id = self._submit_and_wait(lambda: self.client.submit_jobs_launch(config(), name), handle, out)
        return {"mode": "managed", "job_id": job_id, "recovery_count": 0, "adopted": False, "prev_mark": None}

    def _submit_and_wait(self, submit: Callable[[], str], handle: Handle, out: Any) -> int:
        """Submit (or adopt this attempt's recorded request), record the request id, wait for it."""
        job_dir = Path(handle.data["job_dir"])
        record = read_request(job_dir, handle.attempt)
        if record.get("job_id") is not None and record.get("state") == "done":
            return int(record["job_id"])
        if record.get("request_id") and record.get("state") == "submitted":
            rid = str(record["request_id"])  # a launch of this attempt already went out: wait for it
        else:
            rid = submit()
            record = {"request_id": rid, "state": "submitted", "submitted_at": self.clock(),
                      "handle": Handle(self.name, handle.cluster, handle.attempt, dict(handle.data)).to_json()}
            write_json_atomic(request_file(job_dir, handle.attempt), record)
        try:
            job_id = self._retry(lambda: self.client.wait(rid, out))
        except KeyboardInterrupt:
            self._abandon(rid, handle, record)
            raise
        except TransientSkyError:
            raise
        except ProviderError:
            write_json_atomic(request_file(job_dir, handle.attempt), {**record, "state": "failed"})
            raise
        write_json_atomic(request_file(job_dir, handle.attempt), {**record, "state": "done", "job_id": job_id})
        return job_id

    def _abandon(self, rid: str, handle: Handle, record: dict[str, Any]) -> None:
        """Ctrl-C while waiting for a launch: SkyPilot's SDK leaves the request running on the API
        server, so cancel it, then remove what it made. What is recorded first (``interrupted``) lets
        ``adopt`` / ``down --orphans`` finish the job if a second Ctrl-C cuts this short."""
        path = request_file(Path(handle.data["job_dir"]), handle.attempt)
        write_json_atomic(path, {**record, "state": "interrupted"})
        try:
            self.client.cancel_request(rid)
            status = self.client.request_status(rid)
            job_id = self.client.wait(rid) if status == "SUCCEEDED" else None  # done before the cancel
            if handle.data.get("mode") != "managed" or job_id is not None:
                # A cancelled launch leaves its half-made cluster; a finished one, its job: remove them.
                self.teardown(Handle(self.name, handle.cluster, handle.attempt, {**handle.data, "job_id": job_id}))
        except ProviderError as exc:
            log.warning("cleaning up the interrupted launch of %s: %s", handle.cluster, exc)
            return
        write_json_atomic(path, {**record, "state": "cancelled", "job_id": job_id})

    def adopt(self, job_dir: Path, attempt: int) -> Handle | None:
        record = read_request(job_dir, attempt)
        rid, saved = record.get("request_id"), record.get("handle")
        if not rid or not isinstance(saved, dict):
            return None
        handle = Handle.from_json(saved)
        job_id = record.get("job_id")
        if job_id is None and record.get("state") in ("submitted", "interrupted"):
            status = self.client.request_status(str(rid))
            if status is not None and (status not in REQUEST_DONE or status == "SUCCEEDED"):
                try:
                    job_id = self._retry(lambda: self.client.wait(str(rid)))
                except TransientSkyError:
                    raise
                except ProviderError:
                    job_id = None
        if job_id is None and handle.data.get("mode") == "managed":
            return None  # no managed job came of it
        handle.data["job_id"] = job_id  # a cluster without a job: LOST, and teardown removes it
        if handle.data.get("mode") == "managed":
            handle.data.update(recovery_count=0, adopted=False, prev_mark=None)
            write_json_atomic(job_dir / OWNER_FILE, {"job_id": job_id, "attempt": attempt})
        else:
            handle.data.update(self._incarnation(handle.cluster))
        write_json_atomic(request_file(job_dir, attempt), {**record, "state": "done", "job_id": job_id})
        return handle

    # -- poll -----------------------------------------------------------------------------------
    def poll(self, handle: Handle) -> Poll:
        try:
            polled = self._again(lambda: self._poll_managed(handle) if handle.data.get("mode") == "managed"
                                 else self._poll_cluster(handle))
        except TransientSkyError as exc:
            return Poll(AttemptState.UNKNOWN, detail=f"SkyPilot cannot say now: {exc.message}",
                        spot=handle.data.get("spot") is True)
        if polled.state.is_terminal() or polled.state is AttemptState.PREEMPTED:
            key = self._log_key(handle)
            if key is not None:
                self._ended_runs.add(key)  # one more (final) log read, then none
        return polled

    def _poll_cluster(self, handle: Handle) -> Poll:
        job_id, cluster = handle.data.get("job_id"), handle.cluster
        info = self.client.cluster(cluster)
        gone = Poll(AttemptState.LOST, detail=f"SkyPilot no longer has {cluster} (autostop removed it once idle, "
                    "or it was torn down outside optjob); it kept no record of how the job ended")
        if info is None:
            return gone
        if job_id is None:
            return Poll(AttemptState.LOST, detail=f"no job of this attempt was submitted to {cluster}")
        if info.status == "STOPPED":
            return Poll(AttemptState.PREEMPTED, detail=f"{cluster} was stopped outside optjob")
        nodes = info.nodes
        try:
            status = self.client.job_status(cluster, int(job_id))
        except ClusterGone:
            return gone  # listed UP from SkyPilot's cache, but gone when asked
        except TransientSkyError:
            raise
        except ProviderError as exc:  # ClusterNotUp: it exists but is not UP (or another refusal)
            again = self.client.cluster(cluster, refresh=True)
            if again is None:
                return gone
            if again.status in ("STOPPED", "INIT"):
                return Poll(AttemptState.PREEMPTED, detail=f"lost the nodes of {cluster} ({again.status}): "
                            f"{exc.message}", nodes=again.nodes)
            if isinstance(exc, ClusterNotUp) or again.status != "UP":
                return Poll(AttemptState.UNKNOWN, detail=f"{cluster} is {again.status}: its jobs cannot be read "
                            "now", nodes=again.nodes)
            raise
        if status is None:
            return Poll(AttemptState.LOST, detail=f"{cluster} does not know job {job_id}", nodes=nodes)
        if status in _LAUNCHING:
            return Poll(AttemptState.LAUNCHING, detail=status.lower(), nodes=nodes)
        if status == "RUNNING":
            return Poll(AttemptState.RUNNING, nodes=nodes, detail="cluster unhealthy" if info.status == "INIT" else "")
        return self._cluster_ended(handle, status, nodes)

    def _cluster_ended(self, handle: Handle, status: str, nodes: int) -> Poll:
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
        if job.terminal:
            if bound is not None and job.run_mark is not None and job.run_mark != bound:
                return Poll(AttemptState.PREEMPTED, spot=spot, detail="a later run of the managed job ended it")
            return self._managed_ended(handle, job, spot)
        if job.status == "RECOVERING":
            if bound is None:  # adopted during this recovery (or never saw a run): our run is coming
                return Poll(AttemptState.LAUNCHING, detail="recovering from a preemption", spot=spot)
            return Poll(AttemptState.PREEMPTED, spot=spot, detail=f"preempted; SkyPilot relaunches it "
                        f"(recovery {job.recovery_count})")
        if job.status in MANAGED_LAUNCHING or job.run_mark is None:
            return Poll(AttemptState.LAUNCHING, detail=job.status.lower(), spot=spot)
        if bound is None:
            if job.run_mark == handle.data.get("prev_mark"):
                return Poll(AttemptState.LAUNCHING, detail="recovering from a preemption", spot=spot)
            self._bind(handle, job.run_mark)
        elif job.run_mark != bound:
            return Poll(AttemptState.PREEMPTED, spot=spot, detail="SkyPilot relaunched it while optjob was not "
                        f"looking (recovery {job.recovery_count})")
        return Poll(AttemptState.RUNNING, detail=job.status.lower(), nodes=nodes, spot=spot)

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

    def outcome(self, handle: Handle) -> Poll | None:
        """SkyPilot's own record of how the attempt ended: the managed-job table (a stopped jobs
        controller is restarted to read it: ``sky jobs queue --refresh``), or the cluster's job table
        while the cluster still exists. None when SkyPilot has no record or cannot be asked."""
        try:
            if handle.data.get("mode") == "managed":
                job = self.client.managed_job(int(handle.data["job_id"]), refresh=True)
                if job is None or not job.terminal:
                    return None
                spot = job.spot if job.spot is not None else handle.data.get("spot") is True
                return self._managed_ended(handle, job, spot)
            job_id = handle.data.get("job_id")
            info = self.client.cluster(handle.cluster, refresh=True)
            if info is None or job_id is None:
                return None
            status = self.client.job_status(handle.cluster, int(job_id))
        except ProviderError as exc:
            log.info("no record of how %s ended: %s", handle.cluster, exc)
            return None
        if status is None or status in _LAUNCHING or status == "RUNNING" or status == "FAILED_DRIVER":
            return None
        polled = self._cluster_ended(handle, status, info.nodes)
        return polled if polled.state.is_terminal() else None

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

    # -- logs -----------------------------------------------------------------------------------
    def _log_key(self, handle: Handle) -> tuple[Any, ...] | None:
        job_id = handle.data.get("job_id")
        if job_id is None:
            return None
        if handle.data.get("mode") == "managed":
            return ("managed", int(job_id), self._run_of(handle))
        return ("cluster", handle.cluster, int(job_id))

    def _logs(self, handle: Handle) -> str:
        job_id = handle.data.get("job_id")
        if job_id is None:
            return ""
        try:
            if handle.data.get("mode") == "managed":
                return self._again(lambda: self.client.managed_logs(int(job_id)))
            return self._again(lambda: self.client.logs(handle.cluster, int(job_id)))
        except ProviderError as exc:
            log.debug("no log for %s: %s", handle.cluster, exc)
            return ""

    def read_log(self, handle: Handle, offset: int) -> tuple[str, int]:
        if handle.data.get("mode") == "managed":
            try:
                job = self._again(lambda: self.client.managed_job(int(handle.data["job_id"])))
            except ProviderError as exc:
                log.debug("no log for %s: %s", handle.cluster, exc)
                return "", offset
            if job is None or job.run_mark is None:
                return "", offset
            bound = self._run_of(handle)
            if bound is None:
                if job.status == "RECOVERING" or job.run_mark == handle.data.get("prev_mark"):
                    return "", offset  # the log now shown is the previous attempt's run
                self._bind(handle, job.run_mark)
            elif job.run_mark != bound:
                return "", offset  # the log now shown belongs to another attempt's run
        key = self._log_key(handle)
        cached = self._log_cache.get(key) if key is not None else None
        now = self.clock()
        final = key in self._ended_runs  # poll saw the run end before this read: nothing more will come
        if cached is not None and (cached[2] or (not final and now - cached[0] < self.log_interval_s)):
            return _slice(cached[1], offset)
        text = self._logs(handle)
        if key is not None:
            self._log_cache[key] = (now, text, final)
        return _slice(text, offset)

    def wait(self, handle: Handle, timeout_s: float) -> None:
        """SkyPilot offers no cheap end signal: sleep the tick (on the injected clock)."""
        self.sleep(timeout_s)

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
                job = self._managed_now(int(job_id))
                if job is not None and not job.terminal and not self._adopted_later(handle):
                    self._retry(lambda: self.client.jobs_cancel(int(job_id)))
            elif self._retry(lambda: self.client.cluster(handle.cluster)) is not None:
                self._retry(lambda: self.client.cancel(handle.cluster, int(job_id)))
        except ClusterGone:
            return
        except ProviderError as exc:
            log.warning("stop %s: %s", handle.cluster, exc)

    def _managed_now(self, job_id: int) -> ManagedJob | None:
        """The managed job, retried; None when it is not in the table or the controller is stopped or
        absent (a stopped controller runs no job: it stops only when idle)."""
        try:
            return self._retry(lambda: self.client.managed_job(job_id))
        except ControllerUnavailable as exc:
            if exc.stopped or exc.absent:
                return None
            raise

    def teardown(self, handle: Handle) -> None:
        if handle.data.get("mode") != "managed":
            self._down_confirmed(handle.cluster)
            return
        if handle.data.get("job_id") is None:
            return  # nothing was submitted
        job_id = int(handle.data["job_id"])
        if self._adopted_later(handle):
            return  # the job's resources now belong to a later attempt
        try:
            job = self._managed_now(job_id)
            if job is not None and not job.terminal and job.status != "CANCELLING":
                self._retry(lambda: self.client.jobs_cancel(job_id))
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

    def _again(self, fn: Callable[[], T]) -> T:
        """One quick second try after a blip (a poll or a log read must not wait long); a jobs controller
        that cannot be asked is a state, not a blip: it is not retried here."""
        try:
            return fn()
        except ControllerUnavailable:
            raise
        except TransientSkyError as exc:
            log.info("SkyPilot: %s; trying once more", exc)
            self.sleep(min(self.backoff_s, 1.0))
            return fn()

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


def request_file(job_dir: Path, attempt: int) -> Path:
    """Where an attempt's launch request is recorded before the manager waits for it."""
    return job_dir / "logs" / f"attempt-{attempt}.skypilot-request.json"


def read_request(job_dir: Path, attempt: int) -> dict[str, Any]:
    """The recorded launch request of an attempt: ``request_id``, ``state`` (submitted, done, failed,
    interrupted, cancelled), ``job_id`` once known, ``submitted_at`` and the ``handle`` it will get."""
    try:
        record = json.loads(request_file(job_dir, attempt).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
