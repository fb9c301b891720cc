"""Offer search against the SkyPilot catalog subset in tests/data, and live spot prices without AWS."""

from __future__ import annotations

import csv
import importlib.machinery
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from optjob.manager.pricing import spot_live
from optjob.manager.pricing.catalog import Catalog, CatalogRow
from optjob.manager.pricing.offers import Offer, find_offers
from optjob.manager.pricing.sources import load_catalog
from optjob.specs.resources import ResourcesSpec


@pytest.fixture(scope="module")
def cat(v8: Path) -> Catalog:
    return load_catalog(v8)


def _raw(v8: Path, cloud: str) -> list[dict[str, str]]:
    with open(v8 / cloud / "vms.csv", newline="") as fh:
        return [{k.strip(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(fh)]


def _f(text: str) -> float | None:
    return float(text) if text else None


def _is(row: dict[str, str], name: str, count: int) -> bool:
    return row["AcceleratorName"] == name and bool(row["AcceleratorCount"]) \
        and float(row["AcceleratorCount"]) == count


def test_cheapest_spot_a100x8_on_aws(v8: Path, cat: Catalog) -> None:
    raw = [r for r in _raw(v8, "aws") if _is(r, "A100", 8) and r["SpotPrice"]]
    cheapest = min(raw, key=lambda r: float(r["SpotPrice"]))
    offers = find_offers(ResourcesSpec(cloud="aws", accelerators="A100:8", spot=True), cat)
    best = offers[0]
    assert (best.instance_type, best.region) == (cheapest["InstanceType"], cheapest["Region"])
    assert best.instance_type == "p4d.24xlarge"
    assert best.hourly_usd == pytest.approx(float(cheapest["SpotPrice"]))
    assert best.hourly_usd == pytest.approx(2.4655)
    assert best.spot and best.accelerators == "A100:8" and best.accelerator_count == 8
    assert best.ondemand_hourly_usd == pytest.approx(min(
        float(r["Price"]) for r in _raw(v8, "aws")
        if r["InstanceType"] == "p4d.24xlarge" and r["Region"] == best.region))
    assert all(o.spot for o in offers)
    # zones collapse: one offer per region
    assert len({o.region for o in offers}) == len(offers)


def _expected_h100(v8: Path) -> tuple[str, float]:
    """Cheapest H100:1 node over every cloud, computed straight from the CSVs."""
    best: list[tuple[float, str]] = []
    for cloud in ("aws", "azure", "lambda", "runpod"):
        for r in _raw(v8, cloud):
            if _is(r, "H100", 1):
                best += [(p, cloud) for p in (_f(r["Price"]), _f(r["SpotPrice"])) if p is not None]
    gcp = _raw(v8, "gcp")
    hosts = {(r["Region"], r["AvailabilityZone"]): r
             for r in gcp if r["InstanceType"] == "a3-highgpu-1g"}
    for r in gcp:
        host = hosts.get((r["Region"], r["AvailabilityZone"]))
        if not r["InstanceType"] and _is(r, "H100", 1) and host:
            for key in ("Price", "SpotPrice"):
                if r[key] and host[key]:
                    best.append((float(r[key]) + float(host[key]), "gcp"))
    price, cloud = min(best)
    return cloud, price


def test_h100x1_anywhere_is_the_cheapest_node_over_all_clouds(v8: Path, cat: Catalog) -> None:
    cloud, price = _expected_h100(v8)
    offers = find_offers(ResourcesSpec(cloud="any", accelerators="H100:1", spot="auto"), cat)
    assert {o.cloud for o in offers} >= {"gcp", "lambda", "runpod"}
    assert (offers[0].cloud, offers[0].hourly_usd) == (cloud, pytest.approx(price))
    assert offers[0].cloud == "gcp" and offers[0].instance_type == "a3-highgpu-1g"
    assert offers[0].spot  # host + GPU spot in europe-north1: 0.2022 + 1.3369
    ondemand = find_offers(ResourcesSpec(cloud="any", accelerators="H100:1", spot=False), cat)
    assert not any(o.spot for o in ondemand)
    assert ondemand[0].hourly_usd == pytest.approx(2.89) and ondemand[0].cloud == "runpod"


def test_tpu_v5e_on_gcp(cat: Catalog) -> None:
    res = ResourcesSpec(cloud="gcp", accelerators="tpu-v5litepod-8", spot="auto")
    offers = find_offers(res, cat)
    spot = [o for o in offers if o.spot]
    ondemand = [o for o in offers if not o.spot]
    assert spot[0].instance_type == "TPU-VM" and spot[0].accelerators == "tpu-v5litepod-8:1"
    assert spot[0].hourly_usd == pytest.approx(1.95941)
    assert ondemand[0].hourly_usd == pytest.approx(9.6)
    alias = find_offers(ResourcesSpec(cloud="gcp", accelerators="tpu-v5e-8", spot="auto"), cat)
    assert [o.hourly_usd for o in alias] == [o.hourly_usd for o in offers]


def test_lambda_has_no_spot_offers(cat: Catalog) -> None:
    assert find_offers(ResourcesSpec(cloud="lambda", accelerators="A100:1", spot=True), cat) == []
    auto = find_offers(ResourcesSpec(cloud="lambda", accelerators="A100:1", spot="auto"), cat)
    assert auto and not any(o.spot for o in auto)
    assert auto[0].hourly_usd == pytest.approx(1.99)


def test_spot_modes(cat: Catalog) -> None:
    def kinds(spot: Any) -> set[bool]:
        res = ResourcesSpec(cloud="aws", accelerators="T4:1", spot=spot)
        return {o.spot for o in find_offers(res, cat)}
    assert kinds(True) == {True} and kinds(False) == {False} and kinds("auto") == {True, False}


def test_max_hourly_usd_counts_every_node(cat: Catalog) -> None:
    res = ResourcesSpec(cloud="aws", accelerators="A100:8", spot=True, max_hourly_usd=5)
    offers = find_offers(res, cat)
    assert offers and all(o.hourly_usd <= 5 for o in offers)
    uncapped = find_offers(res.model_copy(update={"max_hourly_usd": None}), cat)
    assert len(offers) < len(uncapped)
    two = find_offers(res.model_copy(update={"nodes": 2}), cat)
    assert [(o.region, o.hourly_usd) for o in two] == [("us-east-1", pytest.approx(2.4655))]


def test_region_and_zone_filters(cat: Catalog) -> None:
    offers = find_offers(ResourcesSpec(cloud="aws", accelerators="T4:1", region="us-east-2"), cat)
    assert offers and {o.region for o in offers} == {"us-east-2"}
    zoned = find_offers(ResourcesSpec(cloud="gcp", accelerators="H100:1", spot=True,
                                      zone="europe-north1-c"), cat)
    assert [(o.zone, o.hourly_usd) for o in zoned] == [("europe-north1-c", pytest.approx(1.5391))]
    # AWS rows carry zone IDs (use1-az1): a zone name selects its region
    res = ResourcesSpec(cloud="aws", accelerators="A100:8", spot=True, zone="us-east-1a")
    aws = find_offers(res, cat)
    assert aws and {o.region for o in aws} == {"us-east-1"}


def test_any_of_case_insensitive_and_resource_minimums(cat: Catalog) -> None:
    offers = find_offers(ResourcesSpec(cloud="aws", accelerators=["a100:8", "H100:8"]), cat)
    assert {o.instance_type for o in offers} == {"p4d.24xlarge", "p5.48xlarge"}
    assert find_offers(ResourcesSpec(cloud="aws", accelerators="A100:4"), cat) == []
    cpu = find_offers(ResourcesSpec(cloud="aws"), cat)
    assert {o.instance_type for o in cpu} == {"m6i.2xlarge"}
    assert find_offers(ResourcesSpec(cloud="aws", cpus=16), cat) == []
    assert find_offers(ResourcesSpec(cloud="aws", accelerators="T4:1", memory="64GB"), cat) == []


def test_local_offer() -> None:
    [offer] = find_offers(ResourcesSpec(cloud="local", hourly_usd=0.10))
    got = (offer.cloud, offer.hourly_usd, offer.spot, offer.accelerators)
    assert got == ("local", 0.10, False, None)
    [free] = find_offers(ResourcesSpec(cloud="local", accelerators="A100:1"))
    assert free.hourly_usd == 0.0 and free.accelerators == "A100:1" and free.accelerator_count == 1
    assert find_offers(ResourcesSpec(cloud="local", hourly_usd=2, max_hourly_usd=1)) == []


def test_hourly_usd_prices_rows_without_a_catalog_price() -> None:
    row = CatalogRow("gcp", "us-central2", "us-central2-b", "TPU-VM", "tpu-v6e-8", 1,
                     None, None, None, None)
    cat = Catalog.from_rows([row])
    res = ResourcesSpec(cloud="gcp", accelerators="tpu-v6e-8", spot=False)
    assert find_offers(res, cat) == []
    [offer] = find_offers(res.model_copy(update={"hourly_usd": 30.0}), cat)
    assert offer.hourly_usd == 30.0 and offer.price_note and "hourly_usd" in offer.price_note


# -- live spot prices -----------------------------------------------------------------------------


def _fake_boto3(monkeypatch: pytest.MonkeyPatch, creds: Any, client: Any = None) -> None:
    boto3 = types.ModuleType("boto3")
    boto3.__spec__ = importlib.machinery.ModuleSpec("boto3", None)

    class Session:
        def get_credentials(self) -> Any:
            return creds

        def client(self, *a: Any, **k: Any) -> Any:
            if isinstance(client, Exception):
                raise client
            return client

    boto3.Session = Session  # type: ignore[attr-defined]
    botocore = types.ModuleType("botocore")
    config = types.ModuleType("botocore.config")
    config.Config = lambda **k: k  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "boto3", boto3)
    monkeypatch.setitem(sys.modules, "botocore", botocore)
    monkeypatch.setitem(sys.modules, "botocore.config", config)


def test_live_spot_prices_need_boto3_and_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spot_live.importlib.util, "find_spec", lambda name: None)
    assert spot_live.live_spot_prices(["p4d.24xlarge"], ["us-east-1"]) == {}
    monkeypatch.undo()
    _fake_boto3(monkeypatch, creds=None)
    assert spot_live.live_spot_prices(["p4d.24xlarge"], ["us-east-1"]) == {}


def test_live_spot_prices_swallow_aws_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_boto3(monkeypatch, creds=object(), client=OSError("no network"))
    notes: list[str] = []
    assert spot_live.live_spot_prices(["p4d.24xlarge"], ["us-east-1"], notes=notes) == {}
    assert notes and "us-east-1" in notes[0]


def test_live_spot_prices_overlay(monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime as dt

    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    def item(zone: str, price: str, hours: int = 0) -> dict[str, Any]:
        return {"AvailabilityZone": zone, "InstanceType": "p4d.24xlarge", "SpotPrice": price,
                "Timestamp": t0 + dt.timedelta(hours=hours)}

    page = {"SpotPriceHistory": [item("us-east-1a", "3.0"), item("us-east-1a", "2.0", 1),
                                 item("us-east-1b", "2.5")]}

    class Client:
        def get_paginator(self, name: str) -> Any:
            assert name == "describe_spot_price_history"
            return types.SimpleNamespace(paginate=lambda **k: [page])

    _fake_boto3(monkeypatch, creds=object(), client=Client())
    prices = spot_live.live_spot_prices(["p4d.24xlarge"], ["us-east-1"])
    assert prices == {("us-east-1", "us-east-1a", "p4d.24xlarge"): 2.0,
                      ("us-east-1", "us-east-1b", "p4d.24xlarge"): 2.5}
    offer = Offer("aws", "us-east-1", "use1-az1", "p4d.24xlarge", "A100:8", "A100", 8, True, 2.4655,
                  96, 1152)
    [live] = spot_live.overlay([offer], prices)
    assert (live.hourly_usd, live.zone) == (2.0, "us-east-1a")
