"""The budget cap against a workload that does not cooperate: it ignores SIGTERM and never looks
at its deadline (a phase that never checks the stop flag, a library call, a blocking read).

The real local provider runs a real process; the manager escalates from a stop request to a kill.
No assertion depends on this machine's speed: where time must pass, a ManualClock is advanced."""

from __future__ import annotations

import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from optjob.manager import paths
from optjob.manager.clock import ManualClock
from optjob.manager.controller import Controller, Outcome
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.meter import grace_s, slowest_checkpoint_s, stop_margin_s
from optjob.manager.planner import make_plan
from optjob.manager.reconcile import reconcile_orphaned, request_stop
from optjob.manager.store import Store
from optjob.providers.base import AttemptState, Handle
from optjob.providers.local import LocalProvider
from optjob.specs import loads_spec
from optjob.specs.errors import BudgetExceeded, Interrupted

#: A workload that ignores SIGTERM and its deadline, and speaks the event protocol once.
STUBBORN = '''
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(json.dumps({"event": "step_started", "ts": time.time(), "v": 1, "index": 0, "kind": "evaluate",
                  "total": 1}), flush=True)
while True:
    time.sleep(0.05)
'''


@pytest.fixture
def stubborn(tmp_path: Path, home: Path) -> Iterator[str]:
    """The stubborn workload's interpreter; whatever of it still runs after the test is killed."""
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    exe = tmp_path / "stubborn-python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    yield str(exe)
    if paths.db_path().exists():
        provider = LocalProvider(python=str(exe))
        for attempt in Store(paths.db_path()).attempts("stubborn"):
            if attempt.handle:
                handle = Handle.from_json(attempt.handle)
                provider.kill(handle)  # SIGTERM would be ignored (and teardown wait for it)
                provider.wait(handle, 10)
                provider.teardown(handle)


def launched(home: Path) -> None:
    """Wait until the stubborn workload is up (it ignores SIGTERM from its first line on)."""
    log = home / "jobs" / "stubborn" / "logs" / "attempt-1.log"
    for _ in range(600):
        if log.exists() and "step_started" in log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError("the workload never started")


def spec(budget: str, price: float = 3600.0):
    return loads_spec(f"name: stubborn\nmodel: {{init: {{}}}}\nsteps: [{{train: {{}}}}]\n"
                      f"resources: {{hourly_usd: {price}}}\nbudget: {budget}\n")


def run_in_thread(fn, timeout_s: float = 120.0) -> Outcome:
    """Run ``fn`` (a controller) and fail the test, instead of hanging the suite, if it never returns."""
    box: dict[str, object] = {}
    thread = threading.Thread(target=lambda: box.setdefault("out", fn()), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "the manager never stopped a workload that ignores SIGTERM"
    return box["out"]  # type: ignore[return-value]


def test_an_attached_manager_kills_a_workload_that_ignores_the_stop_and_stays_under_the_cap(
        home: Path, stubborn: str) -> None:
    s = spec("{max_usd: 4}")  # $1 a second: the cap is 4 s of running away

    def manage() -> Outcome:
        return Controller(Store(paths.db_path()), LocalProvider(python=stubborn), tick_s=0.05).apply(make_plan(s), s)

    out = run_in_thread(manage)
    store = Store(paths.db_path())
    assert (out.status, out.reason) == (JobStatus.STOPPED, Reason.BUDGET)
    assert 0 < out.spent_usd <= 4.0  # never above the cap, although SIGTERM was ignored
    (attempt,) = store.attempts("stubborn")
    handle = Handle.from_json(attempt.handle or {})
    assert not LocalProvider(python=stubborn)._running(handle)  # killed, not left behind
    assert attempt.released == 1
    job = store.job("stubborn")
    assert job is not None and "killed" in (job.message or "")


def test_with_no_manager_status_escalates_a_stop_to_a_kill_after_the_grace(home: Path, stubborn: str) -> None:
    """The manager was SIGKILLed right after asking for a stop (Ctrl-C): `status` (or `list`)
    finishes the job rather than showing `stopping` and a burn rate forever."""
    clock = ManualClock(start=time.time())
    store = Store(paths.db_path(), clock=clock)
    provider = LocalProvider(python=stubborn)
    s = spec("{max_usd: 1000000}")
    Controller(store, provider, tick_s=0.05).apply(make_plan(s), s, detach=True)
    launched(home)
    job = store.job("stubborn")
    assert job is not None
    (attempt,) = store.attempts("stubborn")
    handle = Handle.from_json(attempt.handle or {})
    request_stop(store, provider, job, handle, Reason.CANCELLED, "interrupted")  # then the manager died
    clock.advance(grace_s(None) / 2)
    job = reconcile_orphaned(store, provider, job)
    assert job.status == JobStatus.STOPPING  # within the grace: still given its chance
    assert provider.poll(handle).state == AttemptState.RUNNING  # SIGTERM ignored
    clock.advance(grace_s(None))
    job = reconcile_orphaned(store, provider, job)
    assert (job.status, job.reason) == (JobStatus.STOPPED, Reason.CANCELLED)
    assert not provider._running(handle)
    assert "killed" in (job.message or "")


def test_with_no_manager_status_stops_a_job_at_its_stop_point(home: Path, stubborn: str) -> None:
    clock = ManualClock(start=time.time())
    store = Store(paths.db_path(), clock=clock)
    provider = LocalProvider(python=stubborn)
    s = spec("{max_usd: 1000}")
    Controller(store, provider, tick_s=0.05).apply(make_plan(s), s, detach=True)
    launched(home)
    clock.advance(1000.0 - stop_margin_s("local", None) - 1.0)
    job = reconcile_orphaned(store, provider, store.job("stubborn"))  # type: ignore[arg-type]
    assert job.status == JobStatus.RUNNING and job.stop_requested_at is None  # not yet
    clock.advance(1.01)
    job = reconcile_orphaned(store, provider, job)
    assert (job.status, job.reason) == (JobStatus.STOPPING, Reason.BUDGET) and job.stop_requested_at is not None


def test_a_stop_at_the_cap_itself_does_not_wait_for_the_grace(home: Path, stubborn: str) -> None:
    clock = ManualClock(start=time.time())
    store = Store(paths.db_path(), clock=clock)
    provider = LocalProvider(python=stubborn)
    s = spec("{max_usd: 1000}")
    Controller(store, provider, tick_s=0.05).apply(make_plan(s), s, detach=True)
    launched(home)
    clock.advance(1000.0 - stop_margin_s("local", None) + 0.01)
    job = reconcile_orphaned(store, provider, store.job("stubborn"))  # type: ignore[arg-type]
    assert job.status == JobStatus.STOPPING
    clock.advance(stop_margin_s("local", None) - 0.5)  # within the grace, but the money is at hand
    job = reconcile_orphaned(store, provider, job)
    assert (job.status, job.reason) == (JobStatus.STOPPED, Reason.BUDGET)
    assert store.spend("stubborn") <= 1000.0


def test_grace_and_margin_follow_the_measured_checkpoint_time() -> None:
    events = [{"event": "checkpoint", "seconds": 0.2}, {"event": "progress"}, {"event": "checkpoint", "seconds": 7.0}]
    measured = slowest_checkpoint_s(events)
    assert measured == 7.0
    assert grace_s(measured) == 21.0 and grace_s(0.01) == 2.0  # three writes, within its bounds
    assert stop_margin_s("local", measured) == pytest.approx(8.0)  # one write and the teardown margin
    assert stop_margin_s("local", None) < stop_margin_s("skypilot", None)


def test_checkpoint_kept_is_said_only_when_one_exists(tmp_path: Path) -> None:
    out = Outcome("j", JobStatus.STOPPED, Reason.BUDGET, 1.0, 1, tmp_path)
    with pytest.raises(BudgetExceeded) as nothing:
        out.raise_for_status()
    assert "nothing saved yet" in (nothing.value.hint or "") and "kept" not in (nothing.value.hint or "")
    ckpt = tmp_path / "steps" / "00-train" / "checkpoints" / "step-000040"
    ckpt.mkdir(parents=True)
    (tmp_path / "steps" / "00-train" / "checkpoints" / "step-000080").mkdir()  # torn: no manifest
    (ckpt / "manifest.json").write_text("{}")
    out = Outcome("j", JobStatus.STOPPED, Reason.CANCELLED, 1.0, 1, tmp_path)
    with pytest.raises(Interrupted) as kept:
        out.raise_for_status()
    assert "kept: checkpoint at step 40 of 00-train" in (kept.value.hint or "")


def test_checkpoint_interval_is_the_median_gap_within_a_step() -> None:
    from optjob.manager.meter import checkpoint_interval_s

    events = [{"event": "checkpoint", "index": 0, "ts": t} for t in (100.0, 110.0, 130.0, 140.0)]
    assert checkpoint_interval_s(events) == 10.0
    assert checkpoint_interval_s([*events[:1], {"event": "checkpoint", "index": 1, "ts": 500.0}]) is None


PREEMPTED = """
import json, sys, time
print(json.dumps({"event": "step_started", "ts": time.time(), "v": 1, "index": 0, "kind": "train", "total": 1}),
      flush=True)
sys.exit(137)  # as a spot reclaim's SIGKILL leaves it
"""


def test_a_preempted_job_is_not_relaunched_when_the_budget_left_cannot_reach_a_checkpoint(
        home: Path, tmp_path: Path) -> None:
    """A relaunch costs provisioning and start-up; with less budget left than one checkpoint
    interval it can save nothing new: stop (budget) instead of paying for it."""

    class Counting(LocalProvider):
        launches = 0

        def launch(self, request):  # type: ignore[no-untyped-def]
            Counting.launches += 1
            return super().launch(request)

    script = tmp_path / "preempted.py"
    script.write_text(PREEMPTED)
    exe = tmp_path / "preempted-python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    store = Store(paths.db_path())
    s = spec("{max_usd: 100}", price=36.0)  # $0.01 a second: 10,000 s of budget
    # Two checkpoints 20,000 s apart, written by an earlier run: more than the whole budget.
    store.claim_job("stubborn", provider="local", job_dir=str(home / "jobs" / "stubborn"), spec_path=None,
                    spec_json=s.model_dump_json(), plan_json="{}", owner_alive=lambda j: False)
    store.add_events("stubborn", 0, [{"event": "checkpoint", "index": 0, "ts": 10.0, "step": 1},
                                     {"event": "checkpoint", "index": 0, "ts": 20010.0, "step": 2}])
    store.update_job("stubborn", status=JobStatus.SUCCEEDED)  # that run finished
    out = Controller(store, Counting(python=str(exe)), tick_s=0.05).apply(make_plan(s), s)
    assert (out.status, out.reason) == (JobStatus.STOPPED, Reason.BUDGET)
    assert Counting.launches == 1 and "not resuming" in (out.message or "")
