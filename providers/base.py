"""The ``Provider`` interface: where an attempt of a job runs.

A job runs as one or more *attempts*. An attempt is one launch of the workload
(``python -m optjob.steps run JOB_DIR``) on some resources; a spot preemption
ends an attempt and the manager launches the next one, which resumes from the
job's checkpoints. Providers know nothing of budgets or steps: the manager
reconciles what ``poll`` and ``read_log`` report against its state store.

The contracts below are what the manager relies on; every provider's tests
check them.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

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
    LOST = "lost"  # the provider no longer knows the attempt and no exit was recorded

    def is_terminal(self) -> bool:
        return self not in (AttemptState.LAUNCHING, AttemptState.RUNNING)


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


class Provider(abc.ABC):
    """Where attempts run. Implementations: ``local``, ``skypilot``."""

    name: ClassVar[str]
    #: Whether an attempt's resources cost money after its workload ends, until ``teardown`` (cloud
    #: nodes do); when False, spend stops at the attempt's end however late the manager notices it.
    bills_until_teardown: ClassVar[bool] = True

    @abc.abstractmethod
    def launch(self, request: LaunchRequest) -> Handle:
        """Start one attempt and return at once (do not wait for it to finish).

        Contract: after ``launch`` returns, the attempt's resources exist or are
        being created, and ``teardown(handle)`` releases them whatever happens
        next. Raises ``ProviderError`` with an actionable message when the
        resources cannot be had (no capacity, quota, credentials); then nothing
        is left running."""

    @abc.abstractmethod
    def poll(self, handle: Handle) -> Poll:
        """Report the attempt's state as the provider sees it now.

        Contract: level-based and side-effect free — calling it any number of
        times, from any process (a restarted manager, ``optjob status``), gives
        the current truth. A workload that was killed from outside (spot
        reclaim, SIGKILL) is ``PREEMPTED``; its exit code is recorded when the
        provider can know it."""

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

    def wait(self, handle: Handle, timeout_s: float) -> None:
        """Block for up to ``timeout_s`` seconds, returning early when the attempt may have ended.

        Contract: a hint, never a state — it returns no result, may return at any time (the caller
        then polls) and must not outlast ``timeout_s`` by much. The default sleeps; providers that can
        see the end cheaply (the local exit file) return within a fraction of a second of it, so the
        manager does not idle a whole tick after the workload is done."""
        time.sleep(timeout_s)
