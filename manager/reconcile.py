"""Level-based reconcile: read the actual state of an attempt, write it down, act.

``observe`` is called by the apply loop every tick and by ``optjob status`` for
jobs whose manager is gone: it ingests new events from the attempt's log,
polls the provider, meters spend, and returns what it saw. ``finalize`` is the
finalizer: it releases resources (per the teardown policy) before a job is
marked finished, and only marks them released once the provider confirms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optjob.providers.base import AttemptState, Handle, Poll, Provider
from optjob.providers.local import pid_alive
from optjob.steps.events import parse_event
from optjob.steps.exit_codes import EXIT_DEADLINE

from .job_states import STOP_REQUESTED, JobStatus, Reason
from .meter import (
    Budget,
    grace_s,
    meter,
    over_budget,
    rate_usd_per_s,
    reprice,
    slowest_checkpoint_s,
    stop_margin_s,
    teardown_margin_s,
)
from .outcome import Unsettled, record_settled, settle
from .pricing.launched import Pricer, default_pricer
from .store import AttemptRow, JobRow, Store

#: How long ``status`` waits for an attempt it just killed (or asked to stop) to end.
KILL_WAIT_S = 5.0


@dataclass
class Observation:
    attempt: AttemptRow
    poll: Poll
    events: list[dict[str, Any]] = field(default_factory=list)
    spent: float = 0.0


def ingest(store: Store, provider: Provider, job: JobRow, attempt: AttemptRow, handle: Handle) -> list[dict[str, Any]]:
    """Read the attempt's new log lines and store their events (atomically with the offset)."""
    text, offset = provider.read_log(handle, attempt.log_offset)
    if offset == attempt.log_offset:
        return []
    events = [e for e in map(parse_event, text.splitlines()) if e is not None]
    update: dict[str, Any] = {}
    for e in events:
        e.setdefault("attempt", attempt.number)
        kind = e["event"]
        if kind == "step_started":
            update.update(step_index=e.get("index"), step_kind=e.get("kind"))
        elif kind in ("progress", "metrics", "trial"):
            update["progress_json"] = json.dumps(e)
        elif kind == "error":
            update["message"] = str(e.get("message", ""))[:2000]
        elif kind == "stopped":
            update["message"] = f"stopped: {e.get('reason')}"
    if attempt.status == AttemptState.LAUNCHING.value and events:
        update["status"] = JobStatus.RUNNING.value
    if not store.add_events(job.name, attempt.number, events, log_offset=offset, attempt_id=attempt.id,
                            job_update=update, expect_offset=attempt.log_offset):
        # Another process (a concurrent `status`) stored these bytes first: catch up, store nothing twice.
        attempt.log_offset = store.log_offset(attempt.id)
        return []
    attempt.log_offset = offset
    return events


def observe(store: Store, provider: Provider, job: JobRow, attempt: AttemptRow,
            pricer: Pricer | None = None) -> Observation:
    handle = Handle.from_json(attempt.handle or {})
    events = ingest(store, provider, job, attempt, handle)
    poll = provider.poll(handle)
    # Read the log once more after a terminal poll: the last lines may have landed in between.
    if poll.state.is_terminal():
        events += ingest(store, provider, job, attempt, handle)
    if poll.state.is_terminal() and attempt.ended_at is None:
        # The provider's own record of the end when it has one: a manager that comes back (or a
        # `status`) an hour later must not date the end, or bill the hour, to its own clock.
        now = store.clock.time()
        ended = min(poll.ended_at, now) if poll.ended_at else now
        ended = max(ended, attempt.started_at)
        store.update_attempt(attempt.id, status=poll.state, exit_code=poll.exit_code,
                             detail=attempt.detail or poll.detail, ended_at=ended)
        attempt.status, attempt.exit_code, attempt.ended_at = poll.state.value, poll.exit_code, ended
    elif not poll.state.is_terminal() and attempt.status != poll.state.value:
        store.update_attempt(attempt.id, status=poll.state)
        _show_unknown(store, job, poll, was=attempt.status)
        attempt.status = poll.state.value
    _note_billing(store, provider, attempt, poll, pricer)
    spent = meter(store, attempt, until=attempt.ended_at if attempt.released or _billed_to_end(provider, attempt)
                  else None, from_launch=provider.bills_from_launch)
    return Observation(attempt, poll, events, spent)


def _note_billing(store: Store, provider: Provider, attempt: AttemptRow, poll: Poll, pricer: Pricer | None) -> None:
    """What the meter needs from this poll, written on the attempt: when its node came to exist
    (billing starts there; a provider that bills from launch starts at the attempt's start), when the
    provider's own record says its resources were gone (billing ends there, however late this look
    is), and the price of what runs now (``meter.reprice``)."""
    now, update = store.clock.time(), {}
    if attempt.billed_from is None and poll.placement is not None:
        # Priced before billing starts: time before this look (a late manager's) is billed at the
        # launched price, not the plan's.
        reprice(store, attempt, poll.placement, poll.overhead, pricer or default_pricer(),
                from_launch=provider.bills_from_launch)
    if attempt.billed_from is None:
        since = None
        if provider.bills_from_launch:
            since = attempt.started_at
        elif poll.node_since is not None:
            since = poll.node_since
        elif poll.state.is_terminal() and not poll.no_node:
            since = attempt.started_at  # it ran, and nothing says since when: from its launch
        if since is not None:
            update["billed_from"] = attempt.billed_from = max(_billing_floor(store, attempt, provider),
                                                              min(since, now))
    if poll.gone_at is not None and attempt.gone_at is None and (
            poll.state.is_terminal() or poll.state is AttemptState.PREEMPTED):
        floor = attempt.billed_from if attempt.billed_from is not None else attempt.started_at
        update["gone_at"] = attempt.gone_at = max(floor, min(poll.gone_at, now))
    if update:
        store.update_attempt(attempt.id, **update)
    if poll.placement is not None or poll.overhead is not None:
        reprice(store, attempt, poll.placement, poll.overhead, pricer or default_pricer(),
                from_launch=provider.bills_from_launch)


def _billing_floor(store: Store, attempt: AttemptRow, provider: Provider) -> float:
    """The earliest moment the attempt's node time can start: its launch; or, where the provider says
    when its node came to exist (a SkyPilot run adopted by a manager that came back late, which may
    have started before this attempt's row), right where the attempt before it stopped billing, so
    the run's time before this look is billed once, by this attempt."""
    if provider.bills_from_launch:
        return attempt.started_at
    before = [a for a in store.attempts(attempt.job_name, run=attempt.run) if a.number < attempt.number]
    if before and before[-1].gone_at is not None:
        return min(attempt.started_at, before[-1].gone_at)
    return attempt.started_at


def _show_unknown(store: Store, job: JobRow, poll: Poll, *, was: str) -> None:
    """The job reads ``unknown`` while the provider cannot say what its attempt does (``status`` shows
    it), and ``running`` again once it can; a job stopping stays ``stopping``."""
    current = store.job(job.name)
    if current is None:
        return
    if poll.state is AttemptState.UNKNOWN and current.status in (JobStatus.RUNNING, JobStatus.LAUNCHING):
        store.update_job(job.name, status=JobStatus.UNKNOWN, message=f"{poll.detail} (asking again)"[:2000])
    elif was == AttemptState.UNKNOWN.value and current.status is JobStatus.UNKNOWN:
        store.update_job(job.name, status=JobStatus.RUNNING, message=None)


def _billed_to_end(provider: Provider, attempt: AttemptRow) -> bool:
    """The attempt has ended and its provider charges nothing after that (local): spend stops there."""
    return attempt.ended_at is not None and not provider.bills_until_teardown


def budget_of(job: JobRow) -> Budget:
    """The caps the job was applied with (from its stored plan)."""
    b = job.plan.get("budget") or {}
    return Budget(b.get("max_usd"), b.get("max_hours"))


def checkpoint_seconds(store: Store, job: JobRow) -> float | None:
    """The slowest checkpoint write this job's workload has reported (None before the first)."""
    return slowest_checkpoint_s([e for _, e in store.events(job.name, kinds=("checkpoint",))])


def request_stop(store: Store, provider: Provider, job: JobRow, handle: Handle, reason: Reason, why: str) -> None:
    """Ask the workload to checkpoint and stop, and write down when and why: whoever looks next
    (this manager, a second one, ``status``, ``list``) escalates from there."""
    store.update_job(job.name, status=JobStatus.STOPPING, reason=reason, message=why,
                     stop_requested_at=store.clock.time())
    # The manager's own record of why this attempt was asked to stop (the report's "cancelled" or
    # "stopped at the budget cap", for this run and every later one).
    store.add_events(job.name, handle.attempt, [{"event": STOP_REQUESTED, "ts": store.clock.time(),
                                                 "attempt": handle.attempt, "reason": reason.value, "why": why}])
    if provider.reads_stop_flag(handle):  # the node watches its storage: ask there, cancel at the escalation
        from .stop_flag import write_stop_flag

        if write_stop_flag(store, job, handle.attempt):
            handle.data["stop_flag"] = True
    provider.stop(handle)


def enforce_stop(store: Store, provider: Provider, job: JobRow, obs: Observation,
                 checkpoint_s: float | None = None) -> str | None:
    """Make the budget cap hold whoever is looking, level-based: a job past its stop point is asked
    to stop; one asked to stop that still runs once its grace has passed (SIGTERM ignored, a phase
    that never checks the flag), or whose money is at hand, is killed. Returns what was done.

    The stop point leaves one checkpoint write plus the teardown margin before the cap; the kill
    comes at the latest the teardown margin before it."""
    if obs.poll.state.is_terminal() or not obs.attempt.handle:
        return None
    current = store.job(job.name) or job
    handle = Handle.from_json(obs.attempt.handle)
    budget, rate = budget_of(current), rate_usd_per_s(obs.attempt)
    elapsed = store.elapsed_seconds(job.name)
    if checkpoint_s is None:
        checkpoint_s = checkpoint_seconds(store, current)
    spec = _spec_or_none(current)
    if current.stop_requested_at is None:
        why = over_budget(budget, spent=obs.spent, elapsed_s=elapsed, usd_per_s=rate,
                          margin_s=stop_margin_s(provider.name, checkpoint_s, spec) + provider.stop_latency_s(handle))
        if why is None:
            return None
        request_stop(store, provider, current, handle, Reason.BUDGET, why)
        return f"budget: {why}; checkpointing and stopping"
    at_cap = over_budget(budget, spent=obs.spent, elapsed_s=elapsed, usd_per_s=rate,
                         margin_s=teardown_margin_s(provider.name, spec))
    grace = grace_s(checkpoint_s) + provider.stop_latency_s(handle)
    waited = store.clock.time() - current.stop_requested_at
    if at_cap is None and waited < grace:
        return None
    provider.kill(handle)
    why = (f"{at_cap}: killed" if at_cap is not None
           else f"still running {waited:.0f}s after the stop request (grace {grace:.0f}s): killed")
    store.update_job(job.name, message=why)
    return why


def _spec_or_none(job: JobRow) -> Any:
    try:
        return job.spec()
    except Exception:  # a record this version cannot read: the provider's plain margin
        return None


def release(store: Store, provider: Provider, attempt: AttemptRow) -> None:
    """Tear the attempt down; mark it released only when the provider confirms.

    One call: retrying is the provider's, at its own boundary and within its own budget (see
    ``Provider.teardown``). A ``TeardownError`` leaves the attempt unreleased and billed, for the
    next ``status``, ``down`` or ``apply`` to try again."""
    if not attempt.released and not attempt.handle and attempt.ended_at is None \
            and (job := store.job(attempt.job_name)) is not None \
            and (adopted := provider.adopt(Path(job.job_dir), attempt.number)) is not None:
        # The manager died inside launch (``down`` before any ``status``): release what it started.
        store.update_attempt(attempt.id, handle=adopted.to_json())
        attempt.handle_json = json.dumps(adopted.to_json())
    if attempt.released or not attempt.handle:
        return
    provider.teardown(Handle.from_json(attempt.handle))
    now = store.clock.time()
    # Billing runs until teardown is confirmed — except for an attempt a later one replaced (a
    # preemption): the later attempt bills the resources from its own start, so this one stops
    # at its end instead of overlapping it.
    superseded = attempt.ended_at is not None and any(
        a.number > attempt.number for a in store.attempts(attempt.job_name, run=attempt.run))
    meter(store, attempt, until=attempt.ended_at if superseded or _billed_to_end(provider, attempt) else now,
          from_launch=provider.bills_from_launch or (attempt.ended_at is None and attempt.status != "launching"))
    store.update_attempt(attempt.id, released=1, ended_at=attempt.ended_at or now)
    attempt.released = 1


def wants_teardown(policy: str, status: JobStatus) -> bool:
    return policy == "always" or (policy == "on_success" and status == JobStatus.SUCCEEDED)


def final_status(poll: Poll) -> tuple[JobStatus, Reason]:
    """The job's terminal status when its last attempt ended as ``poll`` says."""
    if poll.state == AttemptState.SUCCEEDED:
        return JobStatus.SUCCEEDED, Reason.SUCCEEDED
    if poll.state == AttemptState.STOPPED:
        return JobStatus.STOPPED, Reason.BUDGET if poll.exit_code == EXIT_DEADLINE else Reason.CANCELLED
    if poll.state in (AttemptState.PREEMPTED, AttemptState.LOST):
        return JobStatus.STOPPED, Reason.PREEMPTED
    return JobStatus.FAILED, Reason.FAILED


def finalize(store: Store, provider: Provider, job: JobRow, status: JobStatus, reason: Reason,
             message: str | None = None) -> None:
    """The finalizer: release resources per policy, then record the terminal status."""
    policy = json.loads(job.spec_json).get("teardown", "always")
    for attempt in store.attempts(job.name, run=job.run):
        if wants_teardown(policy, status) or not attempt.handle:
            release(store, provider, attempt)
    update: dict[str, Any] = {"status": status, "reason": reason, "ended_at": store.clock.time(), "owner_pid": None}
    if message is not None:
        update["message"] = message
    store.update_job(job.name, **update)


def owner_alive(job: JobRow) -> bool:
    """Whether the process that claimed ``job`` still runs (same machine)."""
    return bool(job.owner_pid) and pid_alive(job.owner_pid)  # type: ignore[arg-type]


def reconcile_orphaned(store: Store, provider: Provider, job: JobRow, *, thorough: bool = False) -> JobRow:
    """For a job nobody manages (manager killed, or --detach): catch up with the truth.

    Ingests events, and when the last attempt has ended, finalizes the job — as the durable record
    says when there is one (``outcome.settle``: a job that finished while nobody looked is finished,
    not lost). ``thorough``: also ask the provider's own record when it cannot say now (slow: SkyPilot
    restarts its jobs controller), as a manager following the job does; a plain ``status`` does not."""
    if job.status.is_terminal() or owner_alive(job):
        return job
    attempts = store.attempts(job.name, run=job.run)
    if not attempts:
        if store.restore_previous_run(job.name):  # nothing ran: a finished job keeps its last run's record
            return store.job(job.name) or job
        finalize(store, provider, job, JobStatus.FAILED, Reason.FAILED, "the manager stopped before launching")
        return store.job(job.name) or job
    if not attempts[-1].handle:  # the manager died inside launch: adopt what it submitted, if anything
        adopted = provider.adopt(Path(job.job_dir), attempts[-1].number)
        if adopted is not None:
            store.update_attempt(attempts[-1].id, handle=adopted.to_json(), status=AttemptState.RUNNING)
            store.update_job(job.name, status=JobStatus.RUNNING)  # as the launch would have (poll corrects it)
            attempts = store.attempts(job.name, run=job.run)
    if not attempts[-1].handle:  # nothing came of it
        last = attempts[-1]
        store.update_attempt(last.id, status=AttemptState.LOST, ended_at=last.ended_at or store.clock.time(),
                             detail="the manager stopped while launching this attempt")
        finalize(store, provider, job, JobStatus.STOPPED, Reason.CANCELLED,
                 "the manager stopped while launching; `optjob list` flags anything left behind")
        return store.job(job.name) or job
    obs = observe(store, provider, job, attempts[-1])
    if enforce_stop(store, provider, job, obs):  # asked to stop, or killed: look again once it had a moment
        provider.wait(Handle.from_json(attempts[-1].handle), KILL_WAIT_S)
        obs = observe(store, provider, job, attempts[-1])
    if obs.poll.state in (AttemptState.PREEMPTED, AttemptState.LOST, AttemptState.UNKNOWN):
        try:
            done = settle(store, provider, job, obs.attempt,
                          ask_provider=thorough or obs.poll.state is not AttemptState.UNKNOWN)
        except Unsettled:
            return store.job(job.name) or job  # a record may say it finished: decide when it can be read
        if done is not None:
            record_settled(store, obs.attempt, done)
            obs.poll = done
    if obs.poll.state.is_terminal():
        status, reason = stopped_status(store.job(job.name) or job, obs.poll)
        finalize(store, provider, job, status, reason,
                 "resume with `optjob apply` again" if reason == Reason.PREEMPTED else None)
    return store.job(job.name) or job


def stopped_status(job: JobRow, poll: Poll) -> tuple[JobStatus, Reason]:
    """``final_status``, except that a job asked to stop ends stopped for the reason it was asked
    (budget, cancel), however its workload ended (a kill reads as preempted or lost)."""
    status, reason = final_status(poll)
    if job.stop_requested_at is not None and status != JobStatus.SUCCEEDED:
        return JobStatus.STOPPED, job.reason or Reason.CANCELLED
    return status, reason
