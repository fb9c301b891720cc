"""Where optjob keeps its state: ``OPTJOB_HOME`` (default ``~/.optjob``)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("OPTJOB_HOME") or Path.home() / ".optjob").expanduser()


def db_path() -> Path:
    return home() / "state.db"


def jobs_dir() -> Path:
    return home() / "jobs"


def job_dir(name: str) -> Path:
    return jobs_dir() / name


def dry_run_dir(name: str) -> Path:
    """The folder of a dry run (``apply --dry-run``): a root of its own, so a rehearsal never
    writes into a real job's folder, whatever the names."""
    return home() / "dry-runs" / name


def cache_dir() -> Path:
    return Path(os.environ.get("OPTJOB_CACHE") or home() / "cache").expanduser()
