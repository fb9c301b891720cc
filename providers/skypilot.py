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

Where the parts are: this module holds the provider's entry points and the cluster part;
``sky_managed.py`` the managed-job part; ``sky_calls.py`` the retries, teardown confirmation and
launch requests; ``sky_client.py`` / ``sky_records.py`` the SkyPilot SDK and its records;
``sky_task.py`` the task. The meter's inputs (``Poll.placement``, ``node_since``, ``gone_at``,
``overhead``) are described in ``sky_managed.py``; on a cluster, ``placement`` is the cluster's
``launched_resources`` and ``node_since`` its ``launched_at``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optjob.specs.errors import ProviderError
from optjob.steps.layout import JOB_FILE, write_json_atomic

from .base import AttemptState, Handle, LaunchRequest, Poll
from .home_copy import CommandRunner, copy_home
from .home_copy import run as default_runner
from .sky_calls import ended, read_request, request_file, slice_log
from .sky_client import (
    REQUEST_DONE,
    ClusterGone,
    ClusterNotUp,
    RealSkyClient,
    SkyClient,
    TransientSkyError,
    find_orphans,
)
from .sky_managed import OWNER_FILE, ManagedJobs
from .sky_task import (
    STOP_FLAG_POLL_S,
    autostop_idle_minutes,
    build_wheel,
    check_outputs_kept,
    copies_home,
    exit_code_from_log,
    input_mounts,
    require_secrets,
    task_config,
    unattended_end_s,
    uses_managed_jobs,
)

__all__ = ["OWNER_FILE", "SkyPilotProvider", "find_orphans", "read_request", "request_file"]
log = logging.getLogger(__name__)
_LAUNCHING = {"INIT", "PENDING", "SETTING_UP", "STARTING", "SUBMITTED"}
_FIXED = {"SUCCEEDED": (AttemptState.SUCCEEDED, 0, ""),
          "FAILED_DRIVER": (AttemptState.PREEMPTED, None, "the job driver died (node lost or OOM)"),
          "FAILED_SETUP": (AttemptState.FAILED, None, "setup failed on the node: see the attempt log")}


class SkyPilotProvider(ManagedJobs):
    name = "skypilot"
    bills_from_launch = False  # from the node's existence (Poll.node_since), not the request

    def __init__(self, client: SkyClient | None = None, *, wheel: str | Path | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.time, retries: int = 5,
                 backoff_s: float = 2.0, teardown_timeout_s: float = 900.0, confirm_interval_s: float = 10.0,
                 stop_grace_s: float = 120.0, log_interval_s: float = 5.0,
                 copy_runner: CommandRunner | None = None) -> None:
        """``wheel``: the optjob wheel to ship (default: ``$OPTJOB_WHEEL``, else built from this
        checkout when a task is first submitted — not for an adopted managed job, not at import)."""
        self.client = client if client is not None else RealSkyClient()
        wheel = wheel if wheel is not None else (os.environ.get("OPTJOB_WHEEL") or None)
        self._wheel = Path(wheel) if wheel is not None else None
        self.sleep, self.clock, self.retries, self.backoff_s = sleep, clock, retries, backoff_s
        self.teardown_timeout_s, self.confirm_interval_s, self.stop_grace_s = (
            teardown_timeout_s, confirm_interval_s, stop_grace_s)
        self.log_interval_s = log_interval_s
        self.copy_runner = copy_runner  # how a run without storage comes home (None: ssh, as home_copy says)
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
                                "job_dir": str(request.job_dir), "cloud": spec.resources.cloud,
                                "region": spec.resources.region, "unattended_s": unattended_end_s(spec)}
        if copies_home(spec):
            data["copy_home"] = True
        if request.env.get("OPTJOB_DEADLINE"):  # the node is gone by deadline + unattended_s, whoever watches
            data["deadline"] = float(request.env["OPTJOB_DEADLINE"])
        handle = Handle(provider=self.name, cluster=cluster, attempt=request.attempt, data=data)
        # SkyPilot's provisioning output goes to a file of its own, not the manager's terminal.
        with open(request.job_dir / "logs" / f"attempt-{request.attempt}.skypilot.log", "a") as out:
            if uses_managed_jobs(spec):
                data.update(self._launch_managed(config, handle, out))
                write_json_atomic(request.job_dir / OWNER_FILE, {"job_id": data["job_id"], "attempt": request.attempt})
            else:
                data["mode"] = "cluster"
                idle = autostop_idle_minutes(spec)
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
        # Autostop removes it at the latest ``unattended_s`` after the workload's deadline: billing ends
        # there for a manager that looks later (when it looks sooner, its own look is the bound).
        latest = (float(handle.data["deadline"]) + float(handle.data.get("unattended_s", 0.0))
                  if handle.data.get("deadline") is not None else None)
        gone = Poll(AttemptState.LOST, detail=f"SkyPilot no longer has {cluster} (autostop removed it once idle, "
                    "or it was torn down outside optjob); it kept no record of how the job ended", gone_at=latest)
        if info is None:
            return gone
        if job_id is None:
            return Poll(AttemptState.LOST, detail=f"no job of this attempt was submitted to {cluster}")
        if info.status == "STOPPED":
            return Poll(AttemptState.PREEMPTED, detail=f"{cluster} was stopped outside optjob")
        nodes = info.nodes
        # What runs, and since when (the cluster's launched_at: provisioning is over by then).
        meter: dict[str, Any] = {"placement": info.launched, "spot": info.spot if info.launched is None
                                 else info.launched.spot,
                                 "node_since": info.launched_at if info.launched_at is not None else self.clock()}
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
                            f"{exc.message}", nodes=again.nodes, **meter)
            if isinstance(exc, ClusterNotUp) or again.status != "UP":
                return Poll(AttemptState.UNKNOWN, detail=f"{cluster} is {again.status}: its jobs cannot be read "
                            "now", nodes=again.nodes, **meter)
            raise
        if status is None:
            return Poll(AttemptState.LOST, detail=f"{cluster} does not know job {job_id}", nodes=nodes, **meter)
        if status in _LAUNCHING:
            return Poll(AttemptState.LAUNCHING, detail=status.lower(), nodes=nodes, **meter)
        if status == "RUNNING":
            return Poll(AttemptState.RUNNING, nodes=nodes, detail="cluster unhealthy" if info.status == "INIT" else "",
                        **meter)
        return self._cluster_ended(handle, status, nodes, **meter)

    def _cluster_ended(self, handle: Handle, status: str, nodes: int, **meter: Any) -> Poll:
        if status in _FIXED:
            state, code, detail = _FIXED[status]
            return Poll(state, exit_code=code, detail=detail, nodes=nodes, **meter)
        code = exit_code_from_log(self._logs(handle))
        if status == "CANCELLED" and code is None:
            asked = self._stop_requested_at(handle)
            if asked is not None and self.clock() - asked < self.stop_grace_s:
                return Poll(AttemptState.RUNNING, detail="stopping: waiting for the checkpoint", nodes=nodes, **meter)
            return Poll(AttemptState.STOPPED, detail="cancelled", nodes=nodes, **meter)
        return ended(code, status.lower(), nodes, **meter)

    def outcome(self, handle: Handle) -> Poll | None:
        """SkyPilot's own record of how the attempt ended: the managed-job table (a stopped jobs
        controller is restarted to read it: ``sky jobs queue --refresh``), or the cluster's job table
        while the cluster still exists. None when SkyPilot has no record or cannot be asked."""
        try:
            if handle.data.get("mode") == "managed":
                return self._managed_outcome(handle)
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

    # -- logs -----------------------------------------------------------------------------------
    def _log_key(self, handle: Handle) -> tuple[Any, ...] | None:
        job_id = handle.data.get("job_id")
        if job_id is None:
            return None
        if handle.data.get("mode") == "managed":
            return ("managed", int(job_id), self._run_of(handle))
        return ("cluster", handle.cluster, int(job_id))

    def read_log(self, handle: Handle, offset: int) -> tuple[str, int]:
        if handle.data.get("mode") == "managed":
            try:
                job = self._again(lambda: self.client.managed_job(int(handle.data["job_id"])))
            except ProviderError as exc:
                log.debug("no log for %s: %s", handle.cluster, exc)
                return "", offset
            if job is None or job.run_mark is None:
                return "", offset
            bound = self._bound_run(handle, job)
            if bound is None or job.run_mark != bound:
                return "", offset  # the log now shown belongs to another attempt's run
        key = self._log_key(handle)
        cached = self._log_cache.get(key) if key is not None else None
        now = self.clock()
        final = key in self._ended_runs  # poll saw the run end before this read: nothing more will come
        if cached is not None and (cached[2] or (not final and now - cached[0] < self.log_interval_s)):
            return slice_log(cached[1], offset)
        text = self._logs(handle)
        if key is not None:
            self._log_cache[key] = (now, text, final)
        return slice_log(text, offset)

    def wait(self, handle: Handle, timeout_s: float) -> None:
        """SkyPilot offers no cheap end signal: sleep the tick (on the injected clock)."""
        self.sleep(timeout_s)

    # -- stop / kill / teardown -----------------------------------------------------------------
    def reads_stop_flag(self, handle: Handle) -> bool:
        """A managed job's node watches ``sky_task.STOP_FLAG_KEY`` (its cancel would remove the node at
        once); a cluster job is cancelled directly (SIGTERM, the cluster stays until teardown), so no
        flag: a second SIGTERM from the watcher would read as "stop now"."""
        return handle.data.get("mode") == "managed"

    def stop_latency_s(self, handle: Handle) -> float:
        """A managed job is asked through the flag its node polls; a cluster job is SIGTERMed at once."""
        return STOP_FLAG_POLL_S + 15.0 if handle.data.get("mode") == "managed" else 0.0

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
                self._stop_managed(handle, int(job_id))
            elif self._retry(lambda: self.client.cluster(handle.cluster)) is not None:
                self._retry(lambda: self.client.cancel(handle.cluster, int(job_id)))
        except ClusterGone:
            return
        except ProviderError as exc:
            log.warning("stop %s: %s", handle.cluster, exc)

    def kill(self, handle: Handle) -> None:
        """A managed job: cancel it (gracefully) and return, SkyPilot's controller removing its cluster;
        a cluster: tear it down (confirmed)."""
        if handle.data.get("mode") == "managed" and handle.data.get("job_id") is not None:
            self._cancel_live(handle, int(handle.data["job_id"]))
            return
        if handle.data.get("copy_home"):  # the money is at hand: no time to copy what the cluster holds
            self._note_home(handle, "outputs not copied home: the budget was at hand when the cluster was "
                                    "killed (set storage.artifacts to keep them)")
        self._down_confirmed(handle.cluster)

    def _copy_home(self, handle: Handle) -> None:
        """A run without storage: bring the cluster's job folder home once, before ``down`` (a failure is
        written to the job's folder and the attempt's SkyPilot log; the cluster goes down either way)."""
        job_dir = handle.data.get("job_dir")
        if not handle.data.get("copy_home") or not job_dir:
            return
        marker = Path(job_dir) / f".copied-home-{handle.attempt}"
        if marker.exists():
            return
        try:
            if self._retry(lambda: self.client.cluster(handle.cluster)) is None:
                self._note_home(handle, f"outputs not copied home: {handle.cluster} was already gone")
                return
        except ProviderError:
            pass  # SkyPilot cannot say: try the copy, which says what went wrong
        result = copy_home(handle.cluster, Path(job_dir), run=self.copy_runner or default_runner)
        self._note_home(handle, result.detail)
        if result.copied:
            marker.touch()

    @staticmethod
    def _note_home(handle: Handle, line: str) -> None:
        log.warning("%s: %s", handle.cluster, line)
        job_dir = handle.data.get("job_dir")
        if job_dir:
            with contextlib.suppress(OSError), \
                    open(Path(job_dir) / "logs" / f"attempt-{handle.attempt}.skypilot.log", "a") as out:
                out.write(f"[optjob] {line}\n")

    def teardown(self, handle: Handle) -> None:
        if handle.data.get("mode") != "managed":
            self._copy_home(handle)
            self._down_confirmed(handle.cluster)
            return
        self._teardown_managed(handle)
