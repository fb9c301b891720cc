"""The one fake the SkyPilot provider's tests use: an in-memory ``SkyClient``.

Why a fake: the provider's logic (state mapping, preemption -> new attempt,
teardown retries and confirmation, log offsets) must be tested, and no cloud or
SkyPilot API server can be reached here. Everything *below* ``SkyClient`` — the
task YAML, ``sky.Task`` / ``sky.Resources`` validation, error translation of real
``sky.exceptions`` — is tested against the real SkyPilot package instead.

The fake mimics SkyPilot 0.14's observable behaviour: status strings are the real
enum values, log lines carry SkyPilot's ``(task, pid=N)`` prefix, a managed job's
``recovery_count`` increases when a recovery completes, and a downed cluster can
stay listed for a few status calls (``down_lag``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pytest
import yaml
from optjob.providers.sky_client import ClusterInfo, ManagedJob, SkyClient, TransientSkyError
from optjob.providers.sky_task import EXIT_MARKER
from optjob.specs import JobSpec
from optjob.specs.errors import ProviderError

BASE = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml").read_text())
BUCKET = "s3://optjob-test-bucket/ckpt"


def make_spec(resources: Mapping[str, Any], *, storage: str | None = BUCKET, name: str = "cloudy") -> JobSpec:
    """The quickstart pipeline with other resources (and s3 storage, which spot needs)."""
    doc = copy.deepcopy(BASE)
    doc.update(name=name, resources=dict(resources))
    if storage:
        doc["storage"] = {"artifacts": storage}
    return JobSpec.model_validate(doc)


@dataclass
class FakeJob:
    status: str = "PENDING"
    log: list[str] = field(default_factory=list)


@dataclass
class FakeCluster:
    name: str
    nodes: int
    status: str = "UP"
    jobs: dict[int, FakeJob] = field(default_factory=dict)
    downed_at_call: int | None = None


@dataclass
class FakeManaged:
    job_id: int
    name: str
    nodes: int
    status: str = "STARTING"
    recovery_count: int = 0
    last_recovered_at: float | None = None
    failure_reason: str = ""
    log: list[str] = field(default_factory=list)


class FakeSky(SkyClient):
    def __init__(self) -> None:
        self.clusters_: dict[str, FakeCluster] = {}
        self.managed: dict[int, FakeManaged] = {}
        self.calls: list[tuple[str, Any]] = []
        self.configs: list[Mapping[str, Any]] = []
        self.fail_downs = 0  # the next N down() calls raise TransientSkyError
        self.down_lag = 0  # a downed cluster stays listed for N more status calls
        self.stuck: set[str] = set()  # clusters that never go away
        self.launch_error: ProviderError | None = None
        self.cancel_lag = 0  # managed jobs stay CANCELLING for N reads
        self._status_calls = 0
        self._next_id = 1
        self._clock = 1000.0

    # -- scripting helpers used by tests ------------------------------------------------------
    def line(self, target: FakeJob | FakeManaged, text: str, pid: int = 4242) -> None:
        target.log.append(f"(task, pid={pid}) {text}\n")

    def emit(self, target: FakeJob | FakeManaged, event: str, **fields: Any) -> None:
        self.line(target, json.dumps({"event": event, "ts": 0.0, "v": 1, **fields}))

    def exit(self, target: FakeJob | FakeManaged, code: int, status: str | None = None) -> None:
        self.line(target, f"{EXIT_MARKER} {code}")
        target.status = status or ("SUCCEEDED" if code == 0 else "FAILED")

    def job(self, cluster: str, job_id: int) -> FakeJob:
        return self.clusters_[cluster].jobs[job_id]

    def preempt(self, job_id: int) -> None:
        self.managed[job_id].status = "RECOVERING"

    def recover(self, job_id: int) -> None:
        job = self.managed[job_id]
        self._clock += 60
        job.status, job.recovery_count, job.last_recovered_at = "RUNNING", job.recovery_count + 1, self._clock
        job.log = []  # a recovered run starts on a new cluster, with a new log

    # -- SkyClient --------------------------------------------------------------------------------
    def launch(self, task: Mapping[str, Any], cluster: str, *, down: bool, idle_minutes: int,
               log: TextIO | None = None) -> int:
        self.calls.append(("launch", (cluster, down, idle_minutes)))
        self.configs.append(task)
        c = self.clusters_.setdefault(cluster, FakeCluster(cluster, int(task.get("num_nodes", 1))))
        if self.launch_error is not None:
            c.status = "INIT"  # SkyPilot keeps a half-made cluster "for debugging"
            raise self.launch_error
        if log is not None:
            log.write(f"Launching {cluster}...\n")
        if c.status == "STOPPED":
            c.status = "UP"  # sky.launch restarts a stopped cluster
        job_id, self._next_id = self._next_id, self._next_id + 1
        c.jobs[job_id] = FakeJob()
        return job_id

    def jobs_launch(self, task: Mapping[str, Any], name: str, log: TextIO | None = None) -> int:
        self.calls.append(("jobs_launch", name))
        self.configs.append(task)
        if self.launch_error is not None:
            raise self.launch_error
        job_id, self._next_id = self._next_id, self._next_id + 1
        self.managed[job_id] = FakeManaged(job_id, name, int(task.get("num_nodes", 1)))
        return job_id

    def cluster(self, name: str, refresh: bool = False) -> ClusterInfo | None:
        self._status_calls += 1
        c = self.clusters_.get(name)
        if c is None:
            return None
        downed = c.downed_at_call
        if downed is not None and name not in self.stuck and self._status_calls - downed > self.down_lag:
            del self.clusters_[name]
            return None
        return ClusterInfo(name=name, status=c.status, nodes=c.nodes)

    def clusters(self) -> list[ClusterInfo]:
        return [info for n in list(self.clusters_) if (info := self.cluster(n)) is not None]

    def job_status(self, cluster: str, job_id: int) -> str | None:
        c = self.clusters_.get(cluster)
        if c is None or c.downed_at_call is not None:
            raise ProviderError(f"cluster {cluster} is not up")
        job = c.jobs.get(job_id)
        return None if job is None else job.status

    def managed_jobs(self, job_ids: list[int] | None = None) -> list[ManagedJob]:
        out = []
        for j in self.managed.values():
            if job_ids is not None and j.job_id not in job_ids:
                continue
            if j.status == "CANCELLING":
                self.cancel_lag -= 1
                if self.cancel_lag < 0:
                    j.status = "CANCELLED"
            out.append(ManagedJob(j.job_id, j.name, j.status, j.recovery_count, j.last_recovered_at,
                                  j.failure_reason, j.nodes if j.status == "RUNNING" else 0, True))
        return out

    def logs(self, cluster: str, job_id: int) -> str:
        return "".join(self.job(cluster, job_id).log)

    def managed_logs(self, job_id: int) -> str:
        return "".join(self.managed[job_id].log)

    def cancel(self, cluster: str, job_id: int) -> None:
        self.calls.append(("cancel", (cluster, job_id)))
        job = self.job(cluster, job_id)
        if job.status in ("PENDING", "SETTING_UP", "RUNNING"):
            job.status = "CANCELLED"

    def jobs_cancel(self, job_id: int) -> None:
        self.calls.append(("jobs_cancel", job_id))
        self.managed[job_id].status = "CANCELLING"

    def down(self, cluster: str) -> None:
        self.calls.append(("down", cluster))
        if self.fail_downs > 0:
            self.fail_downs -= 1
            raise TransientSkyError(f"SkyPilot could not tear down {cluster}: server busy")
        c = self.clusters_.get(cluster)
        if c is not None and c.downed_at_call is None:
            c.downed_at_call = self._status_calls

    def count(self, method: str) -> int:
        return sum(1 for name, _ in self.calls if name == method)


class FakeClock:
    """``time.time`` / ``time.sleep`` stand-ins: sleeping advances the clock at once."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture(scope="module")
def sky_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private HOME for SkyPilot (it writes ~/.sky when imported), set before
    ``import sky`` and restored after the module; usage collection off."""
    home = tmp_path_factory.mktemp("skyhome")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
        mp.delenv("SKYPILOT_API_SERVER_ENDPOINT", raising=False)
        mp.delenv("SKYPILOT_GLOBAL_CONFIG", raising=False)
        yield home
