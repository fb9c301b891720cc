"""``optjob prices`` (the offers on the market, cheapest first) and ``optjob prices refresh``."""

from __future__ import annotations

import datetime
import difflib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import click
from optjob.specs.errors import UsageError

if TYPE_CHECKING:
    from ..pricing.catalog import Catalog

#: ``A100x8``, ``A100*8``, ``8xA100``: a count written the other way (read as ``A100:8`` when that
#: is the only reading: the whole text names no accelerator and the name part does).
_TIMES = re.compile(r"^\s*(?:([A-Za-z][A-Za-z0-9._-]*?)\s*[x*×]\s*(\d+)|(\d+)\s*[x*×]\s*([A-Za-z][A-Za-z0-9._-]*))\s*$",
                    re.I)


def prices_command(gpu: str | None, spot: bool, cloud: str, region: str | None, limit: int, as_json: bool) -> None:
    from optjob.specs.resources import ResourcesSpec

    from ..pricing import find_offers
    from ..pricing.catalog import SUPPORTED_CLOUDS
    from ..pricing.sources import current_catalog
    from ..render import print_fitted
    from ..units import money

    cloud = cloud.strip().lower()
    if cloud not in (*SUPPORTED_CLOUDS, "any"):
        raise UsageError(f"cloud {cloud!r} is not supported: `optjob prices` knows {', '.join(SUPPORTED_CLOUDS)} "
                         "(or any)")
    catalog = current_catalog()
    clouds = SUPPORTED_CLOUDS if cloud == "any" else (cloud,)
    if gpu is not None:
        gpu, note = read_gpu(gpu, catalog, clouds)
        if note and not as_json:
            click.echo(click.style(note, dim=True), err=True)
    try:
        resources = ResourcesSpec(cloud=cloud, accelerators=gpu, spot=True if spot else "auto",  # type: ignore[arg-type]
                                  region=region)
    except ValueError as exc:
        raise UsageError(f"bad filter: {exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc}") from None
    offers = [o for o in find_offers(resources, catalog) if o.spot or not spot]
    offers.sort(key=lambda o: o.hourly_usd)
    if not offers:
        raise UsageError(no_offers_hint(gpu, spot=spot, cloud=cloud, region=region, catalog=catalog,
                                        clouds=clouds))
    dated = catalog_date(catalog, clouds)
    if as_json:
        click.echo(json.dumps([{"cloud": o.cloud, "region": o.region, "instance_type": o.instance_type,
                                "accelerators": o.accelerators, "spot": o.spot, "hourly_usd": o.hourly_usd,
                                "ondemand_hourly_usd": o.ondemand_hourly_usd, "vcpus": o.vcpus,
                                "memory_gb": o.memory_gb, "catalog_date": dated} for o in offers[:limit]], indent=2))
        return
    source = getattr(catalog, "source", "catalog")
    shown = f"{min(limit, len(offers))} of {len(offers)}" if len(offers) > limit else f"{len(offers)}"
    rows = [{"where": f"{o.cloud}/{o.region}", "accelerators": o.accelerators or "CPU",
             "$/h": money(o.hourly_usd), "spot": "yes" if o.spot else "no",
             "on-demand $/h": (money(o.ondemand_hourly_usd) if o.ondemand_hourly_usd is not None else "-")
             if o.spot else "", "instance": o.instance_type, "vCPUs": f"{o.vcpus or 0:g}",
             "mem GB": f"{o.memory_gb or 0:g}"} for o in offers[:limit]]
    print_fitted(rows, PRICE_COLUMNS, title=f"{shown} offers from {source}" + (f", prices of {dated}" if dated else ""))


#: The offers table's columns, most important first: those that do not fit the width are dropped
#: (a cell is never cut).
PRICE_COLUMNS = ("where", "accelerators", "spot", "$/h", "on-demand $/h", "instance", "vCPUs", "mem GB")


def _names(catalog: Catalog, clouds: tuple[str, ...]) -> dict[str, set[int]]:
    """Accelerator name (as the catalog spells it) -> the per-node counts it comes in."""
    out: dict[str, set[int]] = {}
    for c in clouds:
        for row in catalog.rows(c):
            if row.accelerator_name:
                out.setdefault(row.accelerator_name, set()).add(row.accelerator_count)
    return out


def _known(name: str, names: dict[str, set[int]]) -> str | None:
    from ..pricing.accelerators import normalize

    return next((n for n in names if normalize(n) == normalize(name)), None)


def read_gpu(gpu: str, catalog: Catalog, clouds: tuple[str, ...]) -> tuple[str, str | None]:
    """``--gpu`` as the catalog reads it: ``A100x8`` is ``A100:8`` when that is the only reading
    (no accelerator is called ``A100x8`` and one is called ``A100``); and a note saying so."""
    m = _TIMES.match(gpu)
    if not m:
        return gpu, None
    name, count = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
    names = _names(catalog, clouds)
    if _known(gpu.strip(), names) or not (known := _known(name, names)):
        return gpu, None
    return f"{known}:{int(count)}", f"reading --gpu {gpu} as {known}:{int(count)}"


def no_offers_hint(gpu: str | None, *, spot: bool, cloud: str, region: str | None,
                   catalog: Catalog, clouds: tuple[str, ...]) -> str:
    """One line: nothing matched, and the nearest thing that would."""
    from optjob.specs.shorthand import parse_accelerator

    what = " ".join(x for x in (gpu or "CPU", "spot" if spot else "", f"on {cloud}" if cloud != "any" else "",
                                f"in {region}" if region else "") if x)
    head = f"no offers for {what}"
    if gpu is None:
        return head + ("; try without --region" if region else "")
    try:
        parsed = parse_accelerator(gpu)
    except ValueError:
        return head
    (name, count), = parsed.items()
    names = _names(catalog, clouds)
    known = _known(name, names)
    if known is None:
        m = _TIMES.match(name)
        base = m.group(1) or m.group(4) if m else None
        candidates = [base] if base and _known(base, names) else \
            difflib.get_close_matches(name, list(names), n=1, cutoff=0.6) or \
            difflib.get_close_matches(name.upper(), list(names), n=1, cutoff=0.6)
        if candidates:
            n = _known(candidates[0], names) or candidates[0]
            c = int(m.group(2) or m.group(3)) if m and base else count
            return f"{head}; did you mean {n}:{c}?"
        from ..pricing.catalog import SUPPORTED_CLOUDS

        others = [c for c in SUPPORTED_CLOUDS if c not in clouds]
        return head + (f"; no accelerator of that name on {cloud} (try --cloud any)" if others
                       else "; no accelerator of that name in the catalog (`optjob prices` lists them)")
    counts = sorted(names[known])
    if count not in counts:
        return f"{head}; {known} comes as {', '.join(f'{known}:{c}' for c in counts)} per node"
    return head + ("; try without --region" if region else "; try without --spot" if spot else "")


def catalog_date(catalog: Catalog, clouds: tuple[str, ...]) -> str | None:
    """The day the prices are from: the snapshot's date, else the newest catalog file's mtime."""
    if catalog.snapshot_date:
        return str(catalog.snapshot_date)
    where = Path(str(catalog.source)).expanduser()
    files = [where] if where.is_file() else [where / c / "vms.csv" for c in clouds]
    times = [f.stat().st_mtime for f in files if f.is_file()]
    if not times:
        return None
    return datetime.datetime.fromtimestamp(max(times), datetime.timezone.utc).strftime("%Y-%m-%d")


def refresh_command() -> None:
    from ..pricing.sources import cached_prices, refresh

    try:
        dest = refresh(cached_prices())
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not refresh prices: {exc} (no SkyPilot catalog and no network?)") from None
    click.echo(f"prices written to {dest}")
