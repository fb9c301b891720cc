"""Issue 12's scenarios, end to end: the real ``Controller`` and ``SkyPilotProvider`` against the fake
SkyPilot (tests/providers/fake_sky.py, which copies SkyPilot 0.14.1's behaviour), on one manual clock.

The manager runs in the test's own thread; the cloud is played by ``Cloud``: a list of steps, each
taken when its condition holds, checked every time the provider asks SkyPilot for a cluster or the
managed-job table (once or more per tick). Nothing sleeps: the clock moves when the manager waits.

* the jobs controller unreachable for a while, then back: one launch in total;
* the jobs controller autostopped after the job finished: no relaunch, the outcome recorded;
* an on-demand job that finished while the manager was away (autostop removed its cluster): no relaunch;
* a transient error on every other poll: the manager survives;
* a recovery that does not bump SkyPilot's recovery count: the new run's logs keep flowing;
* Ctrl-C during a blocking launch: nothing is left running;
* a second OPTJOB_HOME with a job of the same name: ``down --orphans`` leaves it alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_sky import BUCKET, FakeManaged, FakeRequest, FakeSky, make_spec
from optjob.manager import paths
from optjob.manager.clock import ManualClock
from optjob.manager.commands import orphans as orphan_commands
from optjob.manager.controller import Controller, Outcome
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.plan import Plan
from optjob.manager.planner import make_plan
from optjob.manager.reconcile import reconcile_orphaned
from optjob.manager.store import Store
from optjob.providers.skypilot import SkyPilotProvider
from optjob.specs import JobSpec

WHEEL = "/tmp/optjob-dist/optjob-0.1.0-py3-none-any.whl"
NAME, CLUSTER = "cloudy", "optjob-cloudy"
ON_DEMAND = {"cloud": "aws", "accelerators": "A100:8", "region": "us-east-1"}
SPOT = {**ON_DEMAND, "spot": True}


class Hung(BaseException):
    """The manager never ended (a BaseException, so no ``except Exception`` in the manager swallows it)."""


@dataclasses.dataclass
class Step:
    when: Callable[[], Any]
    act: Callable[[], None]


class Cloud:
    """SkyPilot's side of a scenario: ``then(when, act)`` steps, taken in order; ``after(n)`` is a
    condition that holds ``n`` SkyPilot reads after the previous step. It ends the manager (``Hung``)
    after ``max_reads`` reads, or at once once more than ``max_launches`` launches were submitted."""

    def __init__(self, fake: FakeSky, max_reads: int = 400, max_launches: int = 1) -> None:
        self.fake, self.max_reads, self.max_launches = fake, max_reads, max_launches
        self.steps: deque[Step] = deque()
        self.reads = self.since = 0
        fake.on_call = self._read

    def then(self, when: Callable[[], Any], act: Callable[[], None]) -> Cloud:
        self.steps.append(Step(when, act))
        return self

    def after(self, reads: int) -> Callable[[], bool]:
        return lambda: self.since >= reads

    def _read(self, method: str) -> None:
        self.reads += 1
        self.since += 1
        if self.reads > self.max_reads:
            raise Hung(f"the manager was still polling after {self.max_reads} SkyPilot reads; steps left: "
                       f"{len(self.steps)}")
        launches = self.fake.count("launch") + self.fake.count("jobs_launch")
        if launches > self.max_launches:
            raise Hung(f"{launches} launches submitted (at most {self.max_launches} expected)")
        while self.steps and self.steps[0].when():
            step = self.steps.popleft()
            self.since = 0
            step.act()

    @property
    def done(self) -> bool:
        return not self.steps


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("OPTJOB_WHEEL", raising=False)
    return tmp_path / "home"


@pytest.fixture
def bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``BUCKET`` on moto's S3: the job's storage, which the manager reads for a durable outcome."""
    import boto3

    for key, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    name = BUCKET.removeprefix("s3://").split("/")[0]
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket=name)
    yield BUCKET
    for obj in s3.list_objects_v2(Bucket=name).get("Contents", []):
        s3.delete_object(Bucket=name, Key=obj["Key"])
    s3.delete_bucket(Bucket=name)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def fake(clock: ManualClock) -> FakeSky:
    return FakeSky(clock=clock.time)


def provider_for(fake: FakeSky, clock: ManualClock) -> SkyPilotProvider:
    return SkyPilotProvider(client=fake, wheel=WHEEL, sleep=clock.sleep, clock=clock.time, backoff_s=1.0,
                            teardown_timeout_s=120, confirm_interval_s=1.0, log_interval_s=0.0)


def plan_for(spec: JobSpec) -> Plan:
    plan = make_plan(spec)
    assert plan.chosen is not None
    return dataclasses.replace(plan, chosen=dataclasses.replace(plan.chosen, hourly_usd=0.01))  # hours of budget


def apply(spec: JobSpec, fake: FakeSky, clock: ManualClock) -> tuple[Outcome, Store]:
    store = Store(paths.db_path(), clock=clock)
    outcome = Controller(store, provider_for(fake, clock), tick_s=0.5).apply(plan_for(spec), spec)
    return outcome, store


def kinds(store: Store, attempt: int | None = None) -> list[str]:
    return [e["event"] for _, e in store.events(NAME) if attempt is None or e["attempt"] == attempt]


def work(fake: FakeSky, target: Any, *steps: int) -> None:
    """A run of the workload starts its step (a recovered run resumes it) and reports progress."""
    fake.emit(target, "step_started", index=0, kind="train", total=1)
    progress(fake, target, *steps)


def progress(fake: FakeSky, target: Any, *steps: int) -> None:
    for step in steps:
        fake.emit(target, "progress", index=0, kind="train", step=step, max_steps=10, loss=1.0 / step)


def finish(fake: FakeSky, target: Any) -> None:
    fake.emit(target, "step_done", index=0, kind="train", output="/m", wall_s=1.0, metrics={}, skipped=False)
    fake.emit(target, "job_done", results="results.json", wall_s=2.0)
    fake.exit(target, 0)


def push_results(storage: Path, attempt: int = 1) -> None:
    """What the node pushes last, before ``job_done``: results.json with the final evaluation."""
    storage.mkdir(parents=True, exist_ok=True)
    (storage / "results.json").write_text(json.dumps(
        {"name": NAME, "steps": [], "attempt": attempt, "baseline": {}, "final": {"perplexity": 9.0}}))


def managed(fake: FakeSky) -> FakeManaged:
    return fake.managed[1]


# -- 1. unknown is not gone -------------------------------------------------------------------------

def test_controller_unreachable_for_a_while_then_back_launches_once(home: Path, fake: FakeSky, clock: ManualClock,
                                                                    bucket: str) -> None:
    view = Store(paths.db_path(), clock=clock)  # what `optjob status` reads meanwhile
    seen: list[tuple[str, str]] = []

    def look() -> None:
        job, (attempt,) = view.job(NAME), view.attempts(NAME)
        seen.append((job.status.value, attempt.status))  # type: ignore[union-attr]

    cloud = Cloud(fake)
    (cloud.then(lambda: fake.managed, lambda: (fake.start(1), work(fake, managed(fake), 1)))
     .then(cloud.after(3), lambda: setattr(fake, "controller", "UNREACHABLE"))
     .then(cloud.after(6), look)
     .then(cloud.after(6), lambda: setattr(fake, "controller", "UP"))
     .then(cloud.after(4), look)  # two ticks later (each reads the table twice)
     .then(cloud.after(1), lambda: (progress(fake, managed(fake), 2), finish(fake, managed(fake)))))
    outcome, store = apply(make_spec(SPOT), fake, clock)
    assert cloud.done
    assert seen == [("unknown", "unknown"), ("running", "running")]  # shown as such, then known again
    assert (outcome.status, outcome.reason, outcome.attempts) == (JobStatus.SUCCEEDED, Reason.SUCCEEDED, 1)
    assert fake.count("jobs_launch") == 1  # not a second managed job beside the first
    assert kinds(store) == ["step_started", "progress", "progress", "step_done", "job_done"]


def test_controller_autostopped_after_the_job_finished_is_not_relaunched(home: Path, fake: FakeSky,
                                                                         clock: ManualClock, bucket: str) -> None:
    cloud = Cloud(fake)

    def finished_then_controller_stopped() -> None:
        fake.exit(managed(fake), 0)  # done; nobody read the end of its log
        fake.stop_controller()  # idle, it autostops before the manager looks again

    (cloud.then(lambda: fake.managed, lambda: (fake.start(1), work(fake, managed(fake), 1)))
     .then(cloud.after(3), finished_then_controller_stopped))
    outcome, store = apply(make_spec(SPOT), fake, clock)
    assert (outcome.status, outcome.reason, outcome.attempts) == (JobStatus.SUCCEEDED, Reason.SUCCEEDED, 1)
    assert fake.count("jobs_launch") == 1
    assert fake.count("controller_restart") == 1  # SkyPilot's table asked once, with `queue --refresh`
    (attempt,) = store.attempts(NAME)
    assert attempt.status == "succeeded" and attempt.exit_code == 0 and attempt.released


# -- 2. a job that finished while the manager was away is not run again ---------------------------------

def test_on_demand_job_finished_while_the_manager_was_away_is_not_relaunched(home: Path, tmp_path: Path,
                                                                             fake: FakeSky, clock: ManualClock) -> None:
    storage = tmp_path / "artifacts"
    spec = make_spec(ON_DEMAND, storage=str(storage))
    cloud = Cloud(fake)

    def job() -> Any:
        return fake.job(CLUSTER, 1)

    def finished_and_removed() -> None:  # between two polls (the laptop slept): it ended, autostop removed it
        push_results(storage)
        finish(fake, job())
        fake.autostop_down(CLUSTER, stale=True)  # `sky status` still says UP from its cache

    (cloud.then(lambda: CLUSTER in fake.clusters_ and fake.clusters_[CLUSTER].jobs,
                lambda: (setattr(job(), "status", "RUNNING"), work(fake, job(), 1)))
     .then(cloud.after(3), finished_and_removed))
    outcome, store = apply(spec, fake, clock)
    assert (outcome.status, outcome.reason, outcome.attempts) == (JobStatus.SUCCEEDED, Reason.SUCCEEDED, 1)
    assert fake.count("launch") == 1
    (attempt,) = store.attempts(NAME)
    assert attempt.status == "succeeded" and "storage" in (attempt.detail or "")


def test_a_returning_manager_records_a_finished_job_as_finished(home: Path, tmp_path: Path, fake: FakeSky,
                                                                clock: ManualClock) -> None:
    """The same, found by `optjob status` (or `apply` again) after the manager was killed."""
    storage = tmp_path / "artifacts"
    spec = make_spec(ON_DEMAND, storage=str(storage))
    cloud = Cloud(fake)

    class Killed(BaseException):
        pass

    def kill() -> None:
        raise Killed

    (cloud.then(lambda: CLUSTER in fake.clusters_ and fake.clusters_[CLUSTER].jobs,
                lambda: setattr(fake.job(CLUSTER, 1), "status", "RUNNING"))
     .then(cloud.after(2), kill))
    with pytest.raises(Killed):
        apply(spec, fake, clock)
    push_results(storage)
    finish(fake, fake.job(CLUSTER, 1))
    fake.autostop_down(CLUSTER, stale=True)
    store = Store(paths.db_path(), clock=clock)
    store.update_job(NAME, owner_pid=None)  # its manager is gone
    job = reconcile_orphaned(store, provider_for(fake, clock), store.job(NAME))  # type: ignore[arg-type]
    assert (job.status, job.reason) == (JobStatus.SUCCEEDED, Reason.SUCCEEDED)
    assert fake.count("launch") == 1


# -- 3. transient errors -------------------------------------------------------------------------------

def test_a_transient_error_on_every_other_poll_does_not_end_the_manager(home: Path, fake: FakeSky,
                                                                         clock: ManualClock, bucket: str) -> None:
    fake.flap = {"managed_jobs", "managed_logs"}
    cloud = Cloud(fake)
    (cloud.then(lambda: fake.managed, lambda: (fake.start(1), work(fake, managed(fake), 1)))
     .then(cloud.after(6), lambda: progress(fake, managed(fake), 2, 3))
     .then(cloud.after(6), lambda: finish(fake, managed(fake))))
    outcome, store = apply(make_spec(SPOT), fake, clock)
    assert (outcome.status, outcome.attempts) == (JobStatus.SUCCEEDED, 1)
    assert fake.count("jobs_launch") == 1
    assert kinds(store) == ["step_started", "progress", "progress", "progress", "step_done", "job_done"]


# -- 5. logs after a recovery SkyPilot does not count ---------------------------------------------------

def test_logs_keep_flowing_after_a_recovery_without_a_count_bump(home: Path, fake: FakeSky, clock: ManualClock,
                                                                 bucket: str) -> None:
    cloud = Cloud(fake)
    (cloud.then(lambda: fake.managed, lambda: (fake.start(1), work(fake, managed(fake), 1)))
     .then(cloud.after(3), lambda: fake.preempt(1))  # a controller restart: RECOVERING ...
     .then(cloud.after(4), lambda: (fake.recover(1, counted=False), work(fake, managed(fake), 2)))  # ... count kept
     .then(cloud.after(3), lambda: (progress(fake, managed(fake), 3), finish(fake, managed(fake)))))
    outcome, store = apply(make_spec(SPOT), fake, clock)
    assert (outcome.status, outcome.attempts) == (JobStatus.SUCCEEDED, 2)
    assert fake.count("jobs_launch") == 1 and managed(fake).recovery_count == 0
    assert kinds(store, 1) == ["step_started", "progress"]
    assert kinds(store, 2) == ["step_started", "progress", "progress", "step_done", "job_done"]


# -- 6. Ctrl-C during a launch ---------------------------------------------------------------------------

@pytest.mark.parametrize("resources", [ON_DEMAND, SPOT], ids=["cluster", "managed"])
def test_ctrl_c_during_a_blocking_launch_leaves_nothing_running(home: Path, fake: FakeSky, clock: ManualClock,
                                                                bucket: str, resources: dict[str, Any]) -> None:
    def ctrl_c(req: FakeRequest) -> None:
        fake.on_wait = None
        if req.kind == "jobs_launch":
            fake.finish_request(req.request_id)  # the job was already submitted when Ctrl-C came
        raise KeyboardInterrupt

    fake.on_wait = ctrl_c
    outcome, _ = apply(make_spec(resources), fake, clock)
    assert (outcome.status, outcome.reason) == (JobStatus.STOPPED, Reason.CANCELLED)
    assert fake.live() == []  # no launch request running on the API server, no cluster, no managed job
    assert all(r.status in ("CANCELLED", "SUCCEEDED") for r in fake.requests.values())


# -- 7. orphans by identity ------------------------------------------------------------------------------

@pytest.mark.parametrize("resources", [ON_DEMAND, SPOT], ids=["cluster", "managed"])
def test_a_second_optjob_home_keeps_its_job_of_the_same_name(tmp_path: Path, fake: FakeSky, clock: ManualClock,
                                                            monkeypatch: pytest.MonkeyPatch, bucket: str,
                                                            resources: dict[str, Any]) -> None:
    """Two OPTJOB_HOMEs on one SkyPilot API server, each with a job called cloudy."""
    spec = make_spec(resources)

    def run_in(home: str, finished: bool) -> Store:
        monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / home))
        cloud = Cloud(fake, max_launches=fake.count("launch") + fake.count("jobs_launch") + 1)

        def go() -> None:
            target: Any
            if resources is SPOT:
                target = fake.start(next(j.job_id for j in fake.managed.values() if j.status == "PENDING"))
            else:
                target = fake.job(CLUSTER, max(fake.clusters_[CLUSTER].jobs))
                target.status = "RUNNING"
            if finished:
                finish(fake, target)
            else:
                raise Detached

        cloud.then(launched, go)
        with contextlib.suppress(Detached):
            apply(spec, fake, clock)
        return Store(paths.db_path(), clock=clock)

    def launched() -> bool:
        if resources is SPOT:
            return any(j.status == "PENDING" for j in fake.managed.values())
        return CLUSTER in fake.clusters_ and any(j.status == "PENDING" for j in fake.clusters_[CLUSTER].jobs.values())

    a = run_in("home-a", finished=True)  # finished and torn down
    assert a.job(NAME).status == JobStatus.SUCCEEDED  # type: ignore[union-attr]
    clock.advance(60)
    run_in("home-b", finished=False)  # still running (its manager carries on elsewhere)
    before = fake.live()
    assert before  # home B's cluster or managed job
    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / "home-a"))
    assert orphan_commands.down_orphans(a, provider_for(fake, clock)) == []
    assert fake.live() == before  # home B's run is untouched
    assert orphan_commands.orphan_warning(a, client=fake) is None


class Detached(BaseException):
    """Stops a manager thread-free: the job goes on in the fake, as if its manager ran elsewhere."""
