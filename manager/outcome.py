"""Did the work already finish? Asked before any relaunch, and when a provider cannot say.

A provider's ``LOST`` / ``PREEMPTED`` / ``UNKNOWN`` says what it sees of the attempt's resources, not
whether the workload finished: an on-demand cluster removes itself (autostop ``down: true``) once
the job is over, and SkyPilot's jobs controller stops once no job runs — both erase what the
provider would have polled. So before relaunching, the manager looks for a durable record, cheapest
first:

1. the events it already stored: a ``job_done`` of this run (the workload prints it last);
2. the job's storage (``storage.artifacts``): ``results.json`` with the final evaluation, written by
   an attempt of this run (the workload pushes it, and must succeed in pushing it, before
   ``job_done``);
3. the provider's own record (``Provider.outcome``: SkyPilot's managed-job table).

``settle`` returns the terminal ``Poll`` such a record implies, ``None`` when there is none, and
raises ``Unsettled`` when a record exists but cannot be read now (storage unreachable): then the
caller must wait, not relaunch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from optjob.providers.base import AttemptState, Handle, Poll, Provider
from optjob.specs.errors import OptjobError

from .store import AttemptRow, JobRow, Store

log = logging.getLogger(__name__)


#: Ends that mean "do not run it again": the workload finished, failed on its own, or was stopped.
_FINAL = (AttemptState.SUCCEEDED, AttemptState.FAILED, AttemptState.STOPPED)


class Unsettled(OptjobError):
    """A durable record may say the work finished, but it cannot be read now: do not relaunch yet."""


def _storage(url: str, spec_path: str | None, endpoint_url: str | None = None) -> Any:
    from optjob.steps.storage import open_storage, scheme_of

    if scheme_of(url) is None and not Path(url).expanduser().is_absolute() and spec_path:
        url = str(Path(spec_path).parent / url)  # a folder relative to the spec, as everything else is
    return open_storage(url, endpoint_url=endpoint_url)


def finished_in_storage(job: JobRow, first_attempt: int) -> bool | None:
    """Whether the job's storage holds this run's final results (None: the job has no storage).
    Raises ``Unsettled`` when the storage cannot be read."""
    spec = json.loads(job.spec_json)
    url = (spec.get("storage") or {}).get("artifacts")
    if not url:
        return None
    from optjob.steps.layout import RESULTS_FILE

    try:
        data = _storage(url, job.spec_path, (spec.get("storage") or {}).get("endpoint_url")).get_bytes(RESULTS_FILE)
    except (OptjobError, OSError, ImportError) as exc:
        raise Unsettled(f"could not read {url}/{RESULTS_FILE}: {exc}") from exc
    if data is None:
        return False
    try:
        results = json.loads(data)
    except ValueError:
        return False  # a half-written file is no record
    return (isinstance(results, dict) and results.get("name") == spec.get("name") and "final" in results
            and int(results.get("attempt") or 0) >= first_attempt)


def _job_done_seen(store: Store, job: JobRow, numbers: set[int]) -> bool:
    return any(e.get("event") == "job_done" and e.get("attempt") in numbers for _, e in store.events(job.name))


def settle(store: Store, provider: Provider, job: JobRow, attempt: AttemptRow, *,
           ask_provider: bool = True) -> Poll | None:
    """The terminal ``Poll`` a durable record implies for ``attempt`` (the latest of its run), or None.
    ``ask_provider=False`` skips ``Provider.outcome`` (which may restart SkyPilot's jobs controller)."""
    attempts = store.attempts(job.name, run=job.run)
    numbers = {a.number for a in attempts} or {attempt.number}
    if _job_done_seen(store, job, numbers):
        return Poll(AttemptState.SUCCEEDED, exit_code=0, detail="the workload reported job_done")
    if finished_in_storage(job, min(numbers)):
        return Poll(AttemptState.SUCCEEDED, exit_code=0,
                    detail="finished while the manager was not looking: the storage holds the final results")
    if attempt.handle and ask_provider:
        try:
            recorded = provider.outcome(Handle.from_json(attempt.handle))
        except OptjobError as exc:
            log.info("no outcome from %s: %s", provider.name, exc)
            recorded = None
        if recorded is not None and recorded.state in _FINAL:
            return recorded
    return None


def record_settled(store: Store, attempt: AttemptRow, poll: Poll) -> None:
    """Write down how ``attempt`` ended, as the durable record says (over a LOST/PREEMPTED/UNKNOWN)."""
    ended = attempt.ended_at or store.clock.time()
    store.update_attempt(attempt.id, status=poll.state, exit_code=poll.exit_code, detail=poll.detail[:2000],
                         ended_at=ended)
    attempt.status, attempt.exit_code, attempt.detail, attempt.ended_at = (
        poll.state.value, poll.exit_code, poll.detail[:2000], ended)
