"""``optjob plan SPEC``: what apply would do, and whether it fits the budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import click
from optjob.specs.errors import PlanInfeasible

if TYPE_CHECKING:
    from optjob.specs import JobSpec

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


def load_for_plan(spec_path: str, sets: Sequence[str], name: str | None) -> tuple[JobSpec, tuple[str, ...]]:
    """The spec with ``--set``/``--name`` over it and the user config under it; and the lines that
    say which values came from those (``Plan.sources``)."""
    from optjob.specs.loader import load_layered

    from ..user_config import spec_layers

    loaded = load_layered(spec_path, spec_layers(sets, name))
    return loaded.spec, tuple(loaded.describe())


def plan_command(spec_path: str, *, local: bool, as_json: bool, sets: Sequence[str] = (),
                 name: str | None = None, sky_task: bool = False) -> None:
    # The spec models (pydantic) load here, not at import: status/list/logs never need them.
    from ..planner import make_plan
    from ..render import print_plan

    spec, sources = load_for_plan(spec_path, sets, name)
    plan = replace(make_plan(spec, spec_path, local=local), sources=sources)
    if sky_task:  # the task YAML alone (pipe it to a file); only for a plan apply would carry out
        from .sky_task import sky_task_yaml

        check_feasible(plan)
        click.echo(sky_task_yaml(spec, spec_path, plan), nl=False)
        return
    if as_json:
        click.echo(plan.dumps())
    else:
        print_plan(plan)
    check_feasible(plan)
