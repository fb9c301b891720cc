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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from optjob.providers.base import AttemptState, Handle, LaunchRequest, Poll, Provider, TransientProviderError
from optjob.specs import JobSpec
from optjob.specs.errors import BudgetExceeded, Interrupted, JobFailed, ProviderError, UsageError
from optjob.specs.steps import TrainOptions
from optjob.steps.layout import JobFile, kept_progress

from . import paths
from .clock import Clock
from .job_states import JobStatus, Reason
from .meter import (
    Budget,
    checkpoint_interval_s,
    grace_s,
    job_elapsed_s,
    over_budget,
    rate_usd_per_s,
    seconds_left,
    slowest_checkpoint_s,
    stop_margin_s,
    teardown_margin_s,
)
from .outcome import Unsettled, record_settled, settle
from .plan import Plan
from .planner import resolved_spec
from .pricing.calibration_store import record_calibration
from .reconcile import (
    checkpoint_seconds,
    enforce_stop,
    finalize,
    observe,
    owner_alive,
    reconcile_orphaned,
    request_stop,
    stopped_status,
)
from .rehearsal import Rehearsal
from .render import job_status_text
from .store import AttemptRow, JobRow, Store, folder_write_error

MAX_RECOVERIES = 10
#: While the provider cannot say what an attempt does (``UNKNOWN``) or fails transiently, the loop
#: waits longer each time, up to this; every ``SETTLE_EVERY`` such ticks it looks for a durable
#: record that the work finished (``outcome.settle``), as it always does before a relaunch.
UNKNOWN_MAX_WAIT_S = 60.0
SETTLE_EVERY = 3
#: A record that cannot be read this many times in a row (storage unreachable, no credentials for
#: it) is given up on: the loop goes on as if there were none.
UNREADABLE_GIVE_UP = 5


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
    #: Nothing was run: the job had finished with this very spec (no new attempt, no charge).
    up_to_date: bool = False

    def raise_for_status(self) -> None:
        if self.reason == Reason.SUCCEEDED or not self.status.is_terminal():
            return
        reason = self.reason.value if self.reason else "?"
        text = f"job {self.name} {self.status.value} ({reason})" + (f": {self.message}" if self.message else "")
        kept = kept_progress(self.job_dir)
        resume = (f"kept: {kept}" if kept else "nothing saved yet: a new apply starts from the beginning")
        if self.reason == Reason.BUDGET:
            raise BudgetExceeded(text, hint=f"{resume}; apply again with a larger budget to resume")
        if self.reason == Reason.CANCELLED:
            raise Interrupted(text, hint=f"{resume}; apply again to resume")
        raise JobFailed(text, hint=f"see `optjob logs {self.name}`")


def resolve_paths(spec: JobSpec, base: Path) -> dict[str, Any]:
    """The spec as a dict with local paths made absolute (relative to the spec's folder)."""
    d = spec.model_dump(mode="json")
    for manager_only in ("notify", "tracking"):  # the manager's own (a webhook URL is often a secret)
        d.pop(manager_only, None)

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
    from optjob.specs.evaltasks import is_task_file

    pipelines = [d["steps"], *(v for e in d["steps"] if "compare" in e for v in (e["compare"] or {}).values())]
    for entry in (e for steps in pipelines for e in steps):
        if (entry.get("evaluate") or {}).get("tasks"):  # lm-eval task files (evaluate.tasks)
            entry["evaluate"]["tasks"] = [absolute(t) if is_task_file(t) else t for t in entry["evaluate"]["tasks"]]
    return d


def up_to_date(job: JobRow | None, spec: JobSpec, plan: Plan) -> bool:
    """Whether applying ``spec`` again would only redo what already finished: the job succeeded with
    exactly this spec, on the same provider, and its results are still in its folder. (Change a field,
    or remove the folder, to run again; `optjob down NAME` does not forget a finished job.)"""
    if job is None or job.status != JobStatus.SUCCEEDED or plan.dry_run or job.provider != plan.provider:
        return False
    from optjob.steps.layout import RESULTS_FILE

    return job.spec_json == spec.model_dump_json() and (Path(job.job_dir) / RESULTS_FILE).is_file()


def max_seconds(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


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
        self._unreadable = 0  # durable-record reads in a row that failed (see ``_outcome_of``)

    # ---- entry points ---------------------------------------------------------------------------

    def apply(self, plan: Plan, spec: JobSpec, *, detach: bool = False) -> Outcome:
        job_dir = paths.dry_run_dir(spec.name) if plan.dry_run else paths.job_dir(spec.name)
        earlier = self.store.job(spec.name)
        if up_to_date(earlier, spec, plan):
            assert earlier is not None
            self.reporter.status(f"nothing to do ({spec.name} is up to date: it finished with this spec)")
            return replace(self._outcome(earlier), up_to_date=True)
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
        try:
            self._prepare(job_dir, spec, plan)
        except BaseException as exc:  # nothing ran: a finished job keeps its record; a new one says why
            if not self.store.restore_previous_run(job.name) and not self.store.attempts(job.name, run=job.run):
                finalize(self.store, self.provider, job, JobStatus.FAILED, Reason.FAILED, str(exc)[:2000])
            raise
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
                try:
                    reconcile_orphaned(self.store, self.provider, job, thorough=True)
                except TransientProviderError as exc:  # look again next tick
                    self.reporter.status(f"{exc.message}; asking again")
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
        base = Path(plan.spec_path).parent if plan.spec_path else Path.cwd()
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            copy = job_dir / "spec.yaml"
            # Applying the job folder's own spec.yaml: it is already there.
            if plan.spec_path and Path(plan.spec_path).is_file() \
                    and not (copy.exists() and os.path.samefile(plan.spec_path, copy)):
                shutil.copyfile(plan.spec_path, copy)
            # A node in the cloud keeps its own cache (this machine's path means nothing there).
            # The node runs what the plan decided (e.g. FSDP where the model does not fit one GPU).
            JobFile(spec=resolve_paths(resolved_spec(spec, plan), base), dry_run=plan.dry_run,
                    device="cpu" if plan.local else "auto",
                    cache_dir=str(paths.cache_dir()) if plan.local else None).write(job_dir)
        except OSError as exc:
            raise folder_write_error(job_dir, exc) from None

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
                            usd_per_s=rate_usd_per_s(attempt), margin_s=teardown_margin_s(plan.provider, spec))
        if left is not None:
            env["OPTJOB_DEADLINE"] = f"{self.clock.time() + max(0.0, left):.3f}"  # wall: the node compares
        self.store.update_job(job.name, status=JobStatus.LAUNCHING)
        self.reporter.status(f"launching attempt {attempt.number} on {plan.provider}")
        request = LaunchRequest(spec=spec, job_dir=Path(job.job_dir), attempt=attempt.number, env=env)
        tries = 0
        while True:
            try:
                handle = self.provider.launch(request)
                break
            except TransientProviderError as exc:  # launch is idempotent per attempt: again adopts what was sent
                tries += 1
                self.reporter.status(f"launching attempt {attempt.number}: {exc.message}; trying again")
                self.clock.sleep(self._backoff(tries))
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

    def _backoff(self, tries: int) -> float:
        return min(UNKNOWN_MAX_WAIT_S, self.tick_s * 2 ** min(tries, 16))

    def _outcome_of(self, job: JobRow, attempt: AttemptRow, poll: Poll, unsure: int) -> Poll | None:
        """Gone is not "not finished": before any relaunch (``PREEMPTED``, ``LOST``), and every
        ``SETTLE_EVERY`` ticks the provider cannot say (``UNKNOWN``), look for a durable record that the
        work finished. Its terminal poll (written on the attempt), or None. Raises ``Unsettled`` when a
        record may exist but cannot be read now: then wait, never relaunch."""
        due = poll.state in (AttemptState.PREEMPTED, AttemptState.LOST) or (
            poll.state is AttemptState.UNKNOWN and (unsure + 1) % SETTLE_EVERY == 0)
        if not due:
            return None
        try:
            done = settle(self.store, self.provider, job, attempt)
        except (Unsettled, TransientProviderError) as exc:
            self._unreadable += 1
            if self._unreadable < UNREADABLE_GIVE_UP:
                raise Unsettled(exc.message) from exc
            self.reporter.status(f"attempt {attempt.number}: {exc.message}; going on without that record")
            done = None
        self._unreadable = 0
        if done is not None:
            record_settled(self.store, attempt, done)
            self.reporter.status(f"attempt {attempt.number} {done.state.value}: {done.detail}")
        return done

    def _run(self, job: JobRow, plan: Plan, *, detach: bool) -> Outcome:
        budget = Budget(plan.budget.max_usd, plan.budget.max_hours)
        stop_reason: Reason | None = None
        checkpoint_s = checkpoint_seconds(self.store, job)  # measured by earlier attempts, if any
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
            unsure = 0  # ticks in a row the provider could not say (UNKNOWN, or a transient error)
            while True:
                handle = Handle.from_json(attempt.handle or {})
                try:
                    obs = observe(self.store, self.provider, job, attempt)
                    for event in obs.events:
                        self.reporter.event(event)
                    done = self._outcome_of(job, attempt, obs.poll, unsure)
                except (TransientProviderError, Unsettled) as exc:  # never the end of the manager: look again
                    unsure += 1
                    self.reporter.status(f"attempt {attempt.number}: {exc.message}; asking again")
                    self.clock.sleep(self._backoff(unsure))
                    continue
                if done is not None:  # it finished while the provider could not see it
                    status, reason = stopped_status(self.store.job(job.name) or job, done)
                    return self._finish(job, status, reason, plan)
                if obs.poll.state is AttemptState.UNKNOWN:
                    unsure += 1
                    if unsure == 1:
                        self.reporter.status(
                            f"attempt {attempt.number}: state unknown ({obs.poll.detail}); asking again")
                else:
                    unsure = 0
                if self.rehearsal and not obs.poll.state.is_terminal() and self.rehearsal.observe(obs.events):
                    self._rehearse_kill(attempt, plan)
                    continue
                if obs.poll.state.is_terminal():
                    # A rehearsal's own kill is no flapping provider: not counted, no backoff.
                    rehearsed = self.rehearsal is not None and self.rehearsal.killed(attempt.number)
                    if obs.poll.state in (AttemptState.PREEMPTED, AttemptState.LOST) and stop_reason is None \
                            and (rehearsed or recoveries < MAX_RECOVERIES):
                        if not rehearsed and (why := self._too_poor_to_resume(job, attempt, budget)):
                            self.store.update_job(job.name, message=why)
                            return self._finish(job, JobStatus.STOPPED, Reason.BUDGET, plan)
                        self.store.update_job(job.name, status=JobStatus.RECOVERING)
                        if not rehearsed:
                            recoveries += 1
                            self.clock.sleep(min(60.0, self.tick_s * 2**recoveries))  # back off a provider that flaps
                        self.reporter.status(
                            f"attempt {attempt.number} {obs.poll.state.value}; resuming from checkpoint")
                        attempt = self._launch(job, plan, budget)
                        continue
                    status, reason = stopped_status(self.store.job(job.name) or job, obs.poll)
                    return self._finish(job, status, reason, plan)
                checkpoint_s = max_seconds(checkpoint_s, slowest_checkpoint_s(obs.events))
                if done := enforce_stop(self.store, self.provider, job, obs, checkpoint_s):
                    stop_reason = stop_reason or Reason.BUDGET
                    self.reporter.status(done)
                    continue  # look again at once: a killed attempt has ended
                self.provider.wait(handle, self._backoff(unsure) if unsure else self.tick_s)
        except KeyboardInterrupt:
            return self._interrupt(job)

    def _too_poor_to_resume(self, job: JobRow, attempt: AttemptRow, budget: Budget) -> str | None:
        """Why relaunching after a preemption would only spend money: the budget left does not cover
        one checkpoint interval (measured) beyond the stop margin, so the next attempt could not save
        any new progress. None when it does, or when no interval was measured yet."""
        interval = checkpoint_interval_s([e for _, e in self.store.events(job.name, kinds=("checkpoint",))])
        if interval is None:
            return None
        left = seconds_left(budget, spent=self.store.spend(job.name), elapsed_s=job_elapsed_s(self.store, job.name),
                            usd_per_s=rate_usd_per_s(attempt),
                            margin_s=stop_margin_s(self.provider.name, checkpoint_seconds(self.store, job), job.spec()))
        if left is None or left >= interval:
            return None
        return (f"not resuming after the preemption: the budget left covers {max(0.0, left):.0f}s of work, less "
                f"than one checkpoint interval ({interval:.0f}s), so nothing new could be saved")

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
        attempts = self.store.attempts(job.name, run=job.run)
        if not (attempts and attempts[-1].handle):
            self.store.update_job(job.name, status=JobStatus.STOPPING, message="interrupted")
        else:
            attempt = attempts[-1]
            handle = Handle.from_json(attempt.handle or {})
            request_stop(self.store, self.provider, job, handle, Reason.CANCELLED, "interrupted")
            try:  # then the finalizer's teardown kills whatever did not stop within the grace
                deadline = (self.clock.monotonic() + grace_s(checkpoint_seconds(self.store, job))
                            + self.provider.stop_latency_s(handle))  # a cloud node reads its stop flag
                while self.clock.monotonic() < deadline:
                    if observe(self.store, self.provider, job, attempt).poll.state.is_terminal():
                        break
                    self.clock.sleep(0.2)
            except KeyboardInterrupt:
                pass
        return self._finish(job, JobStatus.STOPPED, Reason.CANCELLED)

    def _finish(self, job: JobRow, status: JobStatus, reason: Reason, plan: Plan | None = None) -> Outcome:
        self.reporter.status(f"finishing: {job_status_text(status.value, reason.value)}; teardown per policy")
        finalize(self.store, self.provider, job, status, reason)
        if plan is not None and status == JobStatus.SUCCEEDED:
            record_calibration(self.store, job.name, plan)
        return self._outcome(self.store.job(job.name) or job)

    def _outcome(self, job: JobRow) -> Outcome:
        return Outcome(job.name, job.status, job.reason, self.store.spend(job.name),
                       len(self.store.attempts(job.name)), Path(job.job_dir), job.message)
