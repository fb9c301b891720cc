"""``apply``: execute a plan — claim the job, launch attempts, reconcile until done.

The loop is level-based: every tick reads the attempt's actual state
(``reconcile.observe``), then acts — relaunch after a preemption, stop at the
budget, finalize (teardown per policy) at the end. Killing this process loses
nothing: the workload keeps its own budget deadline, and ``optjob status`` or a
second ``apply`` picks the job up from the state store.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from optjob.providers.base import AttemptState, Handle, LaunchRequest, Provider
from optjob.specs import JobSpec
from optjob.specs.errors import BudgetExceeded, Interrupted, JobFailed, ProviderError, UsageError
from optjob.specs.steps import TrainOptions
from optjob.steps.layout import JobFile

from . import paths
from .clock import Clock
from .job_states import JobStatus, Reason
from .meter import STOP_MARGIN_S, Budget, job_elapsed_s, over_budget, rate_usd_per_s, seconds_left
from .plan import Plan
from .pricing.calibration_store import record_calibration
from .reconcile import final_status, finalize, observe, owner_alive, reconcile_orphaned
from .rehearsal import Rehearsal
from .store import AttemptRow, JobRow, Store

MAX_RECOVERIES = 10


class Reporter(Protocol):
    def event(self, event: dict[str, Any]) -> None: ...
    def status(self, message: str) -> None: ...


class Silent:
    def event(self, event: dict[str, Any]) -> None:
        pass

    def status(self, message: str) -> None:
        pass


@dataclass
class Outcome:
    name: str
    status: JobStatus
    reason: Reason | None
    spent_usd: float
    attempts: int
    job_dir: Path
    message: str | None = None

    def raise_for_status(self) -> None:
        if self.reason == Reason.SUCCEEDED or not self.status.is_terminal():
            return
        reason = self.reason.value if self.reason else "?"
        text = f"job {self.name} {self.status.value} ({reason})" + (f": {self.message}" if self.message else "")
        if self.reason == Reason.BUDGET:
            raise BudgetExceeded(text, hint="checkpoint kept; apply again with a larger budget to resume")
        if self.reason == Reason.CANCELLED:
            raise Interrupted(text, hint="checkpoint kept; apply again to resume")
        raise JobFailed(text, hint=f"see `optjob logs {self.name}`")


def resolve_paths(spec: JobSpec, base: Path) -> dict[str, Any]:
    """The spec as a dict with local paths made absolute (relative to the spec's folder)."""
    d = spec.model_dump(mode="json")

    def absolute(value: str) -> str:
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    if d["model"].get("path"):
        d["model"]["path"] = absolute(d["model"]["path"])
    tok = d["model"].get("tokenizer", "builtin")
    if tok != "builtin" and (tok.startswith((".", "/", "~")) or (base / tok).exists()):
        d["model"]["tokenizer"] = absolute(tok)
    if spec.data.kind == "path":
        d["data"]["source"] = absolute(d["data"]["source"])
    return d


class Controller:
    """Runs one plan to its end. ``provider`` and ``store`` are injected (tests pass their own)."""

    def __init__(self, store: Store, provider: Provider, *, reporter: Reporter | None = None,
                 tick_s: float = 0.5, on_launch: Callable[[Handle, AttemptRow], None] | None = None,
                 rehearsal: Rehearsal | None = None, clock: Clock | None = None) -> None:
        self.store, self.provider = store, provider
        #: The store's clock unless told otherwise: records and waits read one time.
        self.clock = clock or store.clock
        self.rehearsal = rehearsal
        self.reporter = reporter or Silent()
        self.tick_s = tick_s
        self.on_launch = on_launch

    # ---- entry points ---------------------------------------------------------------------------

    def apply(self, plan: Plan, spec: JobSpec, *, detach: bool = False) -> Outcome:
        job_dir = paths.job_dir(spec.name)
        earlier = self.store.job(spec.name)
        if earlier is not None and earlier.provider == self.provider.name and not earlier.status.is_terminal() \
                and not owner_alive(earlier):
            # Its manager died: first record how its last attempt went (events, exit status, teardown),
            # as `optjob status` would; then attach if it still runs, or start again from its checkpoints.
            reconcile_orphaned(self.store, self.provider, earlier)
        job, attach = self.store.claim_job(
            spec.name, provider=plan.provider, job_dir=str(job_dir), spec_path=plan.spec_path,
            spec_json=spec.model_dump_json(), plan_json=plan.dumps(), owner_alive=self._alive,
        )
        if attach:
            self.reporter.status(f"{spec.name} is already running (pid {job.owner_pid}); following it")
            return self.follow(job.name)
        self._prepare(job_dir, spec, plan)
        return self._run(job, plan, detach=detach)

    def follow(self, name: str) -> Outcome:
        """Watch a job another process manages (or nobody does) until it ends."""
        seen = 0
        while True:
            job = self.store.job(name)
            assert job is not None
            for event_id, event in self.store.events(name, after_id=seen):
                seen = event_id
                self.reporter.event(event)
            if job.status.is_terminal():
                return self._outcome(job)
            if not owner_alive(job):
                reconcile_orphaned(self.store, self.provider, job)
            self.clock.sleep(self.tick_s)

    # ---- the loop -------------------------------------------------------------------------------

    def _alive(self, job: JobRow) -> bool:
        if owner_alive(job) and job.owner_pid != os.getpid():
            return True
        attempts = self.store.attempts(job.name, run=job.run)
        if attempts and attempts[-1].handle and not attempts[-1].ended_at:
            return not self.provider.poll(Handle.from_json(attempts[-1].handle)).state.is_terminal()
        return False

    def _prepare(self, job_dir: Path, spec: JobSpec, plan: Plan) -> None:
        job_dir.mkdir(parents=True, exist_ok=True)
        base = Path(plan.spec_path).parent if plan.spec_path else Path.cwd()
        if plan.spec_path and Path(plan.spec_path).is_file():
            shutil.copyfile(plan.spec_path, job_dir / "spec.yaml")
        # A node in the cloud keeps its own cache (this machine's path means nothing there).
        JobFile(spec=resolve_paths(spec, base), dry_run=plan.dry_run, device="cpu" if plan.local else "auto",
                cache_dir=str(paths.cache_dir()) if plan.local else None).write(job_dir)

    def _launch(self, job: JobRow, plan: Plan, budget: Budget) -> AttemptRow:
        attempt = self.store.add_attempt(job.name, run=job.run, provider=plan.provider, hourly_usd=plan.hourly_usd,
                                         nodes=plan.nodes, spot=plan.spot)
        spec = job.spec()
        env = {"OPTJOB_ATTEMPT": str(attempt.number), "OPTJOB_JOB": job.name}
        if not plan.local and spec.storage.artifacts:
            # The node pulls checkpoints from there before starting and pushes each one (steps.sync),
            # so the attempt after a preemption resumes on a fresh node. Never for local runs: a dry
            # run must not write into the real job's bucket.
            env["OPTJOB_STORAGE"] = spec.storage.artifacts
        left = seconds_left(budget, spent=self.store.spend(job.name), elapsed_s=job_elapsed_s(self.store, job.name),
                            usd_per_s=rate_usd_per_s(attempt), margin_s=STOP_MARGIN_S.get(plan.provider, 60.0))
        if left is not None:
            env["OPTJOB_DEADLINE"] = f"{self.clock.time() + max(0.0, left):.3f}"  # wall: the node compares
        self.store.update_job(job.name, status=JobStatus.LAUNCHING)
        self.reporter.status(f"launching attempt {attempt.number} on {plan.provider}")
        try:
            handle = self.provider.launch(LaunchRequest(spec=spec, job_dir=Path(job.job_dir),
                                                        attempt=attempt.number, env=env))
        except ProviderError as exc:  # the contract: nothing was left running
            self.store.update_attempt(attempt.id, status=AttemptState.FAILED, detail=exc.message[:2000],
                                      ended_at=self.clock.time(), released=1)
            finalize(self.store, self.provider, job, JobStatus.FAILED, Reason.FAILED, str(exc)[:2000])
            raise
        self.store.update_attempt(attempt.id, handle=handle.to_json(), status=AttemptState.RUNNING)
        attempt.handle_json = json.dumps(handle.to_json())
        self.store.update_job(job.name, status=JobStatus.RUNNING)
        if self.on_launch:
            self.on_launch(handle, attempt)
        if self.rehearsal:
            self.rehearsal.on_launch()
        return attempt

    def _run(self, job: JobRow, plan: Plan, *, detach: bool) -> Outcome:
        budget = Budget(plan.budget.max_usd, plan.budget.max_hours)
        margin = STOP_MARGIN_S.get(plan.provider, 60.0)
        stop_reason: Reason | None = None
        try:
            spent, elapsed = self.store.spend(job.name), job_elapsed_s(self.store, job.name)
            if why := over_budget(budget, spent=spent, elapsed_s=elapsed, usd_per_s=0.0, margin_s=0.0):
                finalize(self.store, self.provider, job, JobStatus.STOPPED, Reason.BUDGET, why)
                return self._outcome(self.store.job(job.name) or job)
            attempt = self._launch(job, plan, budget)
            if detach:
                self.store.update_job(job.name, owner_pid=None)
                return self._outcome(self.store.job(job.name) or job)
            recoveries = 0
            while True:
                handle = Handle.from_json(attempt.handle or {})
                obs = observe(self.store, self.provider, job, attempt)
                for event in obs.events:
                    self.reporter.event(event)
                if self.rehearsal and not obs.poll.state.is_terminal() and self.rehearsal.observe(obs.events):
                    self._rehearse_kill(attempt, plan)
                    continue
                if obs.poll.state.is_terminal():
                    if obs.poll.state in (AttemptState.PREEMPTED, AttemptState.LOST) and stop_reason is None \
                            and recoveries < MAX_RECOVERIES:
                        recoveries += 1
                        self.store.update_job(job.name, status=JobStatus.RECOVERING)
                        self.clock.sleep(min(60.0, self.tick_s * 2**recoveries))  # back off a provider that flaps
                        self.reporter.status(
                            f"attempt {attempt.number} {obs.poll.state.value}; resuming from checkpoint")
                        attempt = self._launch(job, plan, budget)
                        continue
                    status, reason = final_status(obs.poll)
                    if stop_reason is not None and status != JobStatus.SUCCEEDED:
                        status, reason = JobStatus.STOPPED, stop_reason
                    return self._finish(job, status, reason, plan)
                if stop_reason is None and (why := over_budget(
                        budget, spent=obs.spent, elapsed_s=job_elapsed_s(self.store, job.name),
                        usd_per_s=rate_usd_per_s(attempt), margin_s=margin)):
                    stop_reason = Reason.BUDGET
                    self.reporter.status(f"budget: {why}; checkpointing and stopping")
                    self.store.update_job(job.name, status=JobStatus.STOPPING, message=why)
                    self.provider.stop(handle)
                self.provider.wait(handle, self.tick_s)
        except KeyboardInterrupt:
            return self._interrupt(job)

    def _rehearse_kill(self, attempt: AttemptRow, plan: Plan) -> None:
        assert self.rehearsal is not None
        kill_fn = getattr(self.provider, "kill", None)
        if kill_fn is None:
            raise UsageError(
                f"preemption rehearsal needs a provider that can kill its workload ({plan.provider} cannot)")
        spec = self.store.job(attempt.job_name).spec()  # type: ignore[union-attr]
        every = {i: s.checkpoint_every for i, s in enumerate(spec.pipeline) if isinstance(s, TrainOptions)}
        kill = self.rehearsal.record(attempt.number, every)
        self.reporter.status(kill.describe())
        handle = Handle.from_json(attempt.handle or {})
        kill_fn(handle)
        deadline = self.clock.monotonic() + 30
        while self.clock.monotonic() < deadline and not self.provider.poll(handle).state.is_terminal():
            self.clock.sleep(0.05)
        attempt.detail = kill.describe()
        self.store.update_attempt(attempt.id, detail=attempt.detail)

    def _interrupt(self, job: JobRow) -> Outcome:
        self.reporter.status("interrupted: checkpointing and stopping (Ctrl-C again to kill)")
        self.store.update_job(job.name, status=JobStatus.STOPPING, message="interrupted")
        attempts = self.store.attempts(job.name, run=job.run)
        if attempts and attempts[-1].handle:
            attempt = attempts[-1]
            handle = Handle.from_json(attempt.handle or {})
            self.provider.stop(handle)
            try:
                deadline = self.clock.monotonic() + 120
                while self.clock.monotonic() < deadline:
                    if observe(self.store, self.provider, job, attempt).poll.state.is_terminal():
                        break
                    self.clock.sleep(0.2)
            except KeyboardInterrupt:
                pass
        return self._finish(job, JobStatus.STOPPED, Reason.CANCELLED)

    def _finish(self, job: JobRow, status: JobStatus, reason: Reason, plan: Plan | None = None) -> Outcome:
        self.reporter.status(f"finishing: {status.value} ({reason.value}); teardown per policy")
        finalize(self.store, self.provider, job, status, reason)
        if plan is not None and status == JobStatus.SUCCEEDED:
            record_calibration(self.store, job.name, plan)
        return self._outcome(self.store.job(job.name) or job)

    def _outcome(self, job: JobRow) -> Outcome:
        return Outcome(job.name, job.status, job.reason, self.store.spend(job.name),
                       len(self.store.attempts(job.name)), Path(job.job_dir), job.message)
