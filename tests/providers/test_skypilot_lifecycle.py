"""The SkyPilot provider against the fake client: launch, poll, preemption -> new
attempt, stop, teardown (retried, confirmed), orphans, log offsets; and the
error translation against SkyPilot's real exception classes."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from fake_sky import FakeClock, FakeSky, make_spec, sky_home  # noqa: F401  (sky_home: fixture)
from optjob.providers import AttemptState, Handle, LaunchRequest
from optjob.providers.sky_client import (
    RealSkyClient,
    TransientSkyError,
    job_output,
    live_managed_jobs,
    translate_error,
)
from optjob.providers.skypilot import OWNER_FILE, SkyPilotProvider, find_orphans
from optjob.specs.errors import ProviderError, TeardownError
from optjob.steps.events import parse_event

WHEEL = "/tmp/optjob-dist/optjob-0.1.0-py3-none-any.whl"
ON_DEMAND = {"cloud": "aws", "accelerators": "A100:8", "region": "us-east-1"}
SPOT = {**ON_DEMAND, "spot": True}


@pytest.fixture
def fake() -> FakeSky:
    return FakeSky()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def provider(fake: FakeSky, clock: FakeClock) -> SkyPilotProvider:
    return SkyPilotProvider(client=fake, wheel=WHEEL, sleep=clock.sleep, clock=clock,
                            teardown_timeout_s=300, confirm_interval_s=10, backoff_s=2)


def request(tmp_path: Path, resources: Mapping[str, Any], attempt: int = 1) -> LaunchRequest:
    spec = make_spec(resources)
    return LaunchRequest(spec=spec, job_dir=tmp_path / "job", attempt=attempt,
                         env={"OPTJOB_ATTEMPT": str(attempt), "OPTJOB_DEADLINE": "1900000000"})


def test_on_demand_launch_and_run(provider: SkyPilotProvider, fake: FakeSky, tmp_path: Path) -> None:
    handle = provider.launch(request(tmp_path, ON_DEMAND))
    assert handle.provider == "skypilot" and handle.cluster == "optjob-cloudy" and handle.attempt == 1
    assert handle.data["mode"] == "cluster"
    assert fake.calls == [("launch", ("optjob-cloudy", True, 1))]  # teardown: always -> 1 idle minute
    task = fake.configs[0]
    assert task["resources"]["autostop"] == {"idle_minutes": 1, "down": True}
    assert task["file_mounts"]["~/optjob-job/job.json"] == str(tmp_path / "job" / "job.json")
    assert (tmp_path / "job" / "logs" / "attempt-1.skypilot.log").read_text().startswith("Launching")
    assert Handle.from_json(json.loads(json.dumps(handle.to_json()))) == handle

    job = fake.job("optjob-cloudy", handle.data["job_id"])
    assert provider.poll(handle).state is AttemptState.LAUNCHING
    job.status = "RUNNING"
    polled = provider.poll(handle)
    assert (polled.state, polled.nodes, polled.spot) == (AttemptState.RUNNING, 1, False)
    assert provider.poll(handle) == polled  # level-based, no side effects
    fake.exit(job, 0)
    assert provider.poll(handle).state is AttemptState.SUCCEEDED
    assert provider.poll(handle).exit_code == 0


@pytest.mark.parametrize(("code", "state"), [(1, AttemptState.FAILED), (4, AttemptState.STOPPED),
                                             (143, AttemptState.STOPPED)])
def test_exit_codes(provider: SkyPilotProvider, fake: FakeSky, tmp_path: Path, code: int,
                    state: AttemptState) -> None:
    handle = provider.launch(request(tmp_path, ON_DEMAND))
    fake.exit(fake.job(handle.cluster, handle.data["job_id"]), code)
    polled = provider.poll(handle)
    assert (polled.state, polled.exit_code) == (state, code)


@pytest.mark.parametrize(("status", "state"), [("FAILED_DRIVER", AttemptState.PREEMPTED),
                                               ("FAILED_SETUP", AttemptState.FAILED),
                                               ("SETTING_UP", AttemptState.LAUNCHING)])
def test_job_statuses(provider: SkyPilotProvider, fake: FakeSky, tmp_path: Path, status: str,
                      state: AttemptState) -> None:
    handle = provider.launch(request(tmp_path, ON_DEMAND))
    fake.job(handle.cluster, handle.data["job_id"]).status = status
    assert provider.poll(handle).state is state


def test_cluster_gone_or_stopped(provider: SkyPilotProvider, fake: FakeSky, tmp_path: Path) -> None:
    handle = provider.launch(request(tmp_path, ON_DEMAND))
    fake.clusters_[handle.cluster].status = "STOPPED"
    assert provider.poll(handle).state is AttemptState.PREEMPTED
    del fake.clusters_[handle.cluster]
    polled = provider.poll(handle)
    assert polled.state is AttemptState.LOST and polled.nodes == 0


def test_stop_waits_for_the_checkpoint(provider: SkyPilotProvider, fake: FakeSky, clock: FakeClock,
                                       tmp_path: Path) -> None:
    handle = provider.launch(request(tmp_path, ON_DEMAND))
    job = fake.job(handle.cluster, handle.data["job_id"])
    job.status = "RUNNING"
    saved = handle.to_json()  # the manager keeps the handle as launched, not as stop() left it
    provider.stop(Handle.from_json(saved))
    handle = Handle.from_json(saved)
    assert fake.calls[-1] == ("cancel", (handle.cluster, handle.data["job_id"]))
    polled = provider.poll(handle)
    assert polled.state is AttemptState.RUNNING and "stopping" in polled.detail
    fake.line(job, "[optjob] exit-code 143")
    assert (provider.poll(handle).state, provider.poll(handle).exit_code) == (AttemptState.STOPPED, 143)

    other = provider.launch(request(tmp_path, ON_DEMAND, attempt=2))  # no marker ever comes
    fake.job(other.cluster, other.data["job_id"]).status = "RUNNING"
    provider.stop(other)
    clock.now += provider.stop_grace_s + 1
    assert provider.poll(other).state is AttemptState.STOPPED
    provider.stop(other)  # safe on an ended attempt


def test_read_log_offsets_and_events(provider: SkyPilotProvider, fake: FakeSky, clock: FakeClock,
                                     tmp_path: Path) -> None:
    handle = provider.launch(request(tmp_path, ON_DEMAND))
    job = fake.job(handle.cluster, handle.data["job_id"])
    assert provider.read_log(handle, 0) == ("", 0)
    fake.emit(job, "step_started", index=0, kind="train", total=2)
    fake.line(job, "plain text é")
    job.log.append('(optjob-cloudy, pid=4242) {"event": "progress", "ts": 0, "v": 1, "step": 1')  # partial
    clock.now += provider.log_interval_s  # SkyPilot is asked for the log at most this often
    text, offset = provider.read_log(handle, 0)
    assert text.count("\n") == 2 and offset == len(text.encode())
    events = [e for e in map(parse_event, text.splitlines()) if e]
    assert [e["event"] for e in events] == ["step_started"]
    assert provider.read_log(handle, offset) == ("", offset)  # partial line held back
    job.log.append(', "max_steps": 2}\n')
    clock.now += provider.log_interval_s
    more, offset2 = provider.read_log(handle, offset)
    assert parse_event(more)["step"] == 1 and offset2 > offset
    whole, _ = provider.read_log(handle, 0)
    assert whole == text + more  # each byte once


def test_launch_failure_is_actionable_and_leaves_nothing(provider: SkyPilotProvider, fake: FakeSky,
                                                         tmp_path: Path, sky_home: Path) -> None:  # noqa: F811
    from sky import exceptions

    fake.launch_error = translate_error(
        exceptions.ResourcesUnavailableError("Failed to acquire resources in all zones"), "launch x")
    with pytest.raises(ProviderError) as err:
        provider.launch(request(tmp_path, ON_DEMAND))
    assert "no capacity" in str(err.value) and "spot: auto" in str(err.value)
    assert fake.count("down") == 1 and fake.cluster("optjob-cloudy") is None


def test_teardown_retries_then_confirms(provider: SkyPilotProvider, fake: FakeSky, clock: FakeClock,
                                        tmp_path: Path) -> None:
    handle = provider.launch(request(tmp_path, ON_DEMAND))
    fake.fail_downs, fake.down_lag = 2, 3
    provider.teardown(handle)
    assert fake.count("down") == 3
    assert clock.slept[:2] == [2, 4]  # exponential backoff on the transient failures
    assert clock.slept[2:] == [10, 10, 10]  # confirmation polls until SkyPilot reports it gone
    assert fake.cluster(handle.cluster) is None
    provider.teardown(handle)  # idempotent
    provider.teardown(Handle(provider="skypilot", cluster="optjob-never", attempt=1))


def test_a_run_without_storage_comes_home_before_down_and_not_when_the_money_is_at_hand(
        fake: FakeSky, clock: FakeClock, tmp_path: Path) -> None:
    """On-demand without ``storage.artifacts``: teardown copies the job folder home (once) while the
    cluster still exists, then downs it; a budget kill downs at once and says nothing was copied."""
    order: list[str] = []

    def runner(argv: Any, out: Any) -> tuple[int, str]:
        order.append(argv[0])
        assert fake.cluster("optjob-cloudy") is not None  # before down
        if argv[0] == "ssh":
            import io
            import tarfile

            with tarfile.open(fileobj=out, mode="w|gz") as tar:
                data = b'{"steps": []}'
                info = tarfile.TarInfo("./results.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return 0, ""

    provider = SkyPilotProvider(client=fake, wheel=WHEEL, sleep=clock.sleep, clock=clock, copy_runner=runner)
    spec = make_spec(ON_DEMAND, storage=None)
    job = tmp_path / "job"
    handle = provider.launch(LaunchRequest(spec=spec, job_dir=job, attempt=1, env={"OPTJOB_ATTEMPT": "1"}))
    assert handle.data["copy_home"] is True
    provider.teardown(handle)
    assert order == ["sky", "ssh"] and fake.count("down") == 1
    assert (job / "results.json").read_text() == '{"steps": []}'
    provider.teardown(handle)  # idempotent: copied once
    assert order == ["sky", "ssh"]

    again = provider.launch(LaunchRequest(spec=spec, job_dir=job, attempt=2, env={"OPTJOB_ATTEMPT": "2"}))
    provider.kill(again)
    assert order == ["sky", "ssh"] and fake.cluster("optjob-cloudy") is None
    assert "budget was at hand" in (job / "logs" / "attempt-2.skypilot.log").read_text()


def test_teardown_unconfirmed_raises(provider: SkyPilotProvider, fake: FakeSky, tmp_path: Path) -> None:
    handle = provider.launch(request(tmp_path, ON_DEMAND))
    fake.stuck.add(handle.cluster)
    with pytest.raises(TeardownError, match="still reports"):
        provider.teardown(handle)
    fake.stuck.clear()
    fake.fail_downs = 99
    with pytest.raises(TeardownError, match="could not tear down"):
        provider.teardown(handle)
    assert fake.count("down") == 1 + provider.retries


def test_spot_preemption_becomes_new_attempts(provider: SkyPilotProvider, fake: FakeSky,
                                              tmp_path: Path) -> None:
    first = provider.launch(request(tmp_path, SPOT))
    assert first.data["mode"] == "managed" and first.data["recovery_count"] == 0
    assert fake.calls == [("jobs_launch", "optjob-cloudy")]
    job_id = first.data["job_id"]
    job = fake.managed[job_id]
    assert provider.poll(first).state is AttemptState.LAUNCHING
    job.status = "RUNNING"
    polled = provider.poll(first)
    assert (polled.state, polled.spot, polled.nodes) == (AttemptState.RUNNING, True, 1)
    fake.emit(job, "progress", index=0, step=5)
    text, _ = provider.read_log(first, 0)
    assert parse_event(text)["step"] == 5

    fake.preempt(job_id)  # RECOVERING: this attempt is over, SkyPilot is relaunching
    assert provider.poll(first).state is AttemptState.PREEMPTED
    second = provider.launch(request(tmp_path, SPOT, attempt=2))
    assert fake.count("jobs_launch") == 1  # adopted, not resubmitted
    assert second.data["job_id"] == job_id and second.data["prev_mark"] == job.last_recovered_at
    assert json.loads((tmp_path / "job" / OWNER_FILE).read_text()) == {"job_id": job_id, "attempt": 2}
    assert provider.poll(second).state is AttemptState.LAUNCHING
    provider.teardown(first)  # a later attempt owns the job: nothing is cancelled
    assert fake.count("jobs_cancel") == 0

    fake.recover(job_id)
    assert provider.poll(second).state is AttemptState.RUNNING
    assert provider.poll(first).state is AttemptState.PREEMPTED  # stays preempted
    assert provider.read_log(first, 0) == ("", 0)  # the new run's log is not attempt 1's
    fake.emit(job, "progress", index=0, step=6)
    assert parse_event(provider.read_log(second, 0)[0])["step"] == 6

    fake.preempt(job_id)
    fake.recover(job_id)  # the manager polled late: recovery already done
    assert provider.poll(second).state is AttemptState.PREEMPTED
    third = provider.launch(request(tmp_path, SPOT, attempt=3))
    assert third.data["recovery_count"] == 2
    assert provider.poll(third).state is AttemptState.RUNNING
    fake.exit(job, 0)
    assert provider.poll(third).state is AttemptState.SUCCEEDED
    assert provider.poll(second).state is AttemptState.PREEMPTED
    provider.teardown(third)
    assert fake.count("jobs_cancel") == 0  # already finished: nothing to cancel


def test_only_this_job_folders_managed_job_is_adopted(provider: SkyPilotProvider, fake: FakeSky,
                                                      tmp_path: Path) -> None:
    stray = provider.launch(request(tmp_path / "elsewhere", SPOT))  # same name, another job folder
    fake.managed[stray.data["job_id"]].status = "RUNNING"
    mine = provider.launch(request(tmp_path, SPOT, attempt=2))
    assert mine.data["job_id"] != stray.data["job_id"] and fake.count("jobs_launch") == 2
    assert find_orphans(fake, [], known_active=[]) == ["optjob-cloudy"]


def test_spot_teardown_cancels_and_confirms(provider: SkyPilotProvider, fake: FakeSky, clock: FakeClock,
                                           tmp_path: Path) -> None:
    handle = provider.launch(request(tmp_path, {**SPOT, "spot": "auto"}))
    assert "ordered" in fake.configs[0]["resources"]
    fake.managed[handle.data["job_id"]].status = "RUNNING"
    fake.cancel_lag = 2
    provider.teardown(handle)
    assert fake.count("jobs_cancel") == 1 and fake.managed[handle.data["job_id"]].status == "CANCELLED"
    assert provider.poll(handle).state is AttemptState.STOPPED
    provider.teardown(handle)
    assert fake.count("jobs_cancel") == 1


def test_managed_failures(provider: SkyPilotProvider, fake: FakeSky, tmp_path: Path) -> None:
    handle = provider.launch(request(tmp_path, SPOT))
    job = fake.managed[handle.data["job_id"]]
    job.status, job.failure_reason = "FAILED_NO_RESOURCE", "no A100 spot capacity"
    polled = provider.poll(handle)
    assert polled.state is AttemptState.FAILED and "no capacity" in polled.detail
    fake.exit(job, 4)
    assert (provider.poll(handle).state, provider.poll(handle).exit_code) == (AttemptState.STOPPED, 4)


def test_find_orphans(provider: SkyPilotProvider, fake: FakeSky, tmp_path: Path) -> None:
    provider.launch(request(tmp_path, ON_DEMAND))
    provider.launch(LaunchRequest(spec=make_spec(SPOT, name="spotty"), job_dir=tmp_path / "s", attempt=1))
    fake.clusters_["someone-else"] = type(fake.clusters_["optjob-cloudy"])("someone-else", 1)
    assert find_orphans(fake, ["optjob-cloudy", "optjob-done"]) == ["optjob-cloudy"]
    assert find_orphans(fake, ["optjob-spotty"]) == ["optjob-spotty"]
    assert find_orphans(fake, [], known_active=["optjob-cloudy"]) == ["optjob-spotty"]


SKY = importlib.util.find_spec("sky") is not None


def test_translate_real_sky_exceptions(sky_home: Path) -> None:  # noqa: F811
    from sky import exceptions

    cases = [
        (exceptions.ResourcesUnavailableError("no A100 in us-east-1"), "no capacity", ProviderError),
        (exceptions.ResourcesUnavailableError("VcpuLimitExceeded: quota"), "quota", ProviderError),
        (exceptions.NoCloudAccessError("no cloud access"), "sky check", ProviderError),
        (ValueError("No cloud is enabled. Please run sky check"), "sky check", ProviderError),
        (exceptions.CloudUserIdentityError("expired token"), "sky check", ProviderError),
        (exceptions.InvalidCloudCredentials("bad key"), "sky check", ProviderError),
        (exceptions.ApiServerConnectionError("http://127.0.0.1:46580"), "sky api start", TransientSkyError),
        (exceptions.ServerTemporarilyUnavailableError("busy"), "sky api logs", TransientSkyError),
        (exceptions.ProvisionPrechecksError([ValueError("x")]), "sky check", ProviderError),
        (RuntimeError("boom"), "sky api logs", ProviderError),
        (RuntimeError("ConnectionError: raw.githubusercontent.com/skypilot-org/skypilot-catalog/x.csv"),
         "instance catalog", ProviderError),
        (exceptions.ClusterDoesNotExist("\x1b[33mCluster 'optjob-x' does not exist.\x1b[0m"), "'optjob-x' does",
         ProviderError),
    ]
    for exc, words, kind in cases:
        err = translate_error(exc, "launch optjob-x")
        assert type(err) is kind, exc
        assert words in str(err) and "\n" not in str(err) and "\x1b" not in str(err)
        assert str(err).startswith("SkyPilot could not launch optjob-x")


def test_real_client_without_api_server(monkeypatch: pytest.MonkeyPatch, sky_home: Path) -> None:  # noqa: F811
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SKYPILOT_API_SERVER_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(TransientSkyError, match="sky api start"):
        RealSkyClient().cluster("optjob-x")
    provider = SkyPilotProvider(client=RealSkyClient(), sleep=lambda s: None, retries=2,
                                teardown_timeout_s=0)
    with pytest.raises(TeardownError, match="sky api start"):
        provider.teardown(Handle(provider="skypilot", cluster="optjob-x", attempt=1))


def test_importing_providers_does_not_import_sky() -> None:
    code = ("import sys, optjob.providers, optjob.providers.skypilot, optjob.providers.sky_task, "
            "optjob.providers.sky_client; assert 'sky' not in sys.modules, 'sky imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not (SKY and os.environ.get("OPTJOB_TEST_SKY_API")),
                    reason="starts a local SkyPilot API server (~30 s, no cloud needed): set OPTJOB_TEST_SKY_API=1")
def test_real_client_against_a_local_api_server(sky_home: Path) -> None:  # noqa: F811
    """RealSkyClient's SDK calls against a real (local, cloud-less) SkyPilot API server."""
    import sky

    client = RealSkyClient()
    try:
        assert client.cluster("optjob-none") is None  # starts the server on first use
        assert client.clusters() == [] and live_managed_jobs(client) == []  # no jobs controller: no job
        client.down("optjob-none")  # an absent cluster is fine
        with pytest.raises(ProviderError, match="does not exist"):
            client.job_status("optjob-none", 1)
        provider = SkyPilotProvider(client=client, teardown_timeout_s=30, confirm_interval_s=1)
        provider.teardown(Handle(provider="skypilot", cluster="optjob-none", attempt=1))
        assert find_orphans(client, ["optjob-none"]) == []
    finally:
        sky.api_stop()


def test_job_output_drops_skypilot_status_lines() -> None:
    """SkyPilot's own lines come and go between log reads; the job's output must be a stable prefix."""
    early = ("INFO: Waiting 1s for the logs to be written...\n"
             "(task, pid=7) {\"event\": \"step_started\", \"ts\": 0, \"v\": 1}\n")
    late = ("(task, pid=7) {\"event\": \"step_started\", \"ts\": 0, \"v\": 1}\n"
            "(task, pid=7) hello\n"
            "\x1b[32m✓ Job finished (status: SUCCEEDED).\x1b[0m\n")
    assert job_output(late).startswith(job_output(early))
    assert job_output(late) == ("(task, pid=7) {\"event\": \"step_started\", \"ts\": 0, \"v\": 1}\n"
                                "(task, pid=7) hello\n")
    assert job_output("\x1b[31mERROR: Logs for job 3 (status: INIT) does not exist.\x1b[0m\n") == ""
