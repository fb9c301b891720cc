"""The strict base model every spec model derives from."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


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
