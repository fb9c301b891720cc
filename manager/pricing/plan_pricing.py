"""Prices a plan: offers, the cost to complete, and whether it fits the budget.

Reads the price catalog (``pricing.load_catalog``) and, when a state store
exists, the calibration records of finished runs. Plain Python: no sky, no boto3.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from optjob.specs import JobSpec

from ..plan import OfferPlan, Plan, StepPlan, VariantPlan
from .calibration_store import calibration_records

#: Regions whose live AWS spot prices are fetched (the cheapest by catalog), each in its own thread.
LIVE_REGIONS = 4


def live_spot(offers: list[Any], notes: list[str]) -> list[Any]:
    """AWS spot offers re-priced from EC2's spot price history when AWS credentials are present
    (``OPTJOB_LIVE_PRICES=0`` turns it off); otherwise the catalog's prices stand and a note says so."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from . import spot_live

    aws_spot = sorted((o for o in offers if o.cloud == "aws" and o.spot), key=lambda o: o.hourly_usd)
    if not aws_spot or os.environ.get("OPTJOB_LIVE_PRICES", "1") == "0":
        return offers
    if not spot_live.credentials_available():
        notes.append("no AWS credentials: AWS spot prices are the catalog's, not live")
        return offers
    regions = list(dict.fromkeys(o.region for o in aws_spot))[:LIVE_REGIONS]
    types = sorted({o.instance_type for o in aws_spot})
    with ThreadPoolExecutor(max_workers=len(regions)) as pool:
        parts = list(pool.map(lambda r: spot_live.live_spot_prices(types, [r], notes=notes, timeout_s=3.0), regions))
    prices = {k: v for part in parts for k, v in part.items()}
    if prices:
        notes.append(f"live EC2 spot prices for {len({(k[0], k[2]) for k in prices})} region/instance pair(s)")
    return spot_live.overlay(offers, prices)


def price_plan(spec: JobSpec, plan: Plan) -> Plan:
    from .estimate import plan_offers
    from .memory import fit_offers
    from .offers import PlanChoice, find_offers
    from .sources import current_catalog

    resources = spec.resources
    if plan.local:
        resources = resources.model_copy(update={"cloud": "local", "accelerators": None, "spot": False,
                                                 "nodes": 1, "region": None, "zone": None})
        spec = spec.model_copy(update={"resources": resources})
    catalog = None if plan.local else current_catalog()
    offers = find_offers(resources, catalog)
    live_notes: list[str] = []
    if not plan.local:
        offers = live_spot(offers, live_notes)
    # Offers whose GPUs cannot hold the largest step (or that have no CUDA GPU for QLoRA) are dropped.
    fit = fit_offers(spec, offers, local=plan.local)
    estimates, choice = plan_offers(spec, fit.kept, calibration=calibration_records())
    if fit.reason is not None:
        choice = PlanChoice(None, None, False, 0.0, fit.reason)
    rows = sorted(
        (OfferPlan(cloud=e.offer.cloud, region=e.offer.region or None, instance_type=e.offer.instance_type or None,
                   accelerators=e.offer.accelerators, spot=e.offer.spot, hourly_usd=e.offer.hourly_usd,
                   est_hours=round(e.total_hours, 6), est_usd=round(e.total_usd, 6),
                   ondemand_usd=round(e.ondemand_usd, 6) if e.offer.spot and e.ondemand_usd else None,
                   memory_gb=fit.of(e.offer)[0], gpu_memory_gb=fit.of(e.offer)[1])
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
    variants = plan.variants
    if est is not None:
        by_index = {(s.index, s.variant, s.variant_step): s for s in est.steps}

        def key(s: StepPlan) -> tuple[int, str | None, int | None]:
            return s.index, s.variant, s.variant_step

        steps = tuple(replace(s, est_seconds=by_index[key(s)].seconds if key(s) in by_index else None,
                              tokens=by_index[key(s)].tokens if key(s) in by_index else s.tokens)
                      for s in plan.steps)
        variants = tuple(variant_priced(v, steps, est.offer.hourly_usd * spec.resources.nodes)
                         for v in plan.variants)
    notes = tuple(dict.fromkeys([*live_notes, *fit.notes, *(est.notes if est else []),
                                 *([] if choice.fits else [choice.reason])]))
    budget = replace(plan.budget, fits=choice.fits, over_by_usd=round(choice.over_by_usd, 6), reason=choice.reason)
    return replace(plan, offers=tuple(rows), chosen=chosen, steps=steps, budget=budget, notes=notes,
                   calibrated_runs=est.calibrated_runs if est else 0, variants=variants)


def variant_priced(variant: VariantPlan, steps: tuple[StepPlan, ...], usd_per_hour: float) -> VariantPlan:
    """A compare variant with its steps' estimated seconds and their cost at ``usd_per_hour`` (the
    chosen offer's nodes); the run's fixed overheads stay in the total only."""
    seconds = sum(s.est_seconds or 0.0 for s in steps if s.variant == variant.name)
    return replace(variant, est_seconds=round(seconds, 3), est_usd=round(seconds / 3600.0 * usd_per_hour, 6))
