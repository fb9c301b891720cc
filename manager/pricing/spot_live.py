"""Live AWS spot prices (EC2 ``DescribeSpotPriceHistory``), when the user has AWS credentials.

boto3 is imported lazily, here only: the CLI starts without it, and a machine without boto3 or
without credentials simply gets ``{}`` (the catalog's spot prices stand). Nothing here raises for
missing credentials, denied calls or no network.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from .offers import Offer

log = logging.getLogger(__name__)
PRODUCT = "Linux/UNIX"


def credentials_available() -> bool:
    """boto3 importable and a credential chain that resolves (env, profile, SSO, instance role)."""
    if importlib.util.find_spec("boto3") is None:
        return False
    try:
        import boto3

        return boto3.Session().get_credentials() is not None
    except Exception:  # botocore config/profile errors: treat as no credentials
        return False


def live_spot_prices(instance_types: Iterable[str], regions: Iterable[str], *,
                     notes: list[str] | None = None,
                     timeout_s: float = 10.0) -> dict[tuple[str, str, str], float]:
    """{(region, zone, instance_type): latest USD/h} for Linux spot capacity; ``{}`` when boto3 or
    credentials are missing or AWS cannot be reached (a line is appended to ``notes`` then)."""
    types = sorted(set(instance_types))
    wanted = sorted(set(regions))
    if not types or not wanted:
        return {}
    if not credentials_available():
        return {}
    try:
        import boto3
        from botocore.config import Config
    except ImportError:  # pragma: no cover - find_spec said it exists
        return {}
    cfg = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 2})
    session = boto3.Session()
    out: dict[tuple[str, str, str], float] = {}
    for region in wanted:
        try:
            client = session.client("ec2", region_name=region, config=cfg)
            out.update(_region_prices(client, region, types))
        except Exception as exc:  # botocore ClientError/BotoCoreError, network, denied
            msg = f"live spot prices unavailable for {region}: {type(exc).__name__}: {exc}"
            log.debug(msg)
            if notes is not None:
                notes.append(msg)
    return out


def _region_prices(client: Any, region: str, types: list[str]) -> dict[tuple[str, str, str], float]:
    latest: dict[tuple[str, str, str], tuple[dt.datetime, float]] = {}
    pages = client.get_paginator("describe_spot_price_history").paginate(
        InstanceTypes=types, ProductDescriptions=[PRODUCT],
        StartTime=dt.datetime.now(dt.timezone.utc),
    )
    for page in pages:
        for item in page.get("SpotPriceHistory", []):
            key = (region, item["AvailabilityZone"], item["InstanceType"])
            stamp, price = item["Timestamp"], float(item["SpotPrice"])
            if key not in latest or stamp > latest[key][0]:
                latest[key] = (stamp, price)
    return {k: v[1] for k, v in latest.items()}


def overlay(offers: list[Offer], prices: dict[tuple[str, str, str], float]) -> list[Offer]:
    """AWS spot offers re-priced at the cheapest live zone price in their region (the catalog's
    zone IDs differ from the API's zone names, so the zone becomes the live one)."""
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for (region, zone, itype), price in prices.items():
        if (region, itype) not in best or price < best[(region, itype)][0]:
            best[(region, itype)] = (price, zone)
    out = []
    for o in offers:
        live = best.get((o.region, o.instance_type)) if o.cloud == "aws" and o.spot else None
        out.append(o if live is None else replace(o, hourly_usd=live[0], zone=live[1],
                                                  price_note="live EC2 spot price"))
    return out
