"""The apply controller with the real local provider and a stand-in workload (no torch)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from optjob.manager import paths
from optjob.manager.clock import ManualClock
from optjob.manager.controller import Controller
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.planner import make_plan
from optjob.manager.reconcile import reconcile_orphaned
from optjob.manager.store import Store
from optjob.providers.base import Handle
from optjob.providers.local import LocalProvider
from optjob.specs import loads_spec
from optjob.specs.errors import BudgetExceeded, JobFailed, TeardownError


def spec(extra: str = ""):
    return loads_spec("name: tiny\nmodel: {init: {}}\nsteps: [{train: {}}]\n" + extra)


def run(provider, s, **kw):
    store = Store(paths.db_path())
    return store, Controller(store, provider, tick_s=0.05, **kw).apply(make_plan(s), s)


def test_success_records_events_spend_and_teardown(home, standin_python, monkeypatch):
    monkeypatch.setenv("STANDIN_STEPS", "10")
    store, out = run(LocalProvider(python=standin_python), spec("resources: {hourly_usd: 36}\n"))
    assert (out.status, out.reason, out.attempts) == (JobStatus.SUCCEEDED, Reason.SUCCEEDED, 1)
    kinds = [e["event"] for _, e in store.events("tiny")]
    assert kinds[0] == "step_started" and kinds[-1] == "job_done" and kinds.count("progress") == 10
    (attempt,) = store.attempts("tiny")
    assert attempt.released == 1 and attempt.status == "succeeded"
    # 36 $/h = 0.01 $/s, metered from launch to confirmed teardown.
    assert out.spent_usd == pytest.approx((attempt.ended_at - attempt.started_at) * 0.01, rel=0.2)
    assert (home / "jobs" / "tiny" / "job.json").exists()


def test_budget_cap_stops_before_overspending(home, standin_python, monkeypatch):
    monkeypatch.setenv("STANDIN_STEPS", "100000")
    store, out = run(LocalProvider(python=standin_python),
                     spec("resources: {hourly_usd: 3600}\nbudget: {max_usd: 5}\n"))
    assert (out.status, out.reason) == (JobStatus.STOPPED, Reason.BUDGET)
    assert 0 < out.spent_usd <= 5.0
    with pytest.raises(BudgetExceeded):
        out.raise_for_status()
    assert store.attempts("tiny")[-1].released == 1


def test_failure_is_reported(home, standin_python, monkeypatch):
    monkeypatch.setenv("STANDIN_STEPS", "1")
    monkeypatch.setenv("STANDIN_RC", "3")
    _, out = run(LocalProvider(python=standin_python), spec())
    assert (out.status, out.reason) == (JobStatus.FAILED, Reason.FAILED)
    with pytest.raises(JobFailed):
        out.raise_for_status()


def test_preempted_attempt_is_relaunched(home, standin_python, monkeypatch):
    monkeypatch.setenv("STANDIN_STEPS", "30")
    provider = LocalProvider(python=standin_python)

    def reclaim(handle, attempt):
        if attempt.number == 1:
            threading.Timer(0.4, provider.kill, args=(handle,)).start()

    store, out = run(provider, spec("resources: {hourly_usd: 36}\n"), on_launch=reclaim)
    assert (out.status, out.attempts) == (JobStatus.SUCCEEDED, 2)
    a1, a2 = store.attempts("tiny")
    assert a1.status == "preempted" and a2.status == "succeeded"
    # Spend covers both attempts.
    assert out.spent_usd == pytest.approx(store.spend("tiny", 1) + store.spend("tiny", 2))
    assert store.spend("tiny", 1) > 0


class FlakyTeardown(LocalProvider):
    """The local provider whose teardown fails transiently twice (a real subclass, no patching)."""

    def __init__(self, python: str) -> None:
        super().__init__(python=python)
        self.failures = 2

    def teardown(self, handle):
        if self.failures:
            self.failures -= 1
            raise TeardownError("transient")
        super().teardown(handle)


def test_teardown_is_retried_by_each_later_look_until_confirmed(home, standin_python, monkeypatch):
    monkeypatch.setenv("STANDIN_STEPS", "2")
    provider = FlakyTeardown(standin_python)
    with pytest.raises(TeardownError):
        run(provider, spec())
    store = Store(paths.db_path())
    store.update_job("tiny", owner_pid=None)  # the CLI exited with that error
    for _ in range(2):  # two `optjob status` calls: the first fails again, the second confirms
        try:
            job = reconcile_orphaned(store, provider, store.job("tiny"))  # type: ignore[arg-type]
        except TeardownError:
            continue
    assert provider.failures == 0 and store.attempts("tiny")[0].released == 1
    assert job.status == JobStatus.SUCCEEDED


def test_detached_job_is_reconciled_by_status(home, standin_python, monkeypatch):
    monkeypatch.setenv("STANDIN_STEPS", "5")
    provider = LocalProvider(python=standin_python)
    store = Store(paths.db_path())
    s = spec()
    out = Controller(store, provider, tick_s=0.05).apply(make_plan(s), s, detach=True)
    assert not out.status.is_terminal()
    deadline = time.time() + 30
    job = store.job("tiny")
    while job is not None and not job.status.is_terminal() and time.time() < deadline:
        job = reconcile_orphaned(store, provider, job)
        time.sleep(0.1)
    assert job is not None and job.status == JobStatus.SUCCEEDED
    assert store.attempts("tiny")[0].released == 1
    assert [e["event"] for _, e in store.events("tiny")][-1] == "job_done"


def test_an_orphan_found_late_is_billed_to_its_exit_not_to_the_status_call(home, standin_python, monkeypatch):
    monkeypatch.setenv("STANDIN_STEPS", "5")
    provider = LocalProvider(python=standin_python)
    clock = ManualClock(start=time.time())  # the manager's time moves only when the test says
    store = Store(paths.db_path(), clock=clock)
    s = spec("resources: {hourly_usd: 36}\n")  # $0.01 a second
    Controller(store, provider, tick_s=0.05).apply(make_plan(s), s, detach=True)
    exit_file = home / "jobs" / "tiny" / "logs" / "attempt-1.exit"
    provider.wait(Handle.from_json(store.attempts("tiny")[0].handle or {}), 30)
    assert exit_file.exists()
    ended = exit_file.stat().st_mtime
    clock.advance(3600.0)  # nobody looks for an hour
    job = reconcile_orphaned(store, provider, store.job("tiny"))  # type: ignore[arg-type]
    assert job.status == JobStatus.SUCCEEDED
    (attempt,) = store.attempts("tiny")
    assert attempt.ended_at == pytest.approx(ended, abs=0.01)  # the exit file's time, not the status call's
    assert store.spend("tiny") == pytest.approx((ended - attempt.started_at) * 0.01, abs=0.002)  # not +$36


def test_second_apply_attaches_while_running(home, standin_python, monkeypatch):
    monkeypatch.setenv("STANDIN_STEPS", "40")
    provider = LocalProvider(python=standin_python)
    s = spec()
    store = Store(paths.db_path())
    Controller(store, provider, tick_s=0.05).apply(make_plan(s), s, detach=True)
    other = Store(paths.db_path())
    out = Controller(other, provider, tick_s=0.05).apply(make_plan(s), s)
    assert out.status == JobStatus.SUCCEEDED
    assert len(other.attempts("tiny")) == 1  # attached, not a second copy


def test_resume_counts_earlier_spend(home, standin_python, monkeypatch):
    monkeypatch.setenv("STANDIN_STEPS", "100000")
    s = spec("resources: {hourly_usd: 3600}\nbudget: {max_usd: 5}\n")
    _, first = run(LocalProvider(python=standin_python), s)
    assert first.reason == Reason.BUDGET
    # Re-applying with the same cap: the spend already made counts, so it stops at once.
    _, second = run(LocalProvider(python=standin_python), s)
    assert second.reason == Reason.BUDGET and second.spent_usd <= 5.0
    assert Path(paths.job_dir("tiny")).exists()


def test_preemption_rehearsal_kills_and_resumes(home, standin_python, monkeypatch):
    from optjob.manager.rehearsal import Rehearsal

    monkeypatch.setenv("STANDIN_STEPS", "12")
    rehearsal = Rehearsal(kills=2, seed=3)
    store = Store(paths.db_path())
    s = spec()
    out = Controller(store, LocalProvider(python=standin_python), tick_s=0.05, rehearsal=rehearsal).apply(
        make_plan(s), s)
    assert out.status == JobStatus.SUCCEEDED and out.attempts == 3
    assert len(rehearsal.done) == 2
    attempts = store.attempts("tiny")
    assert [a.status for a in attempts] == ["preempted", "preempted", "succeeded"]
    assert all("rehearsal kill at step" in (a.detail or "") for a in attempts[:2])

def test_rehearsal_kill_points_follow_the_seed():
    from optjob.manager.rehearsal import Rehearsal

    def points(seed: int) -> list[int]:
        r, out = Rehearsal(kills=5, seed=seed), []
        for attempt in range(5):
            r.on_launch()
            n = 0
            while not r.observe([{"event": "progress", "index": 0, "kind": "train", "step": n}]):
                n += 1
            out.append(n)
            r.record(attempt + 1, {})
        r.on_launch()
        assert not r.observe([{"event": "progress"}] * 100)  # no kills beyond N
        return out

    assert points(7) == points(7)
    assert points(7) != points(8)
