"""The shared SkyPilot catalog subset beside the repository (CI and sessions have it)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def v8() -> Path:
    for base in (REPO.parent / "shared", REPO / "shared"):
        path = (base / "skypilot-catalog" / "v8").resolve()
        if path.is_dir():
            return path
    pytest.fail("shared/skypilot-catalog/v8 is not beside the repository (CI and sessions have it)")
