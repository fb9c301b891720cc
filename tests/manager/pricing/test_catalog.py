"""Catalog reading (SkyPilot v8 quirks) and the bundled snapshot, on the catalog subset in tests/data."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from optjob.manager.pricing import sources as catalog_mod
from optjob.manager.pricing.catalog import Catalog, read_vms
from optjob.manager.pricing.offers import find_offers
from optjob.manager.pricing.snapshot import (
    BUNDLED,
    COLUMNS,
    build_snapshot,
    load_snapshot,
    write_snapshot,
)
from optjob.manager.pricing.sources import catalog_dir, load_catalog, refresh
from optjob.specs.resources import ResourcesSpec


def _raw(v8: Path, cloud: str) -> list[dict[str, str]]:
    with open(v8 / cloud / "vms.csv", newline="") as fh:
        return [{k.strip(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(fh)]


def test_lambda_crlf_and_no_spot(v8: Path) -> None:
    rows = read_vms(v8 / "lambda" / "vms.csv", "lambda")
    assert rows
    assert all("\r" not in (r.region + r.instance_type) for r in rows)
    assert all(r.spot_price is None for r in rows)
    assert any(r.accelerators == "A100:1" and r.price == pytest.approx(1.99) for r in rows)


def test_duplicates_collapse_and_tpu_placeholder_dropped(v8: Path) -> None:
    rows = read_vms(v8 / "gcp" / "vms.csv", "gcp")
    v4 = [r for r in rows if r.accelerator_name == "tpu-v4-8"]
    assert len(v4) == 1 and v4[0].instance_type == "TPU-VM" and v4[0].price == 12.88
    v6e = {(r.region, r.zone): r for r in rows if r.accelerator_name == "tpu-v6e-8"}
    assert v6e[("asia-east1", "asia-east1-c")].price is None
    assert v6e[("asia-east1", "asia-east1-c")].spot_price is None
    assert v6e[("southamerica-west1", "southamerica-west1-a")].price == 21.6
    assert v6e[("southamerica-west1", "southamerica-west1-a")].spot_price is None
    assert all(r.price != 700.0 and r.spot_price != 700.0 for r in rows)


def test_gcp_gpu_row_is_priced_with_its_host_vm(v8: Path) -> None:
    raw = _raw(v8, "gcp")
    zone = "europe-north1-c"
    gpu = next(r for r in raw if not r["InstanceType"] and r["AcceleratorName"] == "H100"
               and r["AcceleratorCount"] == "1" and r["AvailabilityZone"] == zone)
    host = next(r for r in raw
                if r["InstanceType"] == "a3-highgpu-1g" and r["AvailabilityZone"] == zone)
    rows = read_vms(v8 / "gcp" / "vms.csv", "gcp")
    node = next(r for r in rows if r.accelerators == "H100:1" and r.zone == zone)
    assert node.instance_type == "a3-highgpu-1g"
    assert node.price == pytest.approx(float(gpu["Price"]) + float(host["Price"]))
    assert node.spot_price == pytest.approx(float(gpu["SpotPrice"]) + float(host["SpotPrice"]))
    assert node.vcpus == float(host["vCPUs"])
    # T4 goes on an n1 host; a2/a3/g2 hosts are not offered as CPU-only nodes.
    assert {r.instance_type for r in rows if r.accelerators == "T4:1"} == {"n1-standard-8"}
    cpu_types = {r.instance_type for r in rows if r.accelerator_name is None}
    assert cpu_types == {"n1-standard-8", "n2-standard-8"}


def test_catalog_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTJOB_CATALOG_DIR", str(tmp_path / "mine"))
    assert catalog_dir() == tmp_path / "mine"
    monkeypatch.delenv("OPTJOB_CATALOG_DIR")
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path))
    assert catalog_dir() is None
    assert load_catalog().source == "bundled snapshot"
    sky = tmp_path / ".sky" / "catalogs" / "v8"
    sky.mkdir(parents=True)
    assert catalog_dir() == sky


def test_clouds_are_read_lazily(v8: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    real = catalog_mod.read_vms
    def spy(path: Path, cloud: str) -> list:
        read.append(cloud)
        return real(path, cloud)

    monkeypatch.setattr(catalog_mod, "read_vms", spy)
    cat = load_catalog(v8)
    find_offers(ResourcesSpec(cloud="aws", accelerators="T4:1"), cat)
    assert read == ["aws"]


def _key(offers: list) -> list[tuple]:
    return [(o.cloud, o.region, o.instance_type, o.accelerators, o.spot, round(o.hourly_usd, 6))
            for o in offers]


@pytest.mark.parametrize("kw", [
    {"cloud": "aws", "accelerators": "A100:8", "spot": True},
    {"cloud": "any", "accelerators": "H100:1", "spot": "auto"},
    {"cloud": "gcp", "accelerators": "tpu-v5litepod-8", "spot": "auto"},
    {"cloud": "any", "accelerators": ["T4:1", "L4:1", "A100-80GB:1"], "spot": False},
    {"cloud": "any", "spot": "auto"},
    {"cloud": "lambda", "accelerators": "A100:1"},
])
def test_snapshot_round_trip_gives_the_same_offers(v8: Path, tmp_path: Path, kw: dict) -> None:
    dest = write_snapshot(build_snapshot(v8, "2025-01-01"), tmp_path / "prices.csv")
    small = load_catalog(dest)
    assert small.snapshot_date == "2025-01-01"
    full = load_catalog(v8)
    res = ResourcesSpec(**kw)
    offers = find_offers(res, full)
    assert offers
    assert _key(find_offers(res, small)) == _key(offers)


def test_bundled_snapshot_is_built_from_the_catalog_subset(v8: Path) -> None:
    with open(BUNDLED, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        shipped = [{k: v for k, v in r.items() if k != "snapshot_date"} for r in reader]
    fresh = [{k: v for k, v in r.items() if k != "snapshot_date"} for r in build_snapshot(v8)]
    assert shipped == fresh
    rows, date = load_snapshot()
    assert len(rows) == len(shipped) and date


def test_refresh_writes_a_loadable_snapshot(v8: Path, tmp_path: Path) -> None:
    dest = refresh(tmp_path / "sub" / "prices.csv", v8, download=False)
    cat = load_catalog(dest)
    assert isinstance(cat, Catalog)
    assert {r.cloud for r in cat.all_rows()} == {"aws", "gcp", "azure", "lambda", "runpod"}
    assert not list((tmp_path / "sub").glob(".prices-*"))


def test_refresh_without_a_catalog_and_without_download(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPTJOB_CATALOG_DIR", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path))
    with pytest.raises(FileNotFoundError):
        refresh(tmp_path / "p.csv", download=False)


def test_a_folder_missing_some_clouds_falls_back_to_the_snapshot(v8: Path, tmp_path: Path) -> None:
    (tmp_path / "aws").mkdir()
    (tmp_path / "aws" / "vms.csv").write_bytes((v8 / "aws" / "vms.csv").read_bytes())
    cat = load_catalog(tmp_path)
    assert cat.fallback_clouds == ("gcp", "azure", "lambda", "runpod")
    assert any(r.zone for r in cat.rows("aws"))  # from the folder: zones kept
    gcp = cat.rows("gcp")
    assert gcp and all(r.zone is None for r in gcp)  # from the snapshot
    assert load_catalog(v8).fallback_clouds == ()
