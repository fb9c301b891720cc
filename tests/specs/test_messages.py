"""Messages a user meets in a spec, as they would read them (issue 18)."""

from __future__ import annotations

import pytest
from optjob.specs import SpecError, loads_spec

BASE = "name: x\nmodel: {hf: Qwen/Qwen2.5-0.5B, params: 8.0e9}\nsteps: [{train: {max_steps: 1e3}}]\n"


def test_scientific_notation_reads_as_a_number_and_whole_ones_fill_integer_fields() -> None:
    spec = loads_spec(BASE)
    assert spec.model.params == 8_000_000_000
    assert spec.pipeline[0].max_steps == 1000  # type: ignore[attr-defined]


def test_a_fractional_number_in_an_integer_field_is_still_refused() -> None:
    with pytest.raises(SpecError, match="max_steps"):
        loads_spec(BASE.replace("1e3", "1.5e0"))


@pytest.mark.parametrize(("shorthand", "usd", "hours"), [('"$25"', 25.0, None), ("25", 25.0, None),
                                                          ('"4h"', None, 4.0), ('"30m"', None, 0.5)])
def test_budget_shorthand(shorthand: str, usd: float | None, hours: float | None) -> None:
    spec = loads_spec(BASE + f"budget: {shorthand}\n")
    assert (spec.budget.max_usd, spec.budget.max_hours) == (usd, hours)


def test_no_pydantic_class_name_reaches_the_user() -> None:
    with pytest.raises(SpecError) as err:
        loads_spec(BASE + "budget: [25]\n")
    assert "BudgetSpec" not in str(err.value) and "budget" in str(err.value)
