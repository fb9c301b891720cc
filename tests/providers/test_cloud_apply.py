"""The manager on the cloud path, end to end: the real ``Controller`` and ``SkyPilotProvider``
against the fake SkyPilot client (the cloud cannot be reached), the fake injected, nothing
patched. The Controller runs in a thread (a manager process); the test thread plays the
cloud — the workload's log lines, a spot reclaim, a graceful stop — through the fake.

Covered: launch (what reaches the node), events from the log stream into the state store,
a preemption -> a new attempt with its own start, end and price, billed separately, the
budget counting every attempt, the cap reached mid-run -> stop -> stopped (budget) within
max_usd, teardown retried after transient failures, a killed manager replaced by a fresh
one (reconcile, a second apply attaching), orphans (flagged, removed), a launch failure.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_sky import BUCKET, FakeCluster, FakeSky, make_spec
from optjob.manager import paths
from optjob.manager.commands import orphans as cloud_commands
from optjob.manager.controller import Controller, Outcome
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.meter import teardown_margin_s
from optjob.manager.plan import Plan
from optjob.manager.planner import make_plan
from optjob.manager.reconcile import reconcile_orphaned
from optjob.manager.store import Store
from optjob.providers.base import LaunchRequest
from optjob.providers.skypilot import SkyPilotProvider
from optjob.specs import JobSpec
from optjob.specs.errors import ProviderError
from optjob.specs.resources import BudgetSpec

WHEEL = "/tmp/optjob-dist/optjob-0.1.0-py3-none-any.whl"
NAME, CLUSTER = "cloudy", "optjob-cloudy"
ON_DEMAND = {"cloud": "aws", "accelerators": "A100:8", "region": "us-east-1"}
SPOT = {**ON_DEMAND, "spot": True}
#: What the manager keeps before the cap on a cluster (teardown: always): 1 idle minute, the skylet's
#: autostop check, termination (sky_task.unattended_end_s).
MARGIN = teardown_margin_s("skypilot", make_spec(ON_DEMAND))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_endpoint: str) -> Iterator[Path]:
    """An OPTJOB_HOME, and the jobs' bucket on moto's S3 (the manager reads it before a relaunch)."""
    import boto3

    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("OPTJOB_WHEEL", raising=False)
    for key, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    bucket = BUCKET.removeprefix("s3://").split("/")[0]
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket=bucket)
    yield tmp_path / "home"
    for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.delete_bucket(Bucket=bucket)


def provider_for(fake: FakeSky, retries: int = 5) -> SkyPilotProvider:
    """The real provider on the fake client; waits shortened, the clock real (the meter's is)."""
    return SkyPilotProvider(client=fake, wheel=WHEEL, sleep=lambda s: time.sleep(min(s, 0.01)), retries=retries,
                            backoff_s=0.01, teardown_timeout_s=20, confirm_interval_s=0.01, log_interval_s=0.01)


def priced(spec: JobSpec, hourly_usd: float | None = None) -> Plan:
    """The real plan; ``hourly_usd`` replaces the chosen offer's price (to reach a cap in seconds)."""
    plan = make_plan(spec)
    assert plan.provider == "skypilot" and plan.chosen is not None
    if hourly_usd is not None:
        plan = dataclasses.replace(plan, chosen=dataclasses.replace(plan.chosen, hourly_usd=hourly_usd))
    return plan


class Recorder:
    """A Reporter that keeps what the manager said; ``die_on`` kills the manager (a BaseException
    out of its loop, as a SIGKILL would stop it) when that event kind arrives."""

    def __init__(self, die_on: str | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.statuses: list[str] = []
        self.die_on = die_on

    def event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event["event"] == self.die_on:
            raise Killed

    def status(self, message: str) -> None:
        self.statuses.append(message)


class Killed(BaseException):
    pass


class Manager:
    """``Controller(...).apply`` in a thread with its own Store, as a manager process would run it."""

    def __init__(self, provider: SkyPilotProvider, plan: Plan, spec: JobSpec, reporter: Recorder | None = None,
                 **kwargs: Any) -> None:
        self.reporter = reporter or Recorder()
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None

        def main() -> None:
            try:
                store = Store(paths.db_path())
                self.outcome = Controller(store, provider, reporter=self.reporter, tick_s=0.02,
                                          **kwargs).apply(plan, spec)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 60) -> Outcome:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the manager did not finish"
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome


def wait(cond: Callable[[], Any], what: str, timeout: float = 30, manager: Manager | None = None) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        if manager is not None and not manager.thread.is_alive():
            raise AssertionError(f"the manager ended ({manager.error!r}, {manager.outcome}) before {what}; "
                                 f"it said {manager.reporter.statuses}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def kinds(store: Store, attempt: int | None = None) -> list[str]:
    return [e["event"] for _, e in store.events(NAME) if attempt is None or e["attempt"] == attempt]


def test_spot_run_survives_a_preemption(home: Path) -> None:
    fake, spec = FakeSky(), make_spec(SPOT)
    plan = priced(spec)
    store = Store(paths.db_path())  # before the manager's: two first opens of a new state.db race
    manager = Manager(provider_for(fake), plan, spec)

    # Launch: one managed job, named after the job, carrying what the node needs.
    job_id = wait(lambda: next(iter(fake.managed), None), "the managed job")
    assert fake.calls == [("jobs_launch", CLUSTER)]
    task = fake.configs[0]
    job_dir = paths.job_dir(NAME)
    assert task["file_mounts"]["~/optjob-job/job.json"] == str(job_dir / "job.json")
    assert task["envs"]["OPTJOB_STORAGE"] == BUCKET and task["envs"]["OPTJOB_ATTEMPT"] == "1"
    assert float(task["envs"]["OPTJOB_DEADLINE"]) > time.time() + 600  # $1 at the spot price: hours
    assert json.loads((job_dir / "job.json").read_text())["cache_dir"] is None  # the node's own cache

    # Events from the log stream land in the state store, in order, once each.
    run = fake.managed[job_id]
    run.status = "RUNNING"
    fake.line(run, "device cuda, corpus 12.3M tokens")  # not an event: ignored
    fake.emit(run, "step_started", index=0, kind="train", total=2)
    fake.emit(run, "progress", index=0, kind="train", step=5, max_steps=300, loss=3.1)
    fake.emit(run, "checkpoint", index=0, kind="train", step=5, path="/ckpt")
    wait(lambda: len(store.events(NAME)) == 3, "three events ingested", manager=manager)
    job = wait(lambda: (j := store.job(NAME)) and j.status == JobStatus.RUNNING and j, "running")
    assert (job.step_index, job.step_kind, job.progress["step"]) == (0, "train", 5)
    time.sleep(0.3)  # some billed time on the first node

    # A spot reclaim: attempt 1 ends preempted, attempt 2 adopts SkyPilot's relaunch.
    fake.preempt(job_id)
    wait(lambda: len(store.attempts(NAME)) == 2, "attempt 2", manager=manager)
    assert fake.count("jobs_launch") == 1  # adopted, not submitted again
    a1 = store.attempts(NAME)[0]
    assert a1.status == "preempted" and a1.ended_at is not None
    time.sleep(0.2)
    fake.recover(job_id)  # on a fresh node: a new log
    fake.emit(run, "step_started", index=0, kind="train", total=2)
    fake.emit(run, "progress", index=0, kind="train", step=6, max_steps=300, loss=3.0)
    fake.emit(run, "step_done", index=0, kind="train", output="/m", wall_s=1.0, metrics={}, skipped=False)
    fake.emit(run, "job_done", results="results.json", wall_s=2.0)
    time.sleep(0.2)
    fake.exit(run, 0)
    out = manager.join()

    assert (out.status, out.reason, out.attempts) == (JobStatus.SUCCEEDED, Reason.SUCCEEDED, 2)
    assert manager.reporter.statuses[1] == "attempt 1 preempted; resuming from checkpoint"
    assert kinds(store, 1) == ["step_started", "progress", "checkpoint"]
    assert kinds(store, 2) == ["step_started", "progress", "step_done", "job_done"]
    a1, a2 = store.attempts(NAME)
    assert (a1.status, a2.status) == ("preempted", "succeeded") and a1.released == a2.released == 1
    rate = plan.hourly_usd * plan.nodes / 3600
    assert a1.hourly_usd == a2.hourly_usd == plan.hourly_usd and a1.spot == a2.spot == 1
    assert a1.started_at < a1.ended_at <= a2.started_at < a2.ended_at  # type: ignore[operator]
    # Each attempt bills its own node time: the preempted one from its run's start up to its end, not
    # until the final teardown; the next from its recovered run's start (the recovery itself is free).
    assert a1.started_at < a1.billed_from < a1.ended_at < a2.billed_from < a2.ended_at  # type: ignore[operator]
    assert store.spend(NAME, 1, kind="node") == pytest.approx((a1.ended_at - a1.billed_from) * rate, rel=0.05)  # type: ignore[operator]
    assert store.spend(NAME, 2, kind="node") >= (a2.ended_at - a2.billed_from) * rate * 0.95  # type: ignore[operator]
    # The jobs controller that ran it has lines of its own, counted in the job's spend.
    assert store.spend(NAME, kind="controller") > 0 and a1.overhead_source.startswith("controller:")  # type: ignore[union-attr]
    assert out.spent_usd == pytest.approx(store.spend(NAME, 1) + store.spend(NAME, 2))
    assert fake.count("jobs_cancel") == 0  # it ended on its own; nothing to cancel
    assert cloud_commands.orphans(fake, cloud_commands.owned_resources(store)) == []


def test_budget_cap_mid_run_stops_within_max_usd(home: Path) -> None:
    """On demand (one cluster), a price at which $1 lasts the stop margin plus 4 s: the node loses
    its cluster after 1.5 s (attempt 2 relaunches on it, its deadline counting attempt 1's spend),
    then the cap is reached, the workload checkpoints and stops, and teardown — failing
    transiently — is retried by the provider."""
    fake, spec = FakeSky(), make_spec(ON_DEMAND, name=NAME)
    max_usd = spec.budget.max_usd
    assert max_usd == 1.0
    plan = priced(spec, hourly_usd=3600 * max_usd / (MARGIN + 4))
    rate = plan.hourly_usd / 3600
    provider = provider_for(fake, retries=2)
    store = Store(paths.db_path())
    manager = Manager(provider, plan, spec)

    wait(lambda: fake.clusters_.get(CLUSTER) and fake.clusters_[CLUSTER].jobs, "the cluster and its job",
         manager=manager)
    assert fake.calls[0] == ("launch", (CLUSTER, True, 1))  # down=True, autostop 1 min (teardown: always)
    a1 = store.attempts(NAME)[0]
    deadline1 = float(fake.configs[0]["envs"]["OPTJOB_DEADLINE"])
    assert deadline1 == pytest.approx(a1.started_at + max_usd / rate - MARGIN, abs=0.5)  # ~4 s away
    first = fake.job(CLUSTER, 1)
    first.status = "RUNNING"
    fake.emit(first, "progress", index=0, kind="train", step=1, max_steps=10_000, loss=5.0)
    time.sleep(1.5)

    fake.clusters_[CLUSTER].status = "STOPPED"  # the node went away under the job
    wait(lambda: 2 in fake.clusters_[CLUSTER].jobs, "the relaunch", manager=manager)
    assert fake.clusters_[CLUSTER].status == "UP"  # restarted by the launch
    a1, a2 = store.attempts(NAME)
    assert a1.status == "preempted" and fake.configs[1]["envs"]["OPTJOB_ATTEMPT"] == "2"
    # The budget counts every attempt: attempt 2's deadline is what attempt 1 left, not a fresh $1.
    deadline2 = float(fake.configs[1]["envs"]["OPTJOB_DEADLINE"])
    assert deadline2 == pytest.approx(a2.started_at + (max_usd - store.spend(NAME, 1)) / rate - MARGIN, abs=0.5)
    assert store.spend(NAME, 1) / rate > 1.4  # so the check above tells the two apart
    second = fake.job(CLUSTER, 2)
    second.status = "RUNNING"
    fake.emit(second, "progress", index=0, kind="train", step=2, max_steps=10_000, loss=4.0)
    fake.fail_downs = provider.retries - 1  # transient teardown failures: the provider retries them

    wait(lambda: fake.count("cancel"), "the stop request", manager=manager)  # the cap, reached mid-run
    assert store.job(NAME).status == JobStatus.STOPPING  # type: ignore[union-attr]
    assert any(s.startswith("budget: spend $") for s in manager.reporter.statuses)
    assert provider.poll(provider_handle(store, 2)).detail == "stopping: waiting for the checkpoint"
    fake.emit(second, "checkpoint", index=0, kind="train", step=3, path="/ckpt")  # SIGTERM -> checkpoint
    fake.emit(second, "stopped", index=0, reason="signal", step=3)
    fake.exit(second, 143, status="CANCELLED")
    out = manager.join()

    assert (out.status, out.reason) == (JobStatus.STOPPED, Reason.BUDGET)
    assert 0 < out.spent_usd <= max_usd
    assert store.spend(NAME, 1) > 0 and store.spend(NAME, 2) > 0
    assert kinds(store, 2)[-2:] == ["checkpoint", "stopped"]
    # The transient failures, a success, then attempt 2's teardown of the same (already gone) cluster.
    assert fake.count("down") == (provider.retries - 1) + 1 + 1
    assert fake.cluster(CLUSTER) is None
    assert all(a.released for a in store.attempts(NAME))
    with pytest.raises(Exception, match="budget"):
        out.raise_for_status()


def provider_handle(store: Store, attempt: int) -> Any:
    from optjob.providers.base import Handle

    return Handle.from_json(store.attempts(NAME)[attempt - 1].handle or {})


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_killed_manager_is_replaced_by_a_fresh_one(home: Path) -> None:
    fake, spec = FakeSky(), make_spec(SPOT)
    plan = priced(spec)
    store = Store(paths.db_path())
    manager = Manager(provider_for(fake), plan, spec, reporter=Recorder(die_on="progress"))
    job_id = wait(lambda: next(iter(fake.managed), None), "the managed job")
    run = fake.managed[job_id]
    run.status = "RUNNING"
    fake.emit(run, "step_started", index=0, kind="train", total=1)
    fake.emit(run, "progress", index=0, kind="train", step=1, max_steps=3, loss=3.0)
    with pytest.raises(Killed):
        manager.join()
    store.update_job(NAME, owner_pid=dead_pid())  # the manager's process is gone
    assert store.job(NAME).status == JobStatus.RUNNING  # type: ignore[union-attr]

    # While nobody manages it the job runs on; a fresh manager (store, provider) catches up.
    fake.emit(run, "progress", index=0, kind="train", step=2, max_steps=3, loss=2.0)
    fresh_store, fresh_provider = Store(paths.db_path()), provider_for(fake)
    job = reconcile_orphaned(fresh_store, fresh_provider, fresh_store.job(NAME))  # type: ignore[arg-type]
    assert job.status == JobStatus.RUNNING and job.progress["step"] == 2
    assert kinds(fresh_store) == ["step_started", "progress", "progress"]  # each event once
    assert cloud_commands.orphans(fake, cloud_commands.owned_resources(fresh_store)) == []  # still running

    # A second apply of the same spec attaches to the running job rather than launching another.
    second = Manager(provider_for(fake), plan, spec)
    wait(lambda: second.reporter.statuses, "the second apply to decide")
    assert "already running" in second.reporter.statuses[0]
    fake.emit(run, "progress", index=0, kind="train", step=3, max_steps=3, loss=1.0)
    fake.emit(run, "step_done", index=0, kind="train", output="/m", wall_s=1.0, metrics={}, skipped=False)
    fake.emit(run, "job_done", results="results.json", wall_s=2.0)
    fake.exit(run, 0)
    out = second.join()
    assert (out.status, out.attempts) == (JobStatus.SUCCEEDED, 1)
    assert fake.count("jobs_launch") == 1
    assert [e["event"] for e in second.reporter.events][-1] == "job_done"
    assert kinds(fresh_store).count("progress") == 3 and store.attempts(NAME)[0].released == 1


def test_orphans_are_flagged_and_removed(home: Path) -> None:
    """SkyPilot still holding something of a job optjob finished — a teardown SkyPilot confirmed but
    did not do — found by the ids this OPTJOB_HOME recorded; a manager killed inside launch leaves
    a recorded request, which the next look adopts instead of calling the attempt lost."""
    fake = FakeSky()
    provider = provider_for(fake)
    store = Store(paths.db_path())

    # Budgets that the cost of these pipelines on A100:8 stays far from: this test is about orphans.
    roomy = {"budget": BudgetSpec(max_usd=1000.0, max_hours=10.0)}
    spec = make_spec(SPOT).model_copy(update=roomy)
    manager = Manager(provider, priced(spec), spec)
    job_id = wait(lambda: next(iter(fake.managed), None), "the managed job")
    fake.managed[job_id].status = "RUNNING"
    fake.exit(fake.managed[job_id], 0)
    assert manager.join().status == JobStatus.SUCCEEDED
    on_demand = make_spec(ON_DEMAND, name="ondemand").model_copy(update=roomy)
    manager = Manager(provider, priced(on_demand), on_demand)
    wait(lambda: "optjob-ondemand" in fake.clusters_ and fake.clusters_["optjob-ondemand"].jobs, "the cluster job")
    left = fake.clusters_["optjob-ondemand"]
    fake.exit(left.jobs[max(left.jobs)], 0)
    assert manager.join().status == JobStatus.SUCCEEDED
    assert cloud_commands.orphans(fake, cloud_commands.owned_resources(store)) == []

    # SkyPilot confirmed both teardowns but still holds them (the same job id, the same incarnation).
    fake.managed[job_id].status = "RUNNING"
    fake.clusters_["optjob-ondemand"] = dataclasses.replace(left, downed_at_call=None, status="UP")
    # What this store did not launch is left alone: another home's cluster of a finished job's name.
    fake.clusters_[CLUSTER] = FakeCluster(CLUSTER, 1, launched_at=left.launched_at + 1)
    fake.clusters_["optjob-someone-else"] = FakeCluster("optjob-someone-else", 1)
    expected = ["optjob-cloudy (managed job 1)", "optjob-ondemand"]
    assert cloud_commands.orphans(fake, cloud_commands.owned_resources(store)) == expected
    warning = cloud_commands.orphan_warning(store, client=fake)
    assert warning is not None and ", ".join(expected) in warning and "down --orphans" in warning

    assert cloud_commands.down_orphans(store, provider) == expected
    assert fake.calls.count(("jobs_cancel", job_id)) == 1 and fake.managed[job_id].status == "CANCELLED"
    assert fake.cluster("optjob-ondemand") is None
    assert cloud_commands.orphan_warning(store, client=fake) is None
    assert fake.cluster(CLUSTER) is not None and fake.cluster("optjob-someone-else") is not None

    # The manager died inside launch, after SkyPilot took the request: adopted, not lost, not resubmitted.
    other = make_spec(SPOT, name="halfway")
    store.claim_job("halfway", provider="skypilot", job_dir=str(paths.job_dir("halfway")), spec_path=None,
                    spec_json=other.model_dump_json(), plan_json=None, owner_alive=lambda j: False)
    attempt = store.add_attempt("halfway", run=1, provider="skypilot", hourly_usd=2.0, nodes=1, spot=True)

    def killed(req: Any) -> None:
        fake.on_wait = None
        raise Killed

    fake.on_wait = killed
    with pytest.raises(Killed):
        provider.launch(LaunchRequest(spec=other, job_dir=paths.job_dir("halfway"), attempt=attempt.number))
    store.update_job("halfway", owner_pid=dead_pid())
    job = reconcile_orphaned(store, provider, store.job("halfway"))  # type: ignore[arg-type]
    (adopted,) = store.attempts("halfway")
    assert adopted.handle is not None and adopted.handle["data"]["job_id"] in fake.managed
    assert job.status in (JobStatus.LAUNCHING, JobStatus.RUNNING) and fake.count("jobs_launch") == 2


def test_orphan_check_never_slows_list_down(home: Path) -> None:
    store = Store(paths.db_path())
    asked: list[str] = []

    class Hanging(FakeSky):
        def reachable(self) -> bool:
            asked.append("reachable")
            time.sleep(30)
            return True

    local = make_spec({"cloud": "local"}, storage=None, name="here")
    store.claim_job("here", provider="local", job_dir="/x", spec_path=None, spec_json=local.model_dump_json(),
                    plan_json=None, owner_alive=lambda j: False)
    assert cloud_commands.orphan_warning(store, client=Hanging()) is None and asked == []  # not even asked
    store.claim_job(NAME, provider="skypilot", job_dir="/y", spec_path=None,
                    spec_json=make_spec(SPOT).model_dump_json(), plan_json=None, owner_alive=lambda j: False)
    t = time.perf_counter()
    assert cloud_commands.orphan_warning(store, client=Hanging(), timeout_s=0.5) is None
    assert time.perf_counter() - t < 2 and asked == ["reachable"]


def test_launch_failure_fails_the_job_and_leaves_nothing(home: Path) -> None:
    fake, spec = FakeSky(), make_spec(SPOT)
    fake.launch_error = ProviderError("SkyPilot could not launch managed job optjob-cloudy: no capacity",
                                      hint="widen accelerators")
    store = Store(paths.db_path())
    with pytest.raises(ProviderError, match="no capacity"):
        Controller(store, provider_for(fake), tick_s=0.02).apply(priced(spec), spec)
    job = store.job(NAME)
    assert job is not None and (job.status, job.reason) == (JobStatus.FAILED, Reason.FAILED)
    assert "no capacity" in (job.message or "") and job.owner_pid is None
    (attempt,) = store.attempts(NAME)
    assert attempt.status == "failed" and attempt.released == 1 and attempt.ended_at is not None
