"""Where prices come from, in order: ``$OPTJOB_CATALOG_DIR``; SkyPilot's own ``~/.sky/catalogs/v8``;
the cache ``optjob prices refresh`` wrote (``$OPTJOB_HOME/prices.csv``); the snapshot bundled with
optjob. ``current_catalog`` is that choice; ``refresh`` rebuilds the cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .. import paths
from .catalog import SUPPORTED_CLOUDS, Catalog, CatalogRow, read_vms
from .snapshot import build_snapshot, download_catalog, load_snapshot, write_snapshot


def catalog_dir() -> Path | None:
    """``$OPTJOB_CATALOG_DIR``, else SkyPilot's ``~/.sky/catalogs/v8`` if present, else None
    (meaning: use the snapshot bundled with optjob)."""
    env = os.environ.get("OPTJOB_CATALOG_DIR")
    if env:
        return Path(env).expanduser()
    sky = Path.home() / ".sky" / "catalogs" / "v8"
    return sky if sky.is_dir() else None


def load_catalog(path: str | os.PathLike[str] | None = None) -> Catalog:
    """A catalog folder (``.../v8``), a snapshot CSV file, or None for :func:`catalog_dir`.

    SkyPilot downloads a cloud's file the first time that cloud is used, so a folder may lack some
    clouds: those are priced from the bundled snapshot (``Catalog.fallback_clouds`` lists them).
    """

    where = Path(path).expanduser() if path is not None else catalog_dir()
    if where is None or where.is_file():
        snap, date = load_snapshot(where)
        return Catalog.from_rows(snap, source=str(where or "bundled snapshot"), snapshot_date=date)
    if not where.is_dir():
        raise FileNotFoundError(f"no SkyPilot catalog folder at {where}")
    bundled: list[Catalog] = []

    def read(cloud: str) -> list[CatalogRow]:
        if (where / cloud / "vms.csv").is_file():
            return read_vms(where / cloud / "vms.csv", cloud)
        if not bundled:
            rows, day = load_snapshot()
            bundled.append(Catalog.from_rows(rows, "bundled snapshot", day))
        return bundled[0].rows(cloud)

    cat = Catalog(str(where), read, SUPPORTED_CLOUDS)
    cat.fallback_clouds = tuple(c for c in SUPPORTED_CLOUDS
                                if not (where / c / "vms.csv").is_file())
    return cat


def refresh(dest: str | os.PathLike[str], source_dir: str | os.PathLike[str] | None = None,
            *, download: bool = True) -> Path:
    """``optjob prices refresh``: rebuild a snapshot at ``dest`` from ``source_dir``, else from
    :func:`catalog_dir`, else (``download``) from SkyPilot's catalog on GitHub."""
    source = Path(source_dir) if source_dir is not None else catalog_dir()
    if source is not None:
        return write_snapshot(build_snapshot(source), dest)
    if not download:
        raise FileNotFoundError("no SkyPilot catalog folder (set OPTJOB_CATALOG_DIR)")
    with tempfile.TemporaryDirectory(prefix="optjob-catalog-") as tmp:
        return write_snapshot(build_snapshot(download_catalog(tmp)), dest)


def cached_prices() -> Path:
    """Where ``optjob prices refresh`` writes its snapshot (used when no SkyPilot catalog is present)."""
    return paths.home() / "prices.csv"


def current_catalog() -> Catalog:
    if catalog_dir() is None and cached_prices().exists():
        return load_catalog(cached_prices())
    return load_catalog()
