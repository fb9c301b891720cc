"""The SkyPilot catalog subset the repository carries (tests/data/skypilot-catalog/v8, a verbatim
copy of the workplace subset; see its README for the upstream commits)."""

from __future__ import annotations

from pathlib import Path

import pytest

CATALOG = Path(__file__).resolve().parents[2] / "data" / "skypilot-catalog" / "v8"


@pytest.fixture(scope="module")
def v8() -> Path:
    return CATALOG
