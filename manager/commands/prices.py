"""``optjob prices`` (the offers on the market, cheapest first) and ``optjob prices refresh``."""

from __future__ import annotations

import json

import click
from optjob.specs.errors import UsageError


def prices_command(gpu: str | None, spot: bool, cloud: str, region: str | None, limit: int, as_json: bool) -> None:
    from optjob.specs.resources import ResourcesSpec

    from ..pricing import find_offers
    from ..pricing.sources import current_catalog
    from ..units import money

    try:
        resources = ResourcesSpec(cloud=cloud, accelerators=gpu, spot=True if spot else "auto",  # type: ignore[arg-type]
                                  region=region)
    except ValueError as exc:
        raise UsageError(f"bad filter: {exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc}") from None
    catalog = current_catalog()
    offers = [o for o in find_offers(resources, catalog) if o.spot or not spot]
    offers.sort(key=lambda o: o.hourly_usd)
    if as_json:
        click.echo(json.dumps([{"cloud": o.cloud, "region": o.region, "instance_type": o.instance_type,
                                "accelerators": o.accelerators, "spot": o.spot, "hourly_usd": o.hourly_usd,
                                "vcpus": o.vcpus, "memory_gb": o.memory_gb} for o in offers[:limit]], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("cloud", "region", "instance", "accelerators", "spot", "$/h", "vCPUs", "mem GB", box=None,
                  title=f"{len(offers)} offers from {getattr(catalog, 'source', 'catalog')}", pad_edge=False)
    for o in offers[:limit]:
        table.add_row(o.cloud, o.region, o.instance_type, o.accelerators or "CPU", "yes" if o.spot else "no",
                      money(o.hourly_usd), f"{o.vcpus or 0:g}", f"{o.memory_gb or 0:g}")
    Console(highlight=False).print(table)


def refresh_command() -> None:
    from ..pricing.sources import cached_prices, refresh

    try:
        dest = refresh(cached_prices())
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not refresh prices: {exc} (no SkyPilot catalog and no network?)") from None
    click.echo(f"prices written to {dest}")
