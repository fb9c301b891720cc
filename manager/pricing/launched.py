"""The price of what a provider actually launched (``providers.base.Placement``), for the meter.

``Pricer.price`` looks the launched instance up in the catalog (``catalog.py``: the same rows the
plan's offers come from) in its cloud and region (its zone when the catalog has it), spot or on
demand; an AWS spot instance is re-priced from EC2's live spot price history when AWS credentials
are present (``spot_live``; ``OPTJOB_LIVE_PRICES=0`` turns it off). Each price carries its source,
which the ledger records: ``catalog:aws/us-east-1/p3.2xlarge/spot``, ``live:...``.

``Pricer.price`` of a placement with no instance type (SkyPilot's jobs controller when its record
cannot be read) estimates one: the cheapest on-demand CPU instance of the cloud (the region, when
known) with at least ``cpus`` vCPUs and ``memory_ratio`` GiB per vCPU, in SkyPilot's default families
where the catalog has them (sky/catalog/aws_catalog.py:37 ``_DEFAULT_INSTANCE_FAMILY``), plus its disk
at ``DISK_USD_PER_GB_MONTH``: ``estimate:aws/us-east-1/m6i.xlarge/on-demand+50GB``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from optjob.providers.base import Placement

from .catalog import Catalog, CatalogRow

#: A general-purpose SSD's price per GB-month (AWS gp3 in us-east-1, GCP pd-balanced is $0.10):
#: what a controller's disk costs while it runs. An hour is 1/730 of a month.
DISK_USD_PER_GB_MONTH = 0.08
HOURS_PER_MONTH = 730.0
#: SkyPilot's default CPU families, by cloud (sky/catalog/{aws,gcp,azure}_catalog.py _DEFAULT_INSTANCE_FAMILY).
DEFAULT_FAMILIES = {"aws": ("m6i.", "m6id.", "m7i."), "gcp": ("n2-standard-",), "azure": ("Standard_D",)}


@dataclass(frozen=True)
class Price:
    """USD per node-hour and where it came from."""

    hourly_usd: float
    source: str


LiveLookup = Callable[[str, str], "float | None"]  # (region, instance type) -> USD/h of spot capacity


def _live_spot(region: str, instance_type: str) -> float | None:
    """The cheapest live EC2 spot price of ``instance_type`` in ``region``; None without credentials."""
    if os.environ.get("OPTJOB_LIVE_PRICES", "1") == "0":
        return None
    from . import spot_live

    prices = spot_live.live_spot_prices([instance_type], [region], timeout_s=3.0)
    found = [p for (r, _, t), p in prices.items() if r == region and t == instance_type]
    return min(found) if found else None


@dataclass
class Pricer:
    """Prices placements from ``catalog`` (loaded on first use), each looked up once."""

    catalog: Callable[[], Catalog]
    live: LiveLookup | None = _live_spot
    _loaded: Catalog | None = None
    _seen: dict[str, Price | None] = field(default_factory=dict)

    def _rows(self, cloud: str) -> list[CatalogRow]:
        if self._loaded is None:
            self._loaded = self.catalog()
        return self._loaded.rows(cloud)

    def price(self, placement: Placement) -> Price | None:
        """The per-node price of ``placement``; None when the catalog has no such instance there."""
        key = f"{placement.key()}|{placement.zone}|{placement.cpus}|{placement.memory_ratio}|{placement.disk_gb}"
        if key not in self._seen:
            found = self._lookup(placement) if placement.instance_type else self._estimate(placement)
            self._seen[key] = found
        return self._seen[key]

    def _lookup(self, p: Placement) -> Price | None:
        rows = [r for r in self._rows(p.cloud) if r.instance_type == p.instance_type
                and (p.region is None or r.region == p.region)]
        if p.zone and any(r.zone == p.zone for r in rows):
            rows = [r for r in rows if r.zone == p.zone]
        prices = [r.spot_price if p.spot else r.price for r in rows]
        known = [x for x in prices if x is not None]
        if p.cloud == "aws" and p.spot and p.region and p.instance_type and self.live is not None:
            try:
                live = self.live(p.region, p.instance_type)
            except Exception:  # a price source that fails is no price: the catalog's stands
                live = None
            if live is not None:
                return Price(live + self._disk(p), f"live:{p.key()}")
        if not known:
            return None
        return Price(min(known) + self._disk(p), f"catalog:{p.key()}")

    def _estimate(self, p: Placement) -> Price | None:
        cpus, ratio = p.cpus or 1.0, p.memory_ratio or 0.0
        rows = [r for r in self._rows(p.cloud) if not r.accelerator_name and r.price is not None
                and r.vcpus is not None and r.vcpus >= cpus and r.memory_gb is not None
                and r.memory_gb >= ratio * r.vcpus and (p.region is None or r.region == p.region)]
        preferred = [r for r in rows if r.instance_type.startswith(DEFAULT_FAMILIES.get(p.cloud, ()))]
        rows = preferred or rows
        if not rows:
            return None
        best = min(rows, key=lambda r: (r.price or 0.0, r.instance_type))
        assert best.price is not None
        disk = f"+{p.disk_gb:g}GB" if p.disk_gb else ""
        return Price(best.price + self._disk(p),
                     f"estimate:{p.cloud}/{p.region or best.region}/{best.instance_type}/on-demand{disk}")

    @staticmethod
    def _disk(p: Placement) -> float:
        return (p.disk_gb or 0.0) * DISK_USD_PER_GB_MONTH / HOURS_PER_MONTH


_DEFAULT: list[Pricer] = []


def default_pricer() -> Pricer:
    """One pricer per process, on the catalog plans use (``sources.current_catalog``)."""
    if not _DEFAULT:
        from .sources import current_catalog

        _DEFAULT.append(Pricer(current_catalog))
    return _DEFAULT[0]
