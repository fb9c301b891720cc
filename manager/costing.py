"""Prices a plan: offers, the cost to complete, and whether it fits the budget.

Reads the price catalog (``pricing.load_catalog``) and, when a state store
exists, the calibration records of finished runs. Plain Python: no sky, no boto3.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from optjob.specs import JobSpec

from . import paths
from .plan import OfferPlan, Plan


def calibration_records() -> list[Any]:
    """Finished runs' measured throughput, if this machine has a state store (never creates one)."""
    if not paths.db_path().exists():
        return []
    from .store import Store

    store = Store(paths.db_path())
    try:
        return list(store.calibration())
    finally:
        store.close()


def price_plan(spec: JobSpec, plan: Plan) -> Plan:
    from .money import current_catalog
    from .pricing import find_offers, plan_offers

    resources = spec.resources
    if plan.local:
        resources = resources.model_copy(update={"cloud": "local", "accelerators": None, "spot": False,
                                                 "nodes": 1, "region": None, "zone": None})
        spec = spec.model_copy(update={"resources": resources})
    catalog = None if plan.local else current_catalog()
    offers = find_offers(resources, catalog)
    estimates, choice = plan_offers(spec, offers, calibration=calibration_records())
    rows = sorted(
        (OfferPlan(cloud=e.offer.cloud, region=e.offer.region or None, instance_type=e.offer.instance_type or None,
                   accelerators=e.offer.accelerators, spot=e.offer.spot, hourly_usd=e.offer.hourly_usd,
                   est_hours=round(e.total_hours, 6), est_usd=round(e.total_usd, 6),
                   ondemand_usd=round(e.ondemand_usd, 6) if e.offer.spot and e.ondemand_usd else None)
         for e in estimates),
        key=lambda o: (o.est_usd, o.est_hours),
    )
    chosen = None
    if choice.chosen is not None and choice.estimate is not None:
        e = choice.estimate
        chosen = next(o for o in rows if (o.cloud, o.region or "", o.instance_type or "", o.spot, o.hourly_usd)
                      == (e.offer.cloud, e.offer.region or "", e.offer.instance_type or "", e.offer.spot,
                          e.offer.hourly_usd))
    est = choice.estimate
    steps = plan.steps
    if est is not None:
        by_index = {s.index: s for s in est.steps}
        steps = tuple(replace(s, est_seconds=by_index[s.index].seconds if s.index in by_index else None,
                              tokens=by_index[s.index].tokens if s.index in by_index else s.tokens)
                      for s in plan.steps)
    notes = tuple(dict.fromkeys([*(est.notes if est else []), *([] if choice.fits else [choice.reason])]))
    budget = {**plan.budget, "fits": choice.fits, "over_by_usd": round(choice.over_by_usd, 6),
              "reason": choice.reason}
    return replace(plan, offers=tuple(rows), chosen=chosen, steps=steps, budget=budget, notes=notes,
                   calibrated_runs=est.calibrated_runs if est else 0)
