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
from typing import Any

from optjob.providers.base import AttemptState, Handle, Poll, Provider
from optjob.providers.local import pid_alive
from optjob.steps.events import parse_event
from optjob.steps.exit_codes import EXIT_DEADLINE

from .job_states import JobStatus, Reason
from .meter import meter
from .store import AttemptRow, JobRow, Store


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


def observe(store: Store, provider: Provider, job: JobRow, attempt: AttemptRow) -> Observation:
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
        attempt.status = poll.state.value
    spent = meter(store, attempt, until=attempt.ended_at if attempt.released or _billed_to_end(provider, attempt)
                  else None)
    return Observation(attempt, poll, events, spent)


def _billed_to_end(provider: Provider, attempt: AttemptRow) -> bool:
    """The attempt has ended and its provider charges nothing after that (local): spend stops there."""
    return attempt.ended_at is not None and not provider.bills_until_teardown


def release(store: Store, provider: Provider, attempt: AttemptRow) -> None:
    """Tear the attempt down; mark it released only when the provider confirms.

    One call: retrying is the provider's, at its own boundary and within its own budget (see
    ``Provider.teardown``). A ``TeardownError`` leaves the attempt unreleased and billed, for the
    next ``status``, ``down`` or ``apply`` to try again."""
    if attempt.released or not attempt.handle:
        return
    provider.teardown(Handle.from_json(attempt.handle))
    now = store.clock.time()
    # Billing runs until teardown is confirmed — except for an attempt a later one replaced (a
    # preemption): the later attempt bills the resources from its own start, so this one stops
    # at its end instead of overlapping it.
    superseded = attempt.ended_at is not None and any(
        a.number > attempt.number for a in store.attempts(attempt.job_name, run=attempt.run))
    meter(store, attempt, until=attempt.ended_at if superseded or _billed_to_end(provider, attempt) else now)
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


def reconcile_orphaned(store: Store, provider: Provider, job: JobRow) -> JobRow:
    """For a job nobody manages (manager killed, or --detach): catch up with the truth.

    Ingests events, and when the last attempt has ended, finalizes the job."""
    if job.status.is_terminal() or owner_alive(job):
        return job
    attempts = store.attempts(job.name, run=job.run)
    if not attempts:
        finalize(store, provider, job, JobStatus.FAILED, Reason.FAILED, "the manager stopped before launching")
        return store.job(job.name) or job
    if not attempts[-1].handle:  # the manager died inside launch: whatever it made is unknown
        last = attempts[-1]
        store.update_attempt(last.id, status=AttemptState.LOST, ended_at=last.ended_at or store.clock.time(),
                             detail="the manager stopped while launching this attempt")
        finalize(store, provider, job, JobStatus.STOPPED, Reason.CANCELLED,
                 "the manager stopped while launching; `optjob list` flags anything left behind")
        return store.job(job.name) or job
    obs = observe(store, provider, job, attempts[-1])
    if obs.poll.state.is_terminal():
        status, reason = final_status(obs.poll)
        finalize(store, provider, job, status, reason,
                 "resume with `optjob apply` again" if reason == Reason.PREEMPTED else None)
    return store.job(job.name) or job
