"""The SkyPilot provider against SkyPilot as it really behaves (issue 12), one behaviour at a time,
on the fake client and a fake clock: unknown is not gone, spot is read right, logs follow every run
and are not downloaded every tick, launches are recorded before they are waited for and adopted
after, and Ctrl-C during a launch leaves nothing behind."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from fake_sky import FakeClock, FakeRequest, FakeSky, make_spec
from optjob.providers import AttemptState, LaunchRequest
from optjob.providers.sky_client import TransientSkyError
from optjob.providers.skypilot import SkyPilotProvider, read_request
from optjob.steps.events import parse_event

WHEEL = "/tmp/optjob-dist/optjob-0.1.0-py3-none-any.whl"
ON_DEMAND = {"cloud": "aws", "accelerators": "A100:8", "region": "us-east-1"}
SPOT = {**ON_DEMAND, "spot": True}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(clock: FakeClock) -> FakeSky:
    return FakeSky(clock=clock)


@pytest.fixture
def provider(fake: FakeSky, clock: FakeClock) -> SkyPilotProvider:
    return SkyPilotProvider(client=fake, wheel=WHEEL, sleep=clock.sleep, clock=clock, teardown_timeout_s=300,
                            confirm_interval_s=10, backoff_s=2)


def request(tmp_path: Path, resources: Mapping[str, Any], attempt: int = 1) -> LaunchRequest:
    return LaunchRequest(spec=make_spec(resources), job_dir=tmp_path / "job", attempt=attempt,
                         env={"OPTJOB_ATTEMPT": str(attempt)})


# -- 1. unknown is not gone -------------------------------------------------------------------------

@pytest.mark.parametrize("controller", ["UNREACHABLE", "STOPPED"])
def test_a_jobs_controller_that_cannot_answer_is_unknown_not_lost(provider: SkyPilotProvider, fake: FakeSky,
                                                                  tmp_path: Path, controller: str) -> None:
    handle = provider.launch(request(tmp_path, SPOT))
    job = fake.start(handle.data["job_id"])
    assert provider.poll(handle).state is AttemptState.RUNNING
    fake.controller = controller
    polled = provider.poll(handle)
    assert polled.state is AttemptState.UNKNOWN and not polled.state.is_terminal()
    assert "jobs controller" in polled.detail
    assert provider.read_log(handle, 0) == ("", 0)  # nothing to read is not an error either
    fake.controller = "UP"
    fake.exit(job, 0)
    assert provider.poll(handle).state is AttemptState.SUCCEEDED


def test_a_stopped_controller_is_asked_how_the_job_ended(provider: SkyPilotProvider, fake: FakeSky,
                                                         tmp_path: Path) -> None:
    handle = provider.launch(request(tmp_path, SPOT))
    fake.exit(fake.start(handle.data["job_id"]), 0)
    fake.stop_controller()  # idle: it autostops
    assert provider.poll(handle).state is AttemptState.UNKNOWN
    ended = provider.outcome(handle)  # restarts it (sky jobs queue --refresh) to read its table
    assert ended is not None and (ended.state, ended.exit_code) == (AttemptState.SUCCEEDED, 0)
    assert fake.count("controller_restart") == 1


def test_a_transient_error_is_tried_again_then_unknown_not_a_crash(provider: SkyPilotProvider, fake: FakeSky,
                                                                   tmp_path: Path) -> None:
    spot = provider.launch(request(tmp_path, SPOT))
    fake.flaky["managed_jobs"] = 1  # a blip: tried once more at once
    assert provider.poll(spot).state is AttemptState.LAUNCHING
    fake.flaky["managed_jobs"] = 2
    assert provider.poll(spot).state is AttemptState.UNKNOWN
    on_demand = provider.launch(request(tmp_path / "od", ON_DEMAND))
    fake.flaky["cluster"] = 2
    assert provider.poll(on_demand).state is AttemptState.UNKNOWN
    fake.flaky["job_status"] = 2
    assert provider.poll(on_demand).state is AttemptState.UNKNOWN
    assert provider.poll(on_demand).state is AttemptState.LAUNCHING


def test_a_cluster_autostop_removed_is_lost_even_while_skypilots_cache_says_up(
        provider: SkyPilotProvider, fake: FakeSky, tmp_path: Path) -> None:
    handle = provider.launch(request(tmp_path, ON_DEMAND))
    fake.exit(fake.job(handle.cluster, handle.data["job_id"]), 0)
    fake.autostop_down(handle.cluster, stale=True)  # gone; `sky status` (no refresh) still lists it UP
    polled = provider.poll(handle)
    assert polled.state is AttemptState.LOST, polled  # not PREEMPTED: nothing says the job did not finish
    assert provider.outcome(handle) is None  # SkyPilot kept no record: the manager asks the storage


def test_a_cluster_being_autostopped_is_unknown(provider: SkyPilotProvider, fake: FakeSky, tmp_path: Path) -> None:
    handle = provider.launch(request(tmp_path, ON_DEMAND))
    fake.job(handle.cluster, handle.data["job_id"]).status = "RUNNING"
    fake.clusters_[handle.cluster].status = "AUTOSTOPPING"
    assert provider.poll(handle).state is AttemptState.UNKNOWN


# -- 4. spot is read right ----------------------------------------------------------------------------

@pytest.mark.parametrize(("spot", "lands_on_demand", "expected"),
                         [(True, False, True), ("auto", False, True), ("auto", True, False)])
def test_spot_is_what_skypilot_launched(provider: SkyPilotProvider, fake: FakeSky, tmp_path: Path, spot: Any,
                                        lands_on_demand: bool, expected: bool) -> None:
    fake.auto_lands_on_demand = lands_on_demand
    handle = provider.launch(request(tmp_path, {**ON_DEMAND, "spot": spot}))
    fake.start(handle.data["job_id"])
    assert provider.poll(handle).spot is expected


# -- 5. logs follow every run, and are not downloaded every tick ---------------------------------------

def test_logs_keep_flowing_after_a_recovery_that_does_not_bump_the_count(provider: SkyPilotProvider, fake: FakeSky,
                                                                         clock: FakeClock, tmp_path: Path) -> None:
    first = provider.launch(request(tmp_path, SPOT))
    job_id = first.data["job_id"]
    job = fake.start(job_id)
    fake.emit(job, "progress", index=0, step=1)
    assert parse_event(provider.read_log(first, 0)[0])["step"] == 1  # type: ignore[index]
    fake.preempt(job_id)  # a controller restart: RECOVERING ...
    assert provider.poll(first).state is AttemptState.PREEMPTED
    second = provider.launch(request(tmp_path, SPOT, attempt=2))
    clock.now += 120
    fake.recover(job_id, counted=False)  # ... then RUNNING again, recovery_count unchanged
    assert fake.managed[job_id].recovery_count == 0
    assert provider.poll(second).state is AttemptState.RUNNING
    fake.emit(job, "progress", index=0, step=2)
    clock.now += provider.log_interval_s
    text, offset = provider.read_log(second, 0)
    assert parse_event(text)["step"] == 2 and offset > 0  # type: ignore[index]
    # A later preemption, recovered before the manager looked: the bound run is over all the same.
    fake.preempt(job_id)
    clock.now += 120
    fake.recover(job_id, counted=False)
    assert provider.poll(second).state is AttemptState.PREEMPTED
    assert provider.read_log(second, offset) == ("", offset)  # the log shown is the next run's


def test_the_log_is_fetched_at_most_every_interval_and_once_after_the_end(provider: SkyPilotProvider, fake: FakeSky,
                                                                          clock: FakeClock, tmp_path: Path) -> None:
    handle = provider.launch(request(tmp_path, ON_DEMAND))
    job = fake.job(handle.cluster, handle.data["job_id"])
    job.status = "RUNNING"
    offset = 0
    for step in range(11):  # eleven ticks of 0.5 s
        fake.emit(job, "progress", index=0, step=step)
        _, offset = provider.read_log(handle, offset)
        clock.now += 0.5
    assert fake.count("logs") == 2  # at 0 s and at 5 s, not ten whole-log downloads
    fake.emit(job, "job_done", results="results.json", wall_s=1.0)
    fake.exit(job, 0)
    assert provider.poll(handle).state is AttemptState.SUCCEEDED  # (reads the log once for the exit code)
    fetched = fake.count("logs")
    text, offset = provider.read_log(handle, offset)  # the end was seen: one final read, at once
    assert [e["event"] for e in map(parse_event, text.splitlines()) if e][-1] == "job_done"
    for _ in range(5):
        clock.now += 60
        assert provider.read_log(handle, offset) == ("", offset)
    assert fake.count("logs") == fetched + 1


# -- idempotent launches, Ctrl-C ----------------------------------------------------------------------

@pytest.mark.parametrize("resources", [ON_DEMAND, SPOT], ids=["cluster", "managed"])
def test_a_launch_is_recorded_before_waiting_and_adopted_after_a_transient_error(
        provider: SkyPilotProvider, fake: FakeSky, tmp_path: Path, resources: Mapping[str, Any]) -> None:
    fake.flaky["wait"] = provider.retries  # the API server drops every wait of the first launch call
    with pytest.raises(TransientSkyError):
        provider.launch(request(tmp_path, resources))
    recorded = read_request(tmp_path / "job", 1)
    assert recorded["state"] == "submitted" and recorded["request_id"] in fake.requests
    handle = provider.launch(request(tmp_path, resources))  # the manager retries: the same request
    assert len(fake.requests) == 1 and fake.count("launch") + fake.count("jobs_launch") == 1
    assert read_request(tmp_path / "job", 1)["job_id"] == handle.data["job_id"]


def test_a_launch_the_manager_died_in_is_adopted_not_repeated(provider: SkyPilotProvider, fake: FakeSky,
                                                              tmp_path: Path) -> None:
    def die(req: FakeRequest) -> None:
        raise SystemExit("the manager was killed while SkyPilot provisioned")

    fake.on_wait = die
    with pytest.raises(SystemExit):
        provider.launch(request(tmp_path, SPOT))
    fake.on_wait = None
    (rid,) = fake.requests
    assert fake.requests[rid].status == "RUNNING"  # the server goes on
    fresh = SkyPilotProvider(client=fake, wheel=WHEEL, sleep=lambda s: None)
    handle = fresh.adopt(tmp_path / "job", 1)
    assert handle is not None and handle.data["job_id"] in fake.managed and handle.data["mode"] == "managed"
    assert fake.count("jobs_launch") == 1
    assert json.loads((tmp_path / "job" / "skypilot-managed.json").read_text())["job_id"] == handle.data["job_id"]
    assert fresh.adopt(tmp_path / "job", 2) is None  # nothing was submitted for attempt 2


def test_ctrl_c_during_a_cluster_launch_cancels_the_request_and_removes_the_cluster(
        provider: SkyPilotProvider, fake: FakeSky, tmp_path: Path) -> None:
    def ctrl_c(req: FakeRequest) -> None:
        fake.on_wait = None  # one Ctrl-C
        raise KeyboardInterrupt

    fake.on_wait = ctrl_c
    with pytest.raises(KeyboardInterrupt):
        provider.launch(request(tmp_path, ON_DEMAND))
    (rid,) = fake.requests
    assert fake.calls.count(("cancel_request", rid)) == 1 and fake.requests[rid].status == "CANCELLED"
    assert fake.live() == []  # no request running, no half-made cluster
    assert read_request(tmp_path / "job", 1)["state"] == "cancelled"


def test_ctrl_c_after_the_managed_job_was_submitted_cancels_the_job(provider: SkyPilotProvider, fake: FakeSky,
                                                                    tmp_path: Path) -> None:
    def done_then_ctrl_c(req: FakeRequest) -> None:
        fake.on_wait = None
        fake.finish_request(req.request_id)  # the server submitted the job just before the Ctrl-C
        raise KeyboardInterrupt

    fake.on_wait = done_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        provider.launch(request(tmp_path, SPOT))
    (job_id,) = fake.managed
    assert fake.calls.count(("jobs_cancel", job_id)) == 1
    assert read_request(tmp_path / "job", 1) | {"handle": None} == {
        **read_request(tmp_path / "job", 1), "state": "cancelled", "job_id": job_id, "handle": None}
