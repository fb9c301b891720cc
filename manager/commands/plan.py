"""``optjob plan SPEC``: what apply would do, and whether it fits the budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from optjob.specs.errors import PlanInfeasible

if TYPE_CHECKING:
    from ..plan import Plan


def check_feasible(plan: Plan) -> None:
    budget = plan.budget
    if not budget.fits:
        if budget.over_by_usd > 0 and plan.chosen is not None and budget.max_usd is not None:
            raise PlanInfeasible(
                f"{plan.name}: the cheapest way to complete costs ${plan.chosen.est_usd:.2f}, "
                f"${budget.over_by_usd:.2f} over budget.max_usd ${budget.max_usd:.2f}",
                hint="raise the budget, shrink the steps, or allow cheaper resources",
            )
        raise PlanInfeasible(f"{plan.name}: {budget.reason or 'the plan does not fit the budget'}",
                             hint="raise budget.max_hours, shrink the steps, or allow faster resources")
    if plan.chosen is None:
        raise PlanInfeasible(f"{plan.name}: no offer satisfies resources ({'; '.join(plan.notes) or 'none found'})")


def plan_command(spec_path: str, *, local: bool, as_json: bool) -> None:
    # The spec models (pydantic) load here, not at import: status/list/logs never need them.
    from optjob.specs import load_spec

    from ..planner import make_plan
    from ..render import print_plan

    spec = load_spec(spec_path)
    plan = make_plan(spec, spec_path, local=local)
    if as_json:
        click.echo(plan.dumps())
    else:
        print_plan(plan)
    check_feasible(plan)
