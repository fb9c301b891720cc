"""The strict base model every spec model derives from."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

#: The largest seed: numpy's RandomState (optuna's samplers) takes seeds below 2**32, and torch and
#: ``random`` take these too. A larger one would pass validation and fail on the node, after money
#: is spent ("Overflow when unpacking long long").
SEED_MAX = 2**32 - 1
#: A random seed; every seed field of the spec has this type.
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
#: Upper bound of step counts (max_steps, warmup, eval/checkpoint/log intervals, trial_steps...).
MAX_STEPS = 10_000_000
#: Upper bound of batch sizes (sequences).
MAX_BATCH = 65_536


class StrictModel(BaseModel):
    """Unknown keys are errors (typos must not pass silently); values are immutable
    once validated, so a plan built from a spec cannot drift from it. Floats are finite:
    ``.inf`` / ``.nan`` mean nothing as a rate or a price, and JSON (job.json, the state
    store) would turn them into null, a spec that no longer validates."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        frozen=True,
        validate_default=True,
        use_attribute_docstrings=True,
        str_strip_whitespace=True,
        defer_build=True,
    )
