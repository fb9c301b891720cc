"""The ``Provider`` interface: where an attempt of a job runs.

A job runs as one or more *attempts*. An attempt is one launch of the workload
(``python -m optjob.steps run JOB_DIR``) on some resources; a spot preemption
ends an attempt and the manager launches the next one, which resumes from the
job's checkpoints. Providers know nothing of budgets or steps: the manager
reconciles what ``poll`` and ``read_log`` report against its state store.

The contracts below are what the manager relies on; every provider's tests
check them.

Knowing versus not knowing. ``poll`` separates what the provider *saw* from what
it *could not see*: an attempt is ``LOST`` only on positive evidence (the
provider answered and no longer has the attempt's resources or job, and did not
record how it ended); when the provider cannot answer — an API server or jobs
controller that is stopped, unreachable or busy — the attempt is ``UNKNOWN``, which
is not an end: the manager keeps polling, with backoff, and never relaunches on
it. Even ``LOST`` and ``PREEMPTED`` are not enough to relaunch: the manager first
looks for a durable record that the work finished (the job's storage, or
``Provider.outcome``), so a job that finished while nobody watched is never run
again.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from optjob.specs.errors import ProviderError

if TYPE_CHECKING:
    from optjob.specs import JobSpec


class AttemptState(str, Enum):
    """What a provider says about one attempt."""

    LAUNCHING = "launching"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # the workload exited 0
    FAILED = "failed"  # the workload exited non-zero on its own (see exit_code)
    STOPPED = "stopped"  # the workload stopped on request or at its deadline (exit 4 / 143)
    PREEMPTED = "preempted"  # the resources were taken away (spot reclaim, SIGKILL): relaunch
    LOST = "lost"  # the provider answered: the attempt's resources or job are gone, no exit was recorded
    #: The provider cannot say now (its API server or controller is stopped, unreachable or busy).
    #: Not an end: poll again later (with backoff); never relaunch on it.
    UNKNOWN = "unknown"

    def is_terminal(self) -> bool:
        return self not in (AttemptState.LAUNCHING, AttemptState.RUNNING, AttemptState.UNKNOWN)


class TransientProviderError(ProviderError):
    """A failure that a retry may cure (a server busy or restarting, a network blip). The manager
    retries whatever raised it, with backoff, and never ends a job or its own loop because of one."""


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a provider needs to start one attempt."""

    spec: JobSpec
    job_dir: Path  # the job's folder on the manager's machine (holds job.json)
    attempt: int  # 1, 2, ...: numbers the attempt and its log
    env: dict[str, str] = field(default_factory=dict)  # OPTJOB_ATTEMPT, OPTJOB_DEADLINE, ...

    @property
    def cluster_name(self) -> str:
        """The name resources carry: ``optjob-<job name>`` (job names are validated
        to ``[a-z][a-z0-9-]*``, so this is a valid cluster name everywhere)."""
        return f"optjob-{self.spec.name}"


@dataclass
class Handle:
    """A launched attempt, JSON-serialisable so a restarted manager can reattach.

    ``data`` is provider-private (a pid, a managed-job id, ...)."""

    provider: str
    cluster: str
    attempt: int
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "cluster": self.cluster, "attempt": self.attempt, "data": self.data}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Handle:
        return cls(provider=d["provider"], cluster=d["cluster"], attempt=int(d["attempt"]),
                   data=dict(d.get("data", {})))


@dataclass(frozen=True)
class Placement:
    """What a provider actually launched (not what the plan asked for): the meter prices this.

    ``instance_type`` None means the provider could not say which (the meter then keeps the price it
    had, or estimates one from ``cpus`` / ``memory_ratio``, as for SkyPilot's jobs controller)."""

    cloud: str
    region: str | None = None
    zone: str | None = None
    instance_type: str | None = None
    spot: bool = False
    nodes: int = 1
    accelerators: str | None = None  # "A100:8"
    #: For an estimate when ``instance_type`` is unknown: at least this many vCPUs, memory per vCPU (GiB).
    cpus: float | None = None
    memory_ratio: float | None = None
    disk_gb: float | None = None

    def key(self) -> str:
        """``aws/us-east-1/p3.2xlarge/spot``: the ledger's source after the price's origin."""
        kind = "spot" if self.spot else "on-demand"
        return f"{self.cloud}/{self.region or '*'}/{self.instance_type or '?'}/{kind}"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Placement:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Poll:
    state: AttemptState
    exit_code: int | None = None
    detail: str = ""
    #: Nodes actually running (for the cost meter); 0 once released.
    nodes: int = 0
    #: Whether the resources run on spot capacity.
    spot: bool = False
    #: When the attempt ended (epoch seconds), if the provider knows; else the first terminal poll's time is used.
    ended_at: float | None = None
    #: What runs now, as the provider launched it (None: it cannot say; the meter keeps its price).
    placement: Placement | None = None
    #: When the attempt's node(s) came to exist (epoch seconds); billing starts there. None: not said.
    node_since: float | None = None
    #: The provider knows no node of this attempt exists yet (queued, provisioning): nothing to bill.
    no_node: bool = False
    #: When the attempt's resources were gone by the provider's own record (SkyPilot's ``end_at``):
    #: billing ends there, however late the manager looks. None: not known (billing runs to teardown).
    gone_at: float | None = None
    #: Shared infrastructure the attempt keeps up (SkyPilot's jobs controller), billed on its own line.
    overhead: Placement | None = None


class Provider(abc.ABC):
    """Where attempts run. Implementations: ``local``, ``skypilot``."""

    name: ClassVar[str]
    #: Whether an attempt's resources cost money after its workload ends, until ``teardown`` (cloud
    #: nodes do); when False, spend stops at the attempt's end however late the manager notices it.
    bills_until_teardown: ClassVar[bool] = True
    #: Whether billing starts at launch (locally the process starts at once); when False it starts
    #: when ``poll`` first reports a node (``Poll.node_since``), so time queued with no node is free.
    bills_from_launch: ClassVar[bool] = True

    @abc.abstractmethod
    def launch(self, request: LaunchRequest) -> Handle:
        """Start one attempt and return at once (do not wait for it to finish).

        Contract: after ``launch`` returns, the attempt's resources exist or are
        being created, and ``teardown(handle)`` releases them whatever happens
        next. Raises ``ProviderError`` with an actionable message when the
        resources cannot be had (no capacity, quota, credentials); then nothing
        is left running. Idempotent per (job folder, attempt): what it submits is
        recorded before it waits, so calling it again after a
        ``TransientProviderError`` (or ``adopt`` after a crash) takes up that
        submission instead of making a second one. Interrupted (Ctrl-C) while
        waiting, it cancels what it submitted, or tears down what that made,
        before re-raising."""

    @abc.abstractmethod
    def poll(self, handle: Handle) -> Poll:
        """Report the attempt's state as the provider sees it now.

        Contract: level-based and side-effect free — calling it any number of
        times, from any process (a restarted manager, ``optjob status``), gives
        the current truth. A workload that was killed from outside (spot
        reclaim, SIGKILL) is ``PREEMPTED``; its exit code is recorded when the
        provider can know it. ``LOST`` only on positive evidence that the
        attempt is gone; when the provider cannot tell, ``UNKNOWN`` (never raise
        for a transient failure: report ``UNKNOWN`` with the reason in ``detail``)."""

    @abc.abstractmethod
    def read_log(self, handle: Handle, offset: int) -> tuple[str, int]:
        """Return the attempt's output after byte ``offset`` and the new offset.

        Contract: everything the workload printed, in order, each byte once
        across calls that pass back the returned offset; partial trailing lines
        are held back until complete. Never blocks for long."""

    @abc.abstractmethod
    def stop(self, handle: Handle) -> None:
        """Ask the workload to stop gracefully: write a checkpoint, then exit.

        Contract: returns at once; the attempt then ends ``STOPPED`` (or
        ``SUCCEEDED`` if it was finishing anyway). Safe to call on an attempt
        that has already ended."""

    def kill(self, handle: Handle) -> None:
        """End the workload now, without waiting for a checkpoint: the escalation of a stop request
        whose grace has passed (a workload that ignores SIGTERM or never checks its flag).

        Contract: returns once the kill is under way; the attempt then ends (locally with 137, as a
        preemption would). The default is ``teardown``, which kills whatever still runs."""
        self.teardown(handle)

    @abc.abstractmethod
    def teardown(self, handle: Handle) -> None:
        """Release every resource of the attempt, killing the workload if it still runs.

        Contract: idempotent (tearing down twice, or a never-started attempt,
        is fine) and confirmed — it returns only once the provider reports the
        resources gone, and raises ``TeardownError`` otherwise, so the caller
        never marks a job torn down early. Transient failures are retried here,
        within the provider's own written budget (the one retry layer at this
        boundary); the manager calls once and leaves an unconfirmed teardown for
        the next ``status``/``down``/``apply``."""

    def reads_stop_flag(self, handle: Handle) -> bool:
        """Whether the attempt's workload watches a stop flag in the job's storage (the manager writes it
        before ``stop``; then ``stop`` need not, and must not, signal the workload a second time)."""
        return False

    def stop_latency_s(self, handle: Handle) -> float:
        """Seconds a stop request takes to reach the workload (SkyPilot's managed jobs: the node polls a
        flag); the manager asks that much earlier and waits that much longer before killing."""
        return 0.0

    def outcome(self, handle: Handle) -> Poll | None:
        """How the attempt ended, from a durable record, when ``poll`` cannot say (``UNKNOWN``) or
        says it is gone (``LOST``/``PREEMPTED``); None when there is no such record.

        Contract: may be slow (SkyPilot restarts its stopped jobs controller to read its table), so
        the manager calls it only before deciding to relaunch or when ``UNKNOWN`` persists; returns a
        terminal ``Poll`` or None, never a guess. The default has no record."""
        return None

    def adopt(self, job_dir: Path, attempt: int) -> Handle | None:
        """The handle of an attempt whose launch a manager started but did not see finish (it was
        killed, or interrupted, inside ``launch``), built from what the provider recorded before
        waiting; None when nothing was submitted or what was submitted left nothing behind.

        Contract: never submits anything; may wait for a launch request still in flight."""
        return None

    def wait(self, handle: Handle, timeout_s: float) -> None:
        """Block for up to ``timeout_s`` seconds, returning early when the attempt may have ended.

        Contract: a hint, never a state — it returns no result, may return at any time (the caller
        then polls) and must not outlast ``timeout_s`` by much. The default sleeps; providers that can
        see the end cheaply (the local exit file) return within a fraction of a second of it, so the
        manager does not idle a whole tick after the workload is done."""
        time.sleep(timeout_s)
