"""The cloud meter prices what ran, and a cloud job stays safe unattended (issue 11, items 4 and 5).

The real ``SkyPilotProvider``, reconcile and meter, and a real SQLite store, against the fake SkyPilot
client (tests/providers/fake_sky.py: the cloud cannot be reached) on one ``ManualClock``: time moves
only when the test says, so nothing here sleeps or measures time. Prices come from a small catalog
(``Catalog.from_rows``: the rows SkyPilot's catalog has for these instances).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from optjob.manager.clock import ManualClock
from optjob.manager.commands.cost import cost_command, cost_rows
from optjob.manager.meter import stop_margin_s, teardown_margin_s
from optjob.manager.pricing.catalog import Catalog, CatalogRow
from optjob.manager.pricing.launched import Pricer
from optjob.manager.reconcile import enforce_stop, observe, release
from optjob.manager.store import AttemptRow, JobRow, Store
from optjob.providers.base import AttemptState, Handle, LaunchRequest, Placement
from optjob.providers.sky_task import STOP_FLAG_KEY, autostop_idle_minutes, unattended_end_s
from optjob.providers.skypilot import SkyPilotProvider

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "providers"))
from fake_sky import BUCKET, FakeSky, make_spec

WHEEL = "/tmp/optjob-dist/optjob-0.1.0-py3-none-any.whl"
NAME = "metered"
SPOT = {"cloud": "aws", "accelerators": "V100:1", "region": "us-east-1", "spot": True}
ON_DEMAND = {"cloud": "aws", "accelerators": "V100:1", "region": "us-east-1"}
CHEAP = Placement(cloud="aws", region="us-east-1", zone="use1-az1", instance_type="p3.2xlarge", spot=True,
                  accelerators="V100:1")
PRICEY = Placement(cloud="aws", region="us-east-1", zone="use1-az2", instance_type="p3.8xlarge", spot=True,
                   accelerators="V100:4")
CONTROLLER = Placement(cloud="aws", region="us-east-1", instance_type="m6i.xlarge")
#: SkyPilot's catalog rows for them (v8 aws/vms.csv): USD per node-hour, on demand and spot.
ROWS = [CatalogRow("aws", "us-east-1", "use1-az1", "p3.2xlarge", "V100", 1, 8, 61, 3.06, 0.40),
        CatalogRow("aws", "us-east-1", "use1-az2", "p3.8xlarge", "V100", 4, 32, 244, 12.24, 1.60),
        CatalogRow("aws", "us-east-1", "use1-az1", "m6i.xlarge", None, 0, 4, 16, 0.192, 0.08),
        CatalogRow("aws", "us-east-1", "use1-az1", "m6i.large", None, 0, 2, 8, 0.096, 0.04)]
HOUR = 3600.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def pricer() -> Pricer:
    return Pricer(lambda: Catalog.from_rows(ROWS), live=None)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_endpoint: str) -> Iterator[Path]:
    """An OPTJOB_HOME, and the job's bucket on moto's S3 (the stop flag is written there)."""
    import boto3

    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / "home"))
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


class World:
    """A store, the provider on the fake client, one job, all on ``clock``."""

    def __init__(self, home: Path, clock: ManualClock, pricer: Pricer, resources: dict[str, Any],
                 max_usd: float = 100.0) -> None:
        self.clock, self.pricer = clock, pricer
        self.fake = FakeSky(clock=clock.time)
        self.provider = SkyPilotProvider(client=self.fake, wheel=WHEEL, sleep=clock.sleep, clock=clock.time,
                                         retries=2, backoff_s=0.01, teardown_timeout_s=60, confirm_interval_s=1)
        self.store = Store(home / "state.db", clock=clock)
        self.spec = make_spec(resources, name=NAME)
        self.job_dir = home / "jobs" / NAME
        plan = {"budget": {"max_usd": max_usd, "max_hours": None},
                "chosen": {"cloud": "aws", "accelerators": "V100:1", "spot": True, "est_usd": 1.0}}
        self.job, _ = self.store.claim_job(NAME, provider="skypilot", job_dir=str(self.job_dir), spec_path=None,
                                           spec_json=self.spec.model_dump_json(), plan_json=json.dumps(plan),
                                           owner_alive=lambda job: False)

    def launch(self, plan_usd: float = 0.50, env: dict[str, str] | None = None) -> AttemptRow:
        """An attempt priced at the plan's offer (``plan_usd`` per node-hour), launched for real."""
        attempt = self.store.add_attempt(NAME, run=self.job.run, provider="skypilot", hourly_usd=plan_usd, nodes=1,
                                         spot=True)
        handle = self.provider.launch(LaunchRequest(spec=self.spec, job_dir=self.job_dir, attempt=attempt.number,
                                                    env=env or {}))
        self.store.update_attempt(attempt.id, handle=handle.to_json(), status=AttemptState.RUNNING)
        return self.attempt(attempt.number)

    def attempt(self, number: int) -> AttemptRow:
        return next(a for a in self.store.attempts(NAME) if a.number == number)

    def look(self, number: int) -> AttemptState:
        """One reconcile of the attempt, as the manager's tick or ``status`` does."""
        job = self.store.job(NAME)
        assert job is not None
        return observe(self.store, self.provider, job, self.attempt(number), pricer=self.pricer).poll.state

    def node_lines(self, number: int | None = None) -> list[Any]:
        return [r for r in self.store.ledger(NAME) if r["kind"] == "node" and number in (None, r["attempt"])]


def job_row(w: World) -> JobRow:
    job = w.store.job(NAME)
    assert job is not None
    return job


def test_a_recovery_onto_a_pricier_instance_bills_the_new_price(home: Path, clock: ManualClock,
                                                                pricer: Pricer) -> None:
    w = World(home, clock, pricer, SPOT)
    w.fake.lands_on = CHEAP
    a1 = w.launch()
    job_id = next(iter(w.fake.managed))
    w.fake.start(job_id)
    w.look(1)
    clock.advance(HOUR)
    w.look(1)
    assert w.store.spend(NAME, 1, kind="node") == pytest.approx(0.40)  # the catalog's spot price, not the plan's $0.50
    assert {r["source"] for r in w.node_lines(1)} == {"catalog:aws/us-east-1/p3.2xlarge/spot"}

    w.fake.preempt(job_id)  # SkyPilot recovers it onto the only capacity left: a p3.8xlarge
    assert w.look(1) is AttemptState.PREEMPTED
    a2 = w.launch()  # adopts SkyPilot's recovery
    assert a2.number == 2 and w.fake.count("jobs_launch") == 1
    clock.advance(600)  # the recovery itself: no node of attempt 2 yet
    w.fake.recover(job_id, onto=PRICEY)
    w.look(2)
    clock.advance(HOUR)
    w.look(2)
    a2 = w.attempt(2)
    assert (a2.hourly_usd, a2.price_source) == (1.60, "catalog:aws/us-east-1/p3.8xlarge/spot")
    assert w.store.spend(NAME, 2, kind="node") == pytest.approx(1.60)
    assert {r["source"] for r in w.node_lines(2)} == {"catalog:aws/us-east-1/p3.8xlarge/spot"}
    assert {r["hourly_usd"] for r in w.node_lines(2)} == {1.60}
    assert a1.number == 1 and w.store.spend(NAME, 1, kind="node") == pytest.approx(0.40, rel=1e-3)


def test_a_manager_away_across_recoveries_bills_every_run_it_never_saw(home: Path, clock: ManualClock,
                                                                       pricer: Pricer) -> None:
    """The manager submits and dies; SkyPilot runs the job, recovers it twice, and the manager looks
    again three hours later. Attempt 1 is the job's first run (SkyPilot's ``start_at``), so the two runs
    nobody saw are billed; it used to bind to the latest run and bill one hour of three (and the attempt
    adopting the current run billed only from its own creation, not from the run's start)."""
    w = World(home, clock, pricer, SPOT)
    w.fake.lands_on = CHEAP
    w.launch()
    job_id = next(iter(w.fake.managed))
    w.fake.start(job_id)  # nobody looks from here on
    first = clock.time()
    for _ in range(2):
        clock.advance(HOUR)
        w.fake.preempt(job_id)
        w.fake.recover(job_id, onto=CHEAP)
    latest = clock.time()
    clock.advance(HOUR)
    assert w.look(1) is AttemptState.PREEMPTED  # a later run superseded it while nobody looked
    a1 = w.attempt(1)
    assert (a1.billed_from, a1.gone_at) == (first, latest)
    a2 = w.launch()  # adopts the run SkyPilot is on now
    assert a2.number == 2 and w.fake.count("jobs_launch") == 1
    w.look(2)
    assert w.attempt(2).billed_from == latest
    # Three hours, none lost: the two runs nobody saw at the plan's price (nothing said what they ran on),
    # the current one from its start at its catalog price.
    assert w.store.spend(NAME, 1, kind="node") == pytest.approx(2 * 0.50)
    assert w.store.spend(NAME, 2, kind="node") == pytest.approx(1 * 0.40)


def test_pending_time_with_no_node_is_not_billed(home: Path, clock: ManualClock, pricer: Pricer) -> None:
    w = World(home, clock, pricer, SPOT)
    w.fake.lands_on = CHEAP
    w.launch()
    job_id = next(iter(w.fake.managed))
    for _ in range(3):  # PENDING in SkyPilot's queue for half an hour, then provisioning
        clock.advance(600)
        assert w.look(1) is AttemptState.LAUNCHING
    assert w.store.spend(NAME, kind="node") == 0 and w.attempt(1).billed_from is None
    w.fake.provision(job_id)  # the cluster exists: STARTING with a node (setup runs)
    w.look(1)
    node_at = clock.time()
    clock.advance(300)
    w.fake.start(job_id)
    w.look(1)
    clock.advance(HOUR - 300)
    w.look(1)
    assert w.attempt(1).billed_from == node_at
    assert w.store.spend(NAME, kind="node") == pytest.approx(0.40)  # one hour since the node, at its price
    # The jobs controller ran it all along (it is up while the job waits in its queue).
    ctl = w.store.spend(NAME, kind="controller")
    assert ctl > 0 and w.attempt(1).overhead_source.startswith("controller:estimate:aws/us-east-1/m6i.xlarge")  # type: ignore[union-attr]


def test_a_late_manager_bills_until_end_at_not_until_now(home: Path, clock: ManualClock, pricer: Pricer) -> None:
    w = World(home, clock, pricer, SPOT)
    w.fake.lands_on = CHEAP
    w.launch()
    job_id = next(iter(w.fake.managed))
    run = w.fake.start(job_id)
    w.look(1)
    started = clock.time()
    clock.advance(HOUR)
    w.look(1)  # the manager's last look, then it dies
    clock.advance(HOUR)
    w.fake.exit(run, 0)  # two hours in: SkyPilot records end_at and removes the cluster
    end_at = clock.time()
    clock.advance(10 * HOUR)  # `optjob status` ten hours later
    assert w.look(1) is AttemptState.SUCCEEDED
    release(w.store, w.provider, w.attempt(1))
    a1 = w.attempt(1)
    assert a1.gone_at == end_at and a1.ended_at == end_at and a1.released
    assert w.store.metered_seconds(NAME, 1) == pytest.approx(end_at - started)
    assert w.store.spend(NAME, kind="node") == pytest.approx(2 * 0.40)  # not twelve hours


def test_the_controller_line_is_in_optjob_cost_and_counts_against_the_budget(
        home: Path, clock: ManualClock, pricer: Pricer, capsys: pytest.CaptureFixture[str]) -> None:
    w = World(home, clock, pricer, SPOT)
    w.fake.lands_on, w.fake.controller_launched = CHEAP, CONTROLLER
    w.launch()
    job_id = next(iter(w.fake.managed))
    w.fake.start(job_id)
    w.look(1)
    clock.advance(HOUR)
    w.look(1)
    node, ctl = w.store.spend(NAME, kind="node"), w.store.spend(NAME, kind="controller")
    disk = 50 * 0.08 / 730  # its 50 GB disk (SkyPilot's default controller resources)
    assert ctl == pytest.approx(0.192 + disk)  # the controller's own instance, from sky.status: m6i.xlarge
    assert w.store.spend(NAME) == pytest.approx(node + ctl)
    assert {r["source"] for r in w.store.ledger(NAME) if r["kind"] == "controller"} == {
        "controller:catalog:aws/us-east-1/m6i.xlarge/on-demand"}

    rows = cost_rows(w.store, NAME)
    assert rows["controller"]["usd"] == pytest.approx(ctl, abs=1e-6) and rows["spent_usd"] == pytest.approx(node + ctl)
    assert rows["attempts"][0]["usd"] == pytest.approx(node, abs=1e-6)
    assert rows["attempts"][0]["price_source"] == "catalog:aws/us-east-1/p3.2xlarge/spot"
    cost_command(NAME, as_json=False)
    out = capsys.readouterr().out
    assert "\nmetered  ctl" in out and "jobs controller $" in out  # its own row (the table fits the terminal)

    # A cap the nodes alone are far from, the controller included is at: the budget stop comes.
    plan = {**job_row(w).plan, "budget": {"max_usd": node + ctl / 2, "max_hours": None}}
    w.store.update_job(NAME, plan_json=json.dumps(plan))
    obs = observe(w.store, w.provider, job_row(w), w.attempt(1), pricer=pricer)
    done = enforce_stop(w.store, w.provider, job_row(w), obs)
    assert done is not None and done.startswith("budget:")


def test_a_budget_stop_asks_through_the_flag_then_cancels_gracefully(home: Path, clock: ManualClock,
                                                                    pricer: Pricer) -> None:
    w = World(home, clock, pricer, SPOT, max_usd=1.0)
    w.fake.lands_on = CHEAP
    w.launch()
    job_id = next(iter(w.fake.managed))
    w.fake.start(job_id)
    w.look(1)
    # Run until the stop point: the cap less the unattended end, a checkpoint and the flag's latency.
    rate = 0.40 / HOUR + w.attempt(1).overhead_usd / HOUR
    handle = Handle.from_json(w.attempt(1).handle or {})
    margin = stop_margin_s("skypilot", None, w.spec) + w.provider.stop_latency_s(handle)
    clock.advance(1.0 / rate - margin + 1)
    obs = observe(w.store, w.provider, job_row(w), w.attempt(1), pricer=pricer)
    assert (enforce_stop(w.store, w.provider, job_row(w), obs) or "").startswith("budget:")

    # Asked through the storage flag the node watches; SkyPilot's cancel (which removes the node at
    # once) is held back, so the workload's checkpoint can reach storage first.
    from optjob.steps.storage import open_storage

    flag = json.loads(open_storage(BUCKET).get_bytes(STOP_FLAG_KEY) or b"null")
    assert flag["first_attempt"] == 1 and flag["attempt"] == 1
    assert w.fake.count("jobs_cancel") == 0
    obs = observe(w.store, w.provider, job_row(w), w.attempt(1), pricer=pricer)
    assert enforce_stop(w.store, w.provider, job_row(w), obs) is None  # within the grace: wait

    # The workload ignored it (or could not upload): the grace passes, the cancel is graceful.
    clock.advance(w.provider.stop_latency_s(handle) + 10)
    obs = observe(w.store, w.provider, job_row(w), w.attempt(1), pricer=pricer)
    assert "killed" in (enforce_stop(w.store, w.provider, job_row(w), obs) or "")
    cancels = [c for c in w.fake.calls if c[0].startswith("jobs_cancel")]
    assert cancels == [("jobs_cancel", job_id), ("jobs_cancel_graceful", job_id)]
    assert w.store.spend(NAME) <= 1.0


def test_without_a_flag_the_stop_cancels_gracefully_at_once(home: Path, clock: ManualClock, pricer: Pricer) -> None:
    w = World(home, clock, pricer, SPOT)
    w.launch()
    job_id = next(iter(w.fake.managed))
    w.fake.start(job_id)
    w.provider.stop(Handle.from_json(w.attempt(1).handle or {}))  # nobody wrote a flag
    assert [c for c in w.fake.calls if c[0].startswith("jobs_cancel")] == [
        ("jobs_cancel", job_id), ("jobs_cancel_graceful", job_id)]


def test_the_final_phase_autostop_is_in_the_launched_task_and_the_margin(home: Path, clock: ManualClock,
                                                                         pricer: Pricer) -> None:
    w = World(home, clock, pricer, ON_DEMAND)
    w.launch()
    assert w.fake.calls[0] == ("launch", ("optjob-metered", True, 1))  # sky.launch(down=True, idle_minutes=1)
    task = w.fake.configs[0]
    assert task["resources"]["autostop"] == {"idle_minutes": 1, "down": True}
    assert autostop_idle_minutes(w.spec) == 1 and w.spec.resources.autostop_minutes == 10
    # The node's deadline leaves what its removal takes with nobody watching: the idle minute, the
    # skylet's next autostop check (60 s), termination.
    assert teardown_margin_s("skypilot", w.spec) == unattended_end_s(w.spec) >= 60 + 60
    # A job kept for inspection keeps its autostop, and the margin grows with it.
    kept = make_spec({**ON_DEMAND, "autostop_minutes": 10}, name="kept").model_copy(update={"teardown": "never"})
    assert autostop_idle_minutes(kept) == 10 and teardown_margin_s("skypilot", kept) >= 10 * 60 + 60
    # The run script watches the stop flag beside the workload; a cluster job is not asked through it
    # (its cancel SIGTERMs the workload and leaves the node up: a second SIGTERM would mean "now").
    assert "optjob-stop-watch.py" in task["run"] and STOP_FLAG_KEY in task["run"]
    handle = Handle.from_json(w.attempt(1).handle or {})
    assert not w.provider.reads_stop_flag(handle) and w.provider.stop_latency_s(handle) == 0


def test_the_nodes_stop_watcher_sigterms_the_workload_when_the_flag_names_its_attempt(tmp_path: Path) -> None:
    """The watcher the run script starts, run for real against a folder storage and a real child."""
    import os
    import signal
    import subprocess

    from optjob.providers.sky_task import STOP_WATCHER

    store = tmp_path / "store"
    (store / "control").mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    script = tmp_path / "watch.py"
    script.write_text(STOP_WATCHER)
    env = {**os.environ, "OPTJOB_STORAGE": str(store), "OPTJOB_ATTEMPT": "3", "OPTJOB_STOP_POLL_S": "0.02",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    (store / STOP_FLAG_KEY).write_text(json.dumps({"first_attempt": 1, "attempt": 2}))  # an earlier attempt's
    watcher = subprocess.Popen([sys.executable, str(script), str(child.pid)], env=env, stdout=subprocess.PIPE,
                               text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)  # not for this node: it keeps running
        (store / STOP_FLAG_KEY).write_text(json.dumps({"first_attempt": 1, "attempt": 3}))
        assert child.wait(timeout=60) == -signal.SIGTERM
        assert "stop requested" in (watcher.communicate(timeout=60)[0] or "")
    finally:
        for proc in (child, watcher):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_manager_that_first_looks_late_bills_the_past_at_the_launched_price(
        home: Path, clock: ManualClock, pricer: Pricer) -> None:
    w = World(home, clock, pricer, SPOT)
    w.fake.lands_on = PRICEY
    w.launch()
    w.fake.start(next(iter(w.fake.managed)))
    started = clock.time()
    clock.advance(HOUR)  # the manager's first look, an hour into the run
    w.look(1)
    assert w.attempt(1).billed_from == started
    assert w.store.spend(NAME, kind="node") == pytest.approx(1.60)  # not the plan's $0.50
    assert {r["source"] for r in w.node_lines()} == {"catalog:aws/us-east-1/p3.8xlarge/spot"}


def test_no_relaunch_when_the_budget_left_is_less_than_one_checkpoint_interval(
        home: Path, clock: ManualClock) -> None:
    """The real Controller on the manual clock: SkyPilot starts recovering a preempted managed job by
    itself, but the ~$0.55 left covers less than one checkpoint interval (600 s at $3.60/h) beyond the
    stop margin, so optjob does not resume: it stops at the budget and cancels the recovery."""
    import dataclasses

    from optjob.manager import paths
    from optjob.manager.controller import Controller
    from optjob.manager.job_states import JobStatus, Reason
    from optjob.manager.planner import make_plan

    fake = FakeSky(clock=clock.time)
    provider = SkyPilotProvider(client=fake, wheel=WHEEL, sleep=clock.sleep, clock=clock.time, retries=2,
                                backoff_s=0.01, teardown_timeout_s=60, confirm_interval_s=1)
    spec = make_spec(SPOT, name=NAME)
    plan = make_plan(spec)
    assert plan.chosen is not None and spec.budget.max_usd == 1.0
    plan = dataclasses.replace(plan, chosen=dataclasses.replace(plan.chosen, hourly_usd=3.60))  # $0.001/s
    t0 = clock.time()

    def cloud(method: str) -> None:  # SkyPilot and the workload, as time passes
        if method != "managed_jobs" or not fake.managed:
            return
        run = fake.managed[1]
        if run.status == "PENDING":
            fake.start(1)
            for ts in (t0, t0 + 600):  # two checkpoints 600 s apart: the interval
                fake.emit(run, "checkpoint", index=0, kind="train", step=int(ts - t0), path="/c", ts=ts)
        elif run.status == "RUNNING" and clock.time() >= t0 + 400:
            fake.preempt(1)  # ~$0.45 spent, SkyPilot starts relaunching on its own

    fake.on_call = cloud
    store = Store(paths.db_path(), clock=clock)
    out = Controller(store, provider, tick_s=5.0, clock=clock).apply(plan, spec)

    assert (out.status, out.reason) == (JobStatus.STOPPED, Reason.BUDGET)
    assert "less than one checkpoint interval (600s)" in (out.message or "")
    assert out.attempts == 1 and fake.count("jobs_launch") == 1  # not resumed
    assert ("jobs_cancel_graceful", 1) in fake.calls  # SkyPilot's own recovery cancelled
    assert out.spent_usd <= 1.0


def test_a_late_look_at_a_cluster_autostop_removed_bills_no_further_than_its_unattended_end(
        home: Path, clock: ManualClock, pricer: Pricer) -> None:
    w = World(home, clock, pricer, ON_DEMAND)
    w.fake.lands_on = Placement(cloud="aws", region="us-east-1", instance_type="p3.2xlarge", spot=False)
    deadline = clock.time() + 2 * HOUR
    w.launch(env={"OPTJOB_DEADLINE": f"{deadline:.3f}"})
    w.fake.job("optjob-metered", 1).status = "RUNNING"
    assert w.look(1) is AttemptState.RUNNING
    since = w.attempt(1).billed_from
    clock.advance(10 * HOUR)  # the manager died; autostop removed the cluster after the deadline
    w.fake.autostop_down("optjob-metered", stale=False)
    assert w.look(1) is AttemptState.LOST
    release(w.store, w.provider, w.attempt(1))
    latest = deadline + unattended_end_s(w.spec)
    assert w.attempt(1).gone_at == latest
    assert w.store.metered_seconds(NAME, 1) == pytest.approx(latest - since)  # type: ignore[operator]
    assert w.store.spend(NAME, kind="node") == pytest.approx((latest - since) * 3.06 / HOUR)  # type: ignore[operator]
