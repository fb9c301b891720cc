"""Prices a plan: offers, the cost to complete, and whether it fits the budget."""

from __future__ import annotations

from dataclasses import replace

from optjob.specs import JobSpec

from .plan import OfferPlan, Plan


def price_plan(spec: JobSpec, plan: Plan) -> Plan:
    hourly = spec.resources.hourly_usd or 0.0
    chosen = OfferPlan(cloud="local", region=None, instance_type=None, accelerators=None, spot=False,
                       hourly_usd=hourly, est_hours=0.0, est_usd=0.0)
    return replace(plan, offers=(chosen,), chosen=chosen)
