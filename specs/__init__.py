"""What the user declares: the spec models and the loader (no torch, no cloud).

Public surface::

    from optjob.specs import JobSpec, load_spec, loads_spec, SpecError, OptjobError
"""

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
