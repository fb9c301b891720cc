"""Job statuses and why a job ended."""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    PENDING = "pending"  # recorded, nothing launched yet
    LAUNCHING = "launching"  # an attempt's resources are being created
    RUNNING = "running"  # the workload runs
    RECOVERING = "recovering"  # an attempt was preempted; the next one is being launched
    STOPPING = "stopping"  # asked to checkpoint and stop (Ctrl-C, budget)
    UNKNOWN = "unknown"  # the provider cannot say now what the attempt does (asked again, with backoff)
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"  # ended early on purpose; see the reason

    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)


class Reason(str, Enum):
    """Why a job reached its terminal status."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    BUDGET = "budget"  # the dollar or hour cap
    PREEMPTED = "preempted"  # preempted more often than the recovery limit allows
    CANCELLED = "cancelled"  # Ctrl-C or `optjob down`

    @property
    def exit_code(self) -> int:
        return {"succeeded": 0, "failed": 1, "budget": 4, "preempted": 1, "cancelled": 130}[self.value]


#: The event the manager stores (beside the workload's) when it asks an attempt to stop: its
#: ``reason`` is a ``Reason`` value and ``why`` the message. The report reads it back.
STOP_REQUESTED = "stop_requested"
