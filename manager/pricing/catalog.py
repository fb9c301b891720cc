"""Reader of SkyPilot's pricing catalog (schema ``catalogs/v8/<cloud>/vms.csv``), csv module only.

Every cloud's file becomes a list of :class:`CatalogRow`, one per (instance, region, zone) with the
on-demand and spot price per node-hour. Quirks handled here, as SkyPilot handles them:

* duplicated rows collapse; an empty ``SpotPrice`` means no spot capacity for that row (SkyPilot's
  ``get_region_zones(df, use_spot=True)`` drops such rows too);
* Lambda's CRLF line endings (``newline=""`` and stripped cells);
* GCP: a GPU row has an empty ``InstanceType`` and prices the GPUs alone. It attaches to a host VM
  in the same zone (A100 -> a2-highgpu, A100-80GB -> a2-ultragpu, H100 -> a3-highgpu, L4 -> g2,
  others -> n1 with SkyPilot's default vCPU floor), and the node price is host + GPU, on-demand and
  spot alike: what ``sky.catalog.gcp_catalog.list_accelerators`` shows and what SkyPilot charges
  (``GCP.instance_type_to_hourly_cost`` + ``accelerators_to_hourly_cost``). One row per
  compatible host is emitted; the offer search keeps the cheapest that meets cpus/memory.
* GCP TPU rows (``AcceleratorName`` ``tpu-*``) run as instance type ``TPU-VM``, whose host SkyPilot
  prices at 0, so the node price is the TPU row's price. The placeholder price 700.0 on some TPU
  rows means "unknown" and is dropped.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

#: Clouds a spec can name whose prices come from a SkyPilot catalog.
SUPPORTED_CLOUDS = ("aws", "gcp", "azure", "lambda", "runpod")
TPU_HOST = "TPU-VM"
_TPU_PLACEHOLDER = 700.0

# GCP hosts per accelerator (sky/catalog/gcp_catalog.py, _ACC_INSTANCE_TYPE_DICTS).
_Hosts = dict[int, tuple[str, ...]]
_GCP_FIXED_HOSTS: dict[str, _Hosts] = {
    "A100": {**{n: (f"a2-highgpu-{n}g",) for n in (1, 2, 4, 8)}, 16: ("a2-megagpu-16g",)},
    "A100-80GB": {n: (f"a2-ultragpu-{n}g",) for n in (1, 2, 4, 8)},
    "L4": {1: tuple(f"g2-standard-{c}" for c in (4, 8, 12, 16, 32)), 2: ("g2-standard-24",),
           4: ("g2-standard-48",), 8: ("g2-standard-96",)},
    "H100": {n: (f"a3-highgpu-{n}g",) for n in (1, 2, 4, 8)},
    "H100-MEGA": {8: ("a3-megagpu-8g",)},
    "H200": {8: ("a3-ultragpu-8g",)},
    "B200": {8: ("a4-highgpu-8g",)},
}
GCP_GPU_HOSTS = frozenset(h for by_count in _GCP_FIXED_HOSTS.values()
                          for hosts in by_count.values() for h in hosts)
# Other GPUs go on n1 hosts with at least this many vCPUs and 4 GiB per vCPU
# (_NUM_ACC_TO_NUM_CPU)...
_N1_MIN_CPUS = {"K80": {1: 4, 2: 8, 4: 16, 8: 32, 16: 64}, "T4": {1: 4, 2: 8, 4: 48}}
_N1_DEFAULT_CPUS = {1: 8, 2: 16, 4: 32, 8: 64, 16: 128}
# ... and at most this many vCPUs and GiB (_NUM_ACC_TO_MAX_CPU_AND_MEMORY).
_N1_MAX = {
    "K80": {1: (8, 52), 2: (16, 104), 4: (32, 208), 8: (64, 208)},
    "V100": {1: (12, 78), 2: (24, 156), 4: (48, 312), 8: (96, 624)},
    "T4": {1: (48, 312), 2: (48, 312), 4: (96, 624)},
    "P4": {1: (24, 156), 2: (48, 312), 4: (96, 624)},
    "P100": {1: (16, 104), 2: (32, 208), 4: (96, 624)},
}
_N1_FAMILIES = ("n1-standard-", "n1-highmem-", "n1-highcpu-")


@dataclass(frozen=True, slots=True)
class CatalogRow:
    """One node type in one region (and zone, where the catalog has zones); USD per node-hour."""

    cloud: str
    region: str
    zone: str | None
    instance_type: str
    accelerator_name: str | None
    accelerator_count: int
    vcpus: float | None
    memory_gb: float | None
    price: float | None
    spot_price: float | None

    @property
    def accelerators(self) -> str | None:
        if not self.accelerator_name:
            return None
        return f"{self.accelerator_name}:{self.accelerator_count}"


class Catalog:
    """Rows per cloud, read on first use (a plan for ``cloud: aws`` never parses GCP's file)."""

    def __init__(self, source: str, loader: Callable[[str], list[CatalogRow]],
                 clouds: Iterable[str] = SUPPORTED_CLOUDS,
                 snapshot_date: str | None = None) -> None:
        self.source = source
        self.snapshot_date = snapshot_date
        self.clouds = tuple(clouds)
        self._loader = loader
        self._rows: dict[str, list[CatalogRow]] = {}
        #: Clouds priced from the bundled snapshot because the folder lacks their file.
        self.fallback_clouds: tuple[str, ...] = ()

    def rows(self, cloud: str) -> list[CatalogRow]:
        if cloud not in self.clouds:
            return []
        if cloud not in self._rows:
            self._rows[cloud] = self._loader(cloud)
        return self._rows[cloud]

    def all_rows(self) -> list[CatalogRow]:
        return [row for cloud in self.clouds for row in self.rows(cloud)]

    @classmethod
    def from_rows(cls, rows: Iterable[CatalogRow], source: str = "rows",
                  snapshot_date: str | None = None) -> Catalog:
        by_cloud: dict[str, list[CatalogRow]] = defaultdict(list)
        for row in rows:
            by_cloud[row.cloud].append(row)
        return cls(source, lambda c: by_cloud.get(c, []), tuple(by_cloud), snapshot_date)

    def __repr__(self) -> str:
        return f"Catalog({self.source!r})"


def _num(text: str | None) -> float | None:
    try:
        value = float(text or "")
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _cell(raw: dict[str | None, str | None], key: str) -> str:
    return (raw.get(key) or "").strip()


def read_vms(path: Path, cloud: str) -> list[CatalogRow]:
    """Parse one ``vms.csv``; duplicates dropped, upstream order kept."""
    rows: list[CatalogRow] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for raw in csv.DictReader(fh):
            raw = {(k or "").strip(): v for k, v in raw.items()}
            name = _cell(raw, "AcceleratorName") or None
            count = int(_num(_cell(raw, "AcceleratorCount")) or 0) if name else 0
            rows.append(CatalogRow(
                cloud=cloud,
                region=_cell(raw, "Region"),
                zone=_cell(raw, "AvailabilityZone") or None,
                instance_type=_cell(raw, "InstanceType"),
                accelerator_name=name,
                accelerator_count=count,
                vcpus=_num(_cell(raw, "vCPUs")),
                memory_gb=_num(_cell(raw, "MemoryGiB")),
                price=_num(_cell(raw, "Price")),
                spot_price=_num(_cell(raw, "SpotPrice")),
            ))
    rows = [r for r in dict.fromkeys(rows) if r.region]
    return _gcp_nodes(rows) if cloud == "gcp" else [r for r in rows if r.instance_type]


def _n1_fits(host: CatalogRow, name: str, count: int) -> bool:
    if not host.instance_type.startswith(_N1_FAMILIES):
        return False
    if host.vcpus is None or host.memory_gb is None:
        return False
    floor = _N1_MIN_CPUS.get(name, _N1_DEFAULT_CPUS).get(count)
    if floor is None or host.vcpus < floor or host.memory_gb < 4 * floor:
        return False
    cap = _N1_MAX.get(name, {}).get(count)
    return cap is None or (host.vcpus <= cap[0] and host.memory_gb <= cap[1])


def _gcp_nodes(rows: list[CatalogRow]) -> list[CatalogRow]:
    """GCP rows as launchable nodes: CPU hosts, TPU VMs, and host + GPU combinations."""
    hosts: dict[tuple[str, str | None], list[CatalogRow]] = defaultdict(list)
    for r in rows:
        if r.instance_type and not r.accelerator_name:
            hosts[(r.region, r.zone)].append(r)
    out = [r for r in rows if r.instance_type and not r.accelerator_name
           and r.instance_type not in GCP_GPU_HOSTS]
    for acc in rows:
        if acc.instance_type or not acc.accelerator_name:
            continue
        name, count = acc.accelerator_name, acc.accelerator_count
        if name.lower().startswith("tpu-"):
            price, spot = (None if p == _TPU_PLACEHOLDER else p
                           for p in (acc.price, acc.spot_price))
            out.append(replace(acc, instance_type=TPU_HOST, vcpus=None, memory_gb=None,
                               price=price, spot_price=spot))
            continue
        fixed = _GCP_FIXED_HOSTS.get(name)
        for host in hosts.get((acc.region, acc.zone), []):
            if fixed:
                ok = host.instance_type in fixed.get(count, ())
            else:
                ok = _n1_fits(host, name, count)
            if not ok:
                continue
            out.append(replace(
                acc, instance_type=host.instance_type, vcpus=host.vcpus, memory_gb=host.memory_gb,
                price=_add(acc.price, host.price), spot_price=_add(acc.spot_price, host.spot_price),
            ))
    return out


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a + b, 6)
