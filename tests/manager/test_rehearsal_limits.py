"""``--simulate-preemption N`` and the recovery limit agree: a rehearsal's own kills are not a
flapping provider, so they neither count against ``MAX_RECOVERIES`` nor wait out its backoff.
Real preemptions still do (``test_real_preemptions_still_stop_at_the_recovery_limit``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from optjob.manager import paths
from optjob.manager.clock import ManualClock
from optjob.manager.controller import MAX_RECOVERIES, Controller
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.planner import make_plan
from optjob.manager.rehearsal import Rehearsal
from optjob.manager.store import Store
from optjob.providers.base import Handle, LaunchRequest
from optjob.providers.local import LocalProvider
from optjob.specs import loads_spec
from optjob.steps.layout import log_path

SPEC = loads_spec("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\n")


class RecordingClock(ManualClock):
    """Manual time (no test sleeps to make it pass) that remembers every wait asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        super().sleep(seconds)


def test_more_rehearsed_kills_than_the_recovery_limit_all_happen_without_backoff(
        home: Path, standin_python: str, monkeypatch: pytest.MonkeyPatch):
    kills = MAX_RECOVERIES + 1
    monkeypatch.setenv("STANDIN_STEPS", "8")  # more progress events than any kill point (1 to 6)
    monkeypatch.setenv("STANDIN_SLEEP", "0.02")
    clock = RecordingClock()
    store = Store(paths.db_path(), clock=clock)
    rehearsal = Rehearsal(kills, seed=0)
    out = Controller(store, LocalProvider(python=standin_python), tick_s=0.05, rehearsal=rehearsal,
                     clock=clock).apply(make_plan(SPEC), SPEC)
    assert (out.status, out.reason) == (JobStatus.SUCCEEDED, Reason.SUCCEEDED), out.message
    assert len(rehearsal.done) == kills and rehearsal.shortfall() is None
    attempts = store.attempts("tiny")
    assert [a.status for a in attempts] == ["preempted"] * kills + ["succeeded"]
    assert max(clock.sleeps, default=0.0) < 1.0  # no backoff: only the short waits for a kill to land


class Reclaimed(LocalProvider):
    """Every attempt's workload is SIGKILLed at once, from outside, as a spot reclaim would."""

    def launch(self, request: LaunchRequest) -> Handle:
        handle = super().launch(request)
        log = log_path(request.job_dir, request.attempt)
        deadline = time.monotonic() + 30  # a bound, not a timing: until the workload has started
        while b'"progress"' not in (log.read_bytes() if log.exists() else b"") and time.monotonic() < deadline:
            time.sleep(0.01)
        self.kill(handle)
        return handle


def test_real_preemptions_still_stop_at_the_recovery_limit(home: Path, standin_python: str,
                                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STANDIN_STEPS", "100000")
    clock = RecordingClock()
    store = Store(paths.db_path(), clock=clock)
    out = Controller(store, Reclaimed(python=standin_python), tick_s=0.05, clock=clock).apply(make_plan(SPEC), SPEC)
    assert (out.status, out.reason) == (JobStatus.STOPPED, Reason.PREEMPTED)
    assert out.attempts == MAX_RECOVERIES + 1
    backoff = [s for s in clock.sleeps if s >= 0.1]
    assert len(backoff) == MAX_RECOVERIES and backoff == sorted(backoff)  # one growing wait per recovery
