"""Offer search: every (cloud, region, node type, spot?) a spec's ``resources:`` could run on.

An :class:`Offer` is priced per node-hour. Which offer is cheapest to *complete* the job is the
estimator's question (``estimate.choose``), not this module's: a dearer, faster GPU often wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .accelerators import normalize
from .catalog import SUPPORTED_CLOUDS, Catalog, CatalogRow
from .sources import load_catalog

if TYPE_CHECKING:
    from optjob.specs.job import JobSpec
    from optjob.specs.resources import ResourcesSpec

    from .estimate import Estimate

#: vCPU floor for CPU-only cloud nodes when ``resources.cpus`` is not set (SkyPilot's default).
DEFAULT_CPU_NODE_VCPUS = 8
_FLAT_CLOUDS = ("local", "kubernetes")


@dataclass(frozen=True)
class Offer:
    """One way to get the nodes: prices are USD per node-hour."""

    cloud: str
    region: str
    zone: str | None
    instance_type: str
    accelerators: str | None
    accelerator_name: str | None
    accelerator_count: int
    spot: bool
    hourly_usd: float
    vcpus: float | None
    memory_gb: float | None
    #: The same node on demand in the same region (a spot offer's fallback price), if known.
    ondemand_hourly_usd: float | None = None
    #: Why the price is not a plain catalog price (e.g. taken from ``resources.hourly_usd``).
    price_note: str | None = None

    def describe(self) -> str:
        if self.cloud == "local":
            return f"this machine at ${self.hourly_usd:.4f}/h"
        where = self.zone or self.region
        acc = f" {self.accelerators}" if self.accelerators else ""
        kind = "spot" if self.spot else "on-demand"
        return f"{self.cloud} {where} {self.instance_type}{acc} {kind} ${self.hourly_usd:.4f}/h"


def find_offers(resources: ResourcesSpec, catalog: Catalog | None = None) -> list[Offer]:
    """Offers matching ``resources``, cheapest hourly first.

    * ``cloud``: one cloud, ``any`` (every catalog cloud), or ``local``/``kubernetes`` (one offer
      priced at ``resources.hourly_usd`` or 0);
    * ``accelerators``: any-of, exact per-node count, names case-insensitive (``tpu-v5e-8`` is an
      alias of ``tpu-v5litepod-8``); none = CPU-only nodes (at least 8 vCPUs unless ``cpus`` says);
    * ``spot``: true (spot only), false (on-demand only), auto (both);
    * ``region``/``zone``, ``cpus``/``memory`` minimums, ``max_hourly_usd`` (for all ``nodes``);
    * ``hourly_usd`` prices rows the catalog has no price for.

    One offer per (cloud, region, instance type, accelerators, spot); zones collapse to the
    cheapest.
    """
    if resources.cloud in _FLAT_CLOUDS:
        offers = [_flat_offer(resources)]
    else:
        catalog = catalog if catalog is not None else load_catalog()
        clouds = SUPPORTED_CLOUDS if resources.cloud == "any" else (resources.cloud,)
        offers = _search(resources, catalog, clouds)
    cap = resources.max_hourly_usd
    if cap is not None:
        offers = [o for o in offers if o.hourly_usd * resources.nodes <= cap + 1e-9]
    return sorted(offers, key=lambda o: (o.hourly_usd, o.cloud, o.region, o.instance_type, o.spot))


def _flat_offer(resources: ResourcesSpec) -> Offer:
    choices = resources.accelerator_choices
    name, count = choices[0] if choices else (None, 0)
    price = resources.hourly_usd or 0.0
    return Offer(
        cloud=resources.cloud, region=resources.cloud, zone=None, instance_type=resources.cloud,
        accelerators=f"{name}:{count}" if name else None, accelerator_name=name,
        accelerator_count=count, spot=False, hourly_usd=price,
        vcpus=float(os.cpu_count() or 1) if resources.cloud == "local" else resources.cpus,
        memory_gb=resources.memory, ondemand_hourly_usd=price,
        price_note=None if resources.hourly_usd is not None else "no hourly_usd: priced at $0",
    )


def _search(resources: ResourcesSpec, catalog: Catalog, clouds: tuple[str, ...]) -> list[Offer]:
    wanted = {(normalize(n), c) for n, c in resources.accelerator_choices}
    modes = (True, False) if resources.spot == "auto" else (bool(resources.spot),)
    best: dict[tuple[str, str, str, str | None, bool], Offer] = {}
    ondemand: dict[tuple[str, str, str, str | None], float] = {}
    for cloud in clouds:
        for row in catalog.rows(cloud):
            if not _matches(row, resources, wanted):
                continue
            base = (row.cloud, row.region, row.instance_type, row.accelerators)
            if row.price is not None and row.price < ondemand.get(base, float("inf")):
                ondemand[base] = row.price
            for spot in modes:
                price, note = _price(row, spot, resources.hourly_usd)
                if price is None:
                    continue
                key = (*base, spot)
                if key not in best or price < best[key].hourly_usd:
                    best[key] = _offer(row, spot, price, note)
    return [replace(o, ondemand_hourly_usd=ondemand.get(k[:4])) if o.spot else o
            for k, o in best.items()]


def _matches(row: CatalogRow, resources: ResourcesSpec, wanted: set[tuple[str, int]]) -> bool:
    if wanted:
        if row.accelerator_name is None:
            return False
        if (normalize(row.accelerator_name), row.accelerator_count) not in wanted:
            return False
    elif row.accelerator_name is not None:
        return False
    if resources.region and row.region.lower() != resources.region.lower():
        return False
    if resources.zone and not _zone_ok(row, resources.zone):
        return False
    min_cpus = resources.cpus
    if min_cpus is None and not wanted:
        min_cpus = DEFAULT_CPU_NODE_VCPUS
    if min_cpus is not None and row.vcpus is not None and row.vcpus < min_cpus:
        return False
    return not (resources.memory is not None and row.memory_gb is not None
                and row.memory_gb < resources.memory)


def _zone_ok(row: CatalogRow, zone: str) -> bool:
    """Exact zone; or, where the row has no zone name to compare (snapshot rows, AWS zone IDs such
    as ``use1-az1``, Azure), a zone inside the row's region (``us-east-1a`` in ``us-east-1``)."""
    region = row.region.lower()
    if row.zone is not None and row.zone.lower() == zone:
        return True
    if row.zone is not None and row.zone.lower().startswith(region):
        return row.zone.lower() == zone
    return zone.startswith(region)


def _price(row: CatalogRow, spot: bool, override: float | None) -> tuple[float | None, str | None]:
    """A row's price; an empty spot price means no spot capacity there (SkyPilot's reading), so
    ``hourly_usd`` stands in for spot only where the catalog has no price at all."""
    price = row.spot_price if spot else row.price
    if price is not None:
        return price, None
    if override is not None and (not spot or row.price is None):
        kind = "spot" if spot else "on-demand"
        return override, f"no catalog {kind} price for {row.instance_type} in {row.region}: " \
                         f"priced at resources.hourly_usd ${override}/h"
    return None, None


def _offer(row: CatalogRow, spot: bool, price: float, note: str | None) -> Offer:
    return Offer(
        cloud=row.cloud, region=row.region, zone=row.zone, instance_type=row.instance_type,
        accelerators=row.accelerators, accelerator_name=row.accelerator_name,
        accelerator_count=row.accelerator_count, spot=spot, hourly_usd=price, vcpus=row.vcpus,
        memory_gb=row.memory_gb, ondemand_hourly_usd=None if spot else price, price_note=note,
    )


@dataclass(frozen=True)
class PlanChoice:
    """The offer to launch, and whether it fits the budget."""

    chosen: Offer | None
    estimate: Estimate | None
    fits: bool
    over_by_usd: float
    reason: str


def choose(spec: JobSpec, offers: list[Offer], estimates: list[Estimate]) -> PlanChoice:
    """Cheapest TOTAL cost among offers whose estimated hours fit ``budget.max_hours``; then check
    ``budget.max_usd``. ``estimates[i]`` belongs to ``offers[i]``."""
    if len(offers) != len(estimates):
        raise ValueError("one estimate per offer")
    if not offers:
        return PlanChoice(None, None, False, 0.0, "no offer matches resources")
    budget = spec.budget
    timely = [e for e in estimates
              if budget.max_hours is None or e.total_hours <= budget.max_hours + 1e-9]
    if not timely:
        fastest = min(estimates, key=lambda e: e.total_hours)
        return PlanChoice(None, fastest, False, 0.0,
                          f"no offer finishes within {budget.max_hours:g} h; the fastest "
                          f"({fastest.offer.describe()}) needs {fastest.total_hours:.2f} h")
    best = min(timely, key=lambda e: (e.total_usd, e.total_hours, e.offer.spot, e.offer.cloud,
                                      e.offer.region, e.offer.instance_type))
    what = f"{best.offer.describe()}: {best.total_hours:.2f} h, ${best.total_usd:.2f}"
    if budget.max_usd is not None and best.total_usd > budget.max_usd + 1e-9:
        over = best.total_usd - budget.max_usd
        return PlanChoice(best.offer, best, False, over,
                          f"cheapest complete run ({what}) exceeds budget.max_usd "
                          f"${budget.max_usd:.2f} by ${over:.2f}")
    return PlanChoice(best.offer, best, True, 0.0, f"cheapest complete run: {what}")
