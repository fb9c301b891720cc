from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture
def standin_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An executable that the local provider runs instead of ``python``: it ignores
    ``-u -m optjob.steps run DIR`` and runs the stand-in workload."""
    exe = tmp_path / "standin-python"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "standin.py"}\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("STANDIN_ROOT", os.pathsep.join(sys.path))
    return str(exe)
