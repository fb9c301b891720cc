"""The compact price snapshot bundled with optjob (``manager/data/prices.csv``).

Used when neither ``$OPTJOB_CATALOG_DIR`` nor SkyPilot's ``~/.sky/catalogs/v8`` exists, so that
``optjob plan`` prices a spec offline on a fresh machine. One row per (cloud, region, instance type,
accelerator): the cheapest on-demand and the cheapest spot price over that region's zones, with
GCP GPU rows already combined with their host VM (see ``catalog.py``).

Regenerate the shipped file with ``sources.refresh(BUNDLED, "/path/to/catalogs/v8")``.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from optjob.steps.layout import write_bytes_atomic

from .catalog import SUPPORTED_CLOUDS, CatalogRow, read_vms

COLUMNS = ("cloud", "region", "instance_type", "accelerator", "count", "vcpus", "memory_gb",
           "ondemand_usd", "spot_usd", "snapshot_date")
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "prices.csv"
CATALOG_URL = "https://raw.githubusercontent.com/skypilot-org/skypilot-catalog/master/catalogs/v8"


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def compact(rows: Iterable[CatalogRow], snapshot_date: str) -> list[dict[str, str]]:
    """Min on-demand and min spot price per (cloud, region, instance_type, accelerator)."""
    Price = tuple[float | None, float | None, float | None, float | None]
    best: dict[tuple[str, str, str, str | None, int], Price] = {}
    for r in rows:
        if r.price is None and r.spot_price is None:
            continue
        key = (r.cloud, r.region, r.instance_type, r.accelerator_name, r.accelerator_count)
        cur = best.get(key)
        if cur is None:
            best[key] = (r.vcpus, r.memory_gb, r.price, r.spot_price)
        else:
            best[key] = (cur[0], cur[1], _min(cur[2], r.price), _min(cur[3], r.spot_price))
    out = []
    for (cloud, region, itype, acc, count), (vcpus, mem, price, spot) in sorted(
        best.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3] or "", kv[0][4], kv[0][1])
    ):
        out.append({
            "cloud": cloud, "region": region, "instance_type": itype, "accelerator": acc or "",
            "count": str(count) if acc else "", "vcpus": _fmt(vcpus), "memory_gb": _fmt(mem),
            "ondemand_usd": _fmt(price), "spot_usd": _fmt(spot),
            "snapshot_date": snapshot_date,
        })
    return out


def build_snapshot(catalog_dir: str | os.PathLike[str],
                   snapshot_date: str | None = None) -> list[dict[str, str]]:
    """Snapshot rows (dicts keyed by :data:`COLUMNS`) from a SkyPilot ``catalogs/v8`` folder."""
    root = Path(catalog_dir)
    rows: list[CatalogRow] = []
    for cloud in SUPPORTED_CLOUDS:
        path = root / cloud / "vms.csv"
        if path.is_file():
            rows.extend(read_vms(path, cloud))
    if not rows:
        raise FileNotFoundError(f"no <cloud>/vms.csv under {root}")
    return compact(rows, snapshot_date or dt.date.today().isoformat())


def write_snapshot(rows: list[dict[str, str]], dest: str | os.PathLike[str]) -> Path:
    """Write atomically (a half-written price file would misprice every plan)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    written = write_bytes_atomic(Path(dest), text.getvalue().encode("utf-8"))
    written.chmod(0o644)
    return written


def download_catalog(dest_dir: str | os.PathLike[str], timeout: float = 60.0) -> Path:
    """Fetch each supported cloud's ``vms.csv`` from SkyPilot's public catalog repository."""
    root = Path(dest_dir)
    for cloud in SUPPORTED_CLOUDS:
        (root / cloud).mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(f"{CATALOG_URL}/{cloud}/vms.csv", timeout=timeout) as resp:
            (root / cloud / "vms.csv").write_bytes(resp.read())
    return root


def load_snapshot(
    path: str | os.PathLike[str] | None = None,
) -> tuple[list[CatalogRow], str | None]:
    """Rows of a snapshot file (default: the bundled one) and its snapshot date."""
    rows: list[CatalogRow] = []
    dates: set[str] = set()
    with open(path or BUNDLED, newline="", encoding="utf-8") as fh:
        for raw in csv.DictReader(fh):
            acc = raw["accelerator"].strip() or None
            rows.append(CatalogRow(
                cloud=raw["cloud"], region=raw["region"], zone=None,
                instance_type=raw["instance_type"],
                accelerator_name=acc, accelerator_count=int(raw["count"] or 0) if acc else 0,
                vcpus=_float(raw["vcpus"]), memory_gb=_float(raw["memory_gb"]),
                price=_float(raw["ondemand_usd"]), spot_price=_float(raw["spot_usd"]),
            ))
            if raw.get("snapshot_date"):
                dates.add(raw["snapshot_date"])
    return rows, max(dates) if dates else None


def _float(text: str | None) -> float | None:
    return float(text) if text and text.strip() else None

