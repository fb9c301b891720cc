"""The one exception tree of optjob.

Every error a user can meet derives from :class:`OptjobError` and carries the
process exit code the CLI uses for it. The CLI renders them in one place
(``optjob.manager.cli``): one line, no traceback unless ``--debug``.

::

    OptjobError                  exit 1  (base; anything unexpected but ours)
    ├── SpecError                exit 2  the spec file is invalid (file:line:col: field: what)
    ├── UsageError               exit 2  the command line is wrong (unknown job, bad flag mix)
    ├── PlanInfeasible           exit 3  no offer fits the resources, or the budget is too small
    ├── BudgetExceeded           exit 4  the job was stopped by its dollar or hour cap
    ├── JobFailed                exit 1  the workload failed (its error event says why)
    ├── Interrupted              exit 130 the user pressed Ctrl-C; the job was stopped gracefully
    ├── StateError               exit 1  the state store is unreadable, locked, full or from the future
    ├── ProviderError            exit 1  a provider could not launch, poll or tear down
    │   ├── TeardownError        exit 1  resources could not be confirmed released (retry `optjob down`)
    │   ├── TransientProviderError       worth asking again (providers/base.py)
    │   │   └── TransientSkyError        SkyPilot's API server busy or unreachable (providers/sky_client.py)
    │   │       └── ControllerUnavailable  the jobs controller stopped, absent or unreachable
    │   ├── ClusterGone, ClusterNotUp    what SkyPilot said of a cluster (providers/sky_client.py)
    │   └── StorageError                 artifact storage refused or failed (steps/storage/base.py)
    ├── StepError                exit 1  raised on the node by a step (becomes an ``error`` event)
    │   └── PeerFailed                   another rank of a distributed step failed (steps/dist.py)
    └── Unsettled                exit 1  a durable outcome exists but cannot be read now (manager/outcome.py)

The classes of this module live in ``optjob.specs`` because it is the package every other one
imports and it has no heavy dependencies; the subclasses named with a path live beside the code
that raises them. Outside the tree on purpose: ``StopRequested`` (a BaseException that ends a run
gracefully, steps/context.py), ``PathError`` and ``InvalidRecord`` (ValueErrors that validation turns
into a ``SpecError`` or a rerun).
"""

from __future__ import annotations


class OptjobError(Exception):
    """Root of every optjob error. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class SpecError(OptjobError):
    """The spec is invalid. ``errors`` holds every problem found, one line each."""

    exit_code = 2

    def __init__(self, message: str, *, errors: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.errors = errors or [message]


class UsageError(OptjobError):
    exit_code = 2


class PlanInfeasible(OptjobError):
    exit_code = 3


class BudgetExceeded(OptjobError):
    exit_code = 4


class JobFailed(OptjobError):
    exit_code = 1


class Interrupted(OptjobError):
    exit_code = 130


class StateError(OptjobError):
    exit_code = 1


class ProviderError(OptjobError):
    exit_code = 1


class TeardownError(ProviderError):
    exit_code = 1


class StepError(OptjobError):
    exit_code = 1
