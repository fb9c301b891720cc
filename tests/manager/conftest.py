from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

STANDIN = Path(__file__).resolve().parents[1] / "providers" / "standin.py"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def standin_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An interpreter stand-in for the local provider: runs tests/providers/standin.py (see there)."""
    exe = tmp_path / "standin-python"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN}\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("STANDIN_ROOT", os.pathsep.join(sys.path))
    return str(exe)
