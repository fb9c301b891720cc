"""What the user declares: the spec models and the loader (no torch, no cloud).

Public surface::

    from optjob.specs import JobSpec, load_spec, loads_spec, SpecError, OptjobError

Names are imported on first use (PEP 562), so ``import optjob.specs.errors`` — which
the CLI needs for ``--help`` — does not pay for building the pydantic models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "OptjobError": "errors",
    "SpecError": "errors",
    "JobSpec": "job",
    "load_spec": "loader",
    "loads_spec": "loader",
    "STEP_TYPES": "steps",
    "DistillStep": "steps",
    "EvaluateStep": "steps",
    "HpoStep": "steps",
    "PruneStep": "steps",
    "QuantizeStep": "steps",
    "StepBase": "steps",
    "TrainOptions": "steps",
    "TrainStep": "steps",
}

__all__ = [
    "STEP_TYPES",
    "DistillStep",
    "EvaluateStep",
    "HpoStep",
    "JobSpec",
    "OptjobError",
    "PruneStep",
    "QuantizeStep",
    "SpecError",
    "StepBase",
    "TrainOptions",
    "TrainStep",
    "load_spec",
    "loads_spec",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from .errors import OptjobError, SpecError
    from .job import JobSpec
    from .loader import load_spec, loads_spec
    from .steps import (
        STEP_TYPES,
        DistillStep,
        EvaluateStep,
        HpoStep,
        PruneStep,
        QuantizeStep,
        StepBase,
        TrainOptions,
        TrainStep,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optjob.specs' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
