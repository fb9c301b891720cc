"""The fake SkyPilot client is held to SkyPilot 0.14.1's real behaviour.

Two kinds of checks:

* ``client``-parametrized tests run the *same* assertions against ``FakeSky`` and against
  ``RealSkyClient`` talking to a real, local, cloud-less SkyPilot API server. Starting that server
  takes ~30 s and spawns processes, so the real half is opt-in: ``OPTJOB_TEST_SKY_API=1``
  (without it those cases are skipped, and say so).
* The rest run offline against the installed ``sky`` package itself: its exception classes and
  what ``RealSkyClient`` turns them into, its status enums, the resources strings it prints (which
  carry spot-ness), the log prefix of a task's lines, and the SDK facts the provider relies on
  (``stream_and_get`` does not cancel a request; ``api_cancel`` does; ``queue_v2(refresh=...)``).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_sky import SKYPILOT_VERSION, FakeSky, make_spec, sky_home  # noqa: F401  (sky_home: fixture)
from optjob.providers.sky_client import (
    MANAGED_LAUNCHING,
    MANAGED_TERMINAL,
    REQUEST_DONE,
    ClusterGone,
    ClusterNotUp,
    ControllerUnavailable,
    RealSkyClient,
    SkyClient,
    _nodes_spot,
    controller_unavailable,
    live_managed_jobs,
)
from optjob.providers.sky_task import task_config
from optjob.steps.events import parse_event

SKY = importlib.util.find_spec("sky") is not None
REAL_API = SKY and bool(os.environ.get("OPTJOB_TEST_SKY_API"))
CATALOG = Path(__file__).resolve().parents[1] / "data" / "skypilot-catalog" / "v8"
pytestmark = pytest.mark.skipif(not SKY, reason="SkyPilot is not installed")


@pytest.fixture(scope="module")
def real_client(sky_home: Path) -> Iterator[RealSkyClient]:  # noqa: F811
    import sky

    client = RealSkyClient()
    try:
        yield client
    finally:
        sky.api_stop()


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.skipif(
    not REAL_API, reason="starts a local SkyPilot API server (~30 s, no cloud): set OPTJOB_TEST_SKY_API=1"))])
def client(request: pytest.FixtureRequest) -> SkyClient:
    if request.param == "real":
        return request.getfixturevalue("real_client")  # type: ignore[no-any-return]
    fake = FakeSky()
    fake.controller = "NONE"  # like a fresh API server: no jobs controller was ever launched
    return fake


# -- the same assertions on the fake and on the real client ------------------------------------------

def test_a_missing_cluster_is_none_when_listed_and_gone_when_used(client: SkyClient) -> None:
    assert client.cluster("optjob-contract-none") is None
    assert "optjob-contract-none" not in {c.name for c in client.clusters()}
    for use in (lambda: client.job_status("optjob-contract-none", 1), lambda: client.logs("optjob-contract-none", 1),
                lambda: client.cancel("optjob-contract-none", 1)):
        with pytest.raises(ClusterGone, match="does not exist"):
            use()
    client.down("optjob-contract-none")  # tearing down what is not there is fine


def test_no_jobs_controller_is_not_no_jobs(client: SkyClient) -> None:
    with pytest.raises(ControllerUnavailable) as err:
        client.managed_jobs()
    assert err.value.absent and not err.value.stopped
    with pytest.raises(ControllerUnavailable):
        client.managed_job(7)
    with pytest.raises(ControllerUnavailable):
        client.jobs_cancel(7)
    assert client.managed_logs(7) == ""  # tail_logs complains on its own stream, returns no output
    assert live_managed_jobs(client) == []  # no controller runs no job: nothing is orphaned


def test_an_unknown_request_has_no_status(client: SkyClient) -> None:
    assert client.request_status("optjob-contract-no-such-request") is None


# -- the real package, offline ------------------------------------------------------------------------

def test_installed_skypilot_is_the_version_the_fake_copies(sky_home: Path) -> None:  # noqa: F811
    import sky

    assert sky.__version__ == SKYPILOT_VERSION


def test_cluster_not_up_from_a_jobs_call_becomes_controller_unavailable(sky_home: Path) -> None:  # noqa: F811
    from sky import exceptions
    from sky.utils import status_lib

    stopped = controller_unavailable(exceptions.ClusterNotUpError(
        "Jobs controller is stopped.", cluster_status=status_lib.ClusterStatus.STOPPED))
    assert stopped.stopped and not stopped.absent and "is stopped" in stopped.message
    never = controller_unavailable(exceptions.ClusterNotUpError("No in-progress managed jobs."))
    assert never.absent and not never.stopped

    class Head:  # a handle whose head answers (is_controller_accessible: the SSH check failed)
        head_ip = "10.0.0.1"

    down = controller_unavailable(exceptions.ClusterNotUpError(
        "Failed to connect to jobs controller", cluster_status=status_lib.ClusterStatus.UP, handle=Head()))
    assert not down.stopped and not down.absent and "cannot be reached" in down.message
    assert all(isinstance(e, ControllerUnavailable) for e in (stopped, never, down))


def test_real_cluster_exceptions_become_gone_and_not_up(sky_home: Path) -> None:  # noqa: F811
    from sky import exceptions
    from sky.utils import status_lib

    client = RealSkyClient()

    def raise_(exc: BaseException) -> None:
        raise exc

    with pytest.raises(ClusterGone, match="does not exist"):
        client._call("get job 1 on optjob-x", lambda: raise_(exceptions.ClusterDoesNotExist(
            "Cluster 'optjob-x' does not exist.")))
    with pytest.raises(ClusterNotUp):
        client._call("get job 1 on optjob-x", lambda: raise_(exceptions.ClusterNotUpError(
            "not up", cluster_status=status_lib.ClusterStatus.STOPPED)))
    assert issubclass(exceptions.ClusterDoesNotExist, ValueError)  # what SkyPilot documents


def test_status_values_are_skypilots(sky_home: Path) -> None:  # noqa: F811
    from optjob.providers import skypilot
    from sky.jobs.state import ManagedJobStatus
    from sky.server.requests.requests import RequestStatus
    from sky.skylet.job_lib import JobStatus
    from sky.utils.status_lib import ClusterStatus

    managed = {s.value for s in ManagedJobStatus}
    assert {s.value for s in ManagedJobStatus if s.is_terminal()} == MANAGED_TERMINAL
    assert managed | {"SUBMITTED"} >= MANAGED_LAUNCHING  # SUBMITTED: DEPRECATED_SUBMITTED's value
    assert {"RUNNING", "RECOVERING", "CANCELLING", "WINDING_DOWN"} <= managed
    assert set(skypilot._LAUNCHING) <= {s.value for s in JobStatus} | managed
    assert set(skypilot._FIXED) <= {s.value for s in JobStatus}
    assert {"INIT", "UP", "STOPPED", "AUTOSTOPPING"} <= {s.value for s in ClusterStatus}
    assert REQUEST_DONE == {"SUCCEEDED", "FAILED", "CANCELLED"} <= {s.value for s in RequestStatus}


@pytest.fixture(scope="module")
def catalog(sky_home: Path) -> Path:  # noqa: F811
    """SkyPilot reads its catalog from ~/.sky/catalogs/v8 — the HOME it was first imported under —
    and never re-downloads a file put there."""
    from sky.catalog import common

    dest = Path(common.get_catalog_path("x")).parent
    if not dest.is_relative_to(tempfile.gettempdir()):
        pytest.skip(f"SkyPilot was imported under a real HOME ({dest}); not writing a catalog there")
    for cloud in ("aws", "common"):
        if not (dest / cloud).exists():
            shutil.copytree(CATALOG / cloud, dest / cloud)
    return dest


def test_spot_is_read_from_the_strings_skypilot_prints(catalog: Path) -> None:
    import sky
    from sky.backends import backend_utils
    from sky.utils import resources_utils

    def launched(use_spot: bool, nodes: int = 2) -> str:
        res = sky.Resources(infra="aws/us-east-1", instance_type="p4d.24xlarge", accelerators={"A100": 8},
                            use_spot=use_spot)
        simple, _ = resources_utils.format_resource(res, simplified_only=False)
        return f"{nodes}x{simple}"  # as get_readable_resources_repr / sky.status prefix it

    assert "[spot]" in launched(True)  # lowercase: what issue 12 found "[Spot]" never matching
    assert _nodes_spot(launched(True)) == (2, True)
    assert _nodes_spot(launched(False, 1)) == (1, False)

    def requested(*spots: bool) -> str:
        task = sky.Task(run="true", name="optjob-x")
        task.set_resources({sky.Resources(accelerators={"A100": 8}, use_spot=s) for s in spots})
        return backend_utils.get_task_resources_str(task, is_managed_job=True)

    assert _nodes_spot(requested(True)) == (1, True)
    assert _nodes_spot(requested(True, False)) == (1, None)  # spot: auto, not launched yet: unknown
    assert _nodes_spot(requested(False)) == (1, False)
    assert _nodes_spot("-") == (1, None)


def test_the_fake_reports_spot_as_skypilot_would() -> None:
    fake = FakeSky()
    for spot, expected in ((True, True), (False, False), ("auto", True)):
        config = task_config(make_spec({"cloud": "aws", "accelerators": "A100:8", "spot": spot}), attempt=1, env={},
                             job_file="/j/job.json", wheel="/w/optjob-0.1.0-py3-none-any.whl")
        job_id = fake.jobs_launch(config, "optjob-cloudy")
        assert fake.managed_job(job_id).spot is None  # not launched yet  # type: ignore[union-attr]
        fake.start(job_id)
        assert fake.managed_job(job_id).spot is expected, spot  # type: ignore[union-attr]
    fake.auto_lands_on_demand = True
    assert fake.managed_job(job_id).spot is False  # type: ignore[union-attr]


def test_log_prefix_is_the_task_name_as_skypilot_writes_it(sky_home: Path) -> None:  # noqa: F811
    from sky.backends import task_codegen

    source = inspect.getsource(task_codegen)
    # One node: Ray prints "(<name_str> pid=N)" with name_str "optjob-NAME," -> "(optjob-NAME, pid=N)".
    assert "name_str = '{task_name},' if {task_name!r} != None else 'task,'" in source
    assert "name_str = f'{{node_name}}, rank={{rank}},'" in source  # several nodes: (head, rank=0, pid=N)
    fake = FakeSky()
    config = task_config(make_spec({"cloud": "aws", "accelerators": "A100:8"}, name="cloudy"), attempt=1, env={},
                         job_file="/j/job.json", wheel="/w/optjob-0.1.0-py3-none-any.whl")
    job_id = fake.launch(config, "optjob-cloudy", down=True, idle_minutes=10)
    job = fake.job("optjob-cloudy", job_id)
    fake.emit(job, "progress", index=0, step=1)
    line = job.log[-1]
    assert line.startswith("(optjob-cloudy, pid=")
    assert parse_event(line)["step"] == 1  # type: ignore[index]
    assert parse_event('(head, rank=0, pid=7) {"event": "progress", "ts": 0, "v": 1, "step": 2}')["step"] == 2  # type: ignore[index]


def test_sdk_facts_the_provider_relies_on(sky_home: Path) -> None:  # noqa: F811
    import sky
    from sky import jobs
    from sky.jobs import state

    # stream_and_get waits; nothing in it cancels the request on Ctrl-C: the provider must (api_cancel).
    waits = inspect.getsource(sky.stream_and_get)
    assert "api_cancel" not in waits and "KeyboardInterrupt" not in waits
    assert list(inspect.signature(sky.api_cancel).parameters)[:3] == ["request_ids", "all_users", "silent"]
    # queue_v2(refresh=True) is what restarts a stopped jobs controller.
    assert "refresh" in inspect.signature(jobs.queue_v2).parameters
    assert "Whether to restart the jobs controller if it is stopped" in (jobs.queue_v2.__doc__ or "")
    # last_recovered_at names a run: -1 before it starts; every completed recovery sets it, counted or not.
    recovered = inspect.getsource(state.set_recovered_async)
    assert "spot_table.c.last_recovered_at: recovered_time" in recovered
    assert "recovering_from_failure" in recovered  # the recovery_count bump is gated
    assert "RESTART" in {s.name for s in state.RecoverySource}


# -- what ran, the jobs controller, graceful cancel, autostop: the constants and records the meter uses --

def test_launched_resources_are_read_from_skypilots_own_records(catalog: Path) -> None:
    import sky
    from optjob.providers.sky_records import instance_type_of, placement_of
    from sky.utils import resources_utils

    res = sky.Resources(infra="aws/us-east-1", instance_type="p3.2xlarge", accelerators={"V100": 1}, use_spot=True)

    class Handle:  # what sky.status's record carries (CloudVmRayResourceHandle's two fields read)
        launched_resources = res.assert_launchable()
        launched_nodes = 2

    got = placement_of({"name": "optjob-x", "handle": Handle()})
    assert got is not None and (got.cloud, got.region, got.instance_type, got.spot, got.nodes, got.accelerators) == (
        "aws", "us-east-1", "p3.2xlarge", True, 2, "V100:1")
    assert got.key() == "aws/us-east-1/p3.2xlarge/spot"
    # A managed job's record has no handle: its cloud, region and the full launched string.
    simple, full = resources_utils.format_resource(res, simplified_only=False)
    assert full is not None and instance_type_of(f"2x{full}") == "p3.2xlarge"
    assert instance_type_of(f"2x{simple}") == "p3.2xlarge"  # short names are not truncated
    record = {"cloud": str(res.cloud), "region": "us-east-1", "zone": None, "accelerators": {"V100": 1},
              "cluster_resources_full": f"1x{full}"}
    assert placement_of(record) == got.__class__(cloud="aws", region="us-east-1", instance_type="p3.2xlarge",
                                                 spot=True, nodes=1, accelerators="V100:1")
    # Once the job is over SkyPilot falls back to the requested string: no instance type, no placement.
    assert placement_of({**record, "cluster_resources_full": "1x[V100:1][Spot]"}) is None


def test_the_jobs_controller_and_autostop_constants_are_skypilots(sky_home: Path) -> None:  # noqa: F811
    from optjob.providers import sky_client, sky_task
    from sky.jobs import constants as jobs_constants
    from sky.jobs import utils as jobs_utils
    from sky.skylet import events
    from sky.utils import common

    ours = {"cpus": f"{sky_client.CONTROLLER_CPUS:g}+", "memory": f"{sky_client.CONTROLLER_MEMORY_RATIO:g}x",
            "disk_size": int(sky_client.CONTROLLER_DISK_GB)}
    assert ours == jobs_constants.CONTROLLER_RESOURCES
    assert jobs_constants.CONTROLLER_AUTOSTOP["idle_minutes"] == sky_client.CONTROLLER_IDLE_MINUTES
    assert common.JOB_CONTROLLER_PREFIX == sky_client.JOB_CONTROLLER_PREFIX
    assert events.StopEvent.EVENT_INTERVAL_SECONDS == sky_task.AUTOSTOP_CHECK_S  # the idle-timer teardown
    assert jobs_utils.JOB_STATUS_CHECK_GAP_SECONDS == sky_task.MANAGED_CHECK_S


def test_graceful_cancel_exists_and_waits_only_for_mount_cached_uploads(sky_home: Path) -> None:  # noqa: F811
    from sky import core, jobs

    params = inspect.signature(jobs.cancel).parameters
    assert "graceful" in params and "graceful_timeout" in params
    assert "jobs.cancel(job_ids=[job_id], graceful=graceful)" in inspect.getsource(RealSkyClient.jobs_cancel)
    # What graceful does: SIGTERM the jobs, flush rclone (MOUNT_CACHED) uploads, then down — no wait
    # for the workload's own checkpoint upload, hence the stop flag first.
    graceful = inspect.getsource(core._graceful_job_cancel)
    assert "cancel_jobs" in graceful and "get_rclone_flush_script" in graceful
    fake = FakeSky()
    fake.jobs_launch(task_config(make_spec({"cloud": "aws", "accelerators": "A100:8", "spot": True}), attempt=1,
                                 env={}, job_file="/j/job.json", wheel="/w/optjob-0.1.0-py3-none-any.whl"),
                     "optjob-cloudy")
    fake.jobs_cancel(1, graceful=True)
    assert fake.calls[-2:] == [("jobs_cancel", 1), ("jobs_cancel_graceful", 1)]
