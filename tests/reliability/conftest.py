"""Fixtures for the reliability tests: an isolated OPTJOB_HOME, the CLI as a subprocess
(real workload or the stand-in), and tiny specs."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_harness import STANDIN, Cli, make_standin, pgid_alive


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def cli(home: Path) -> Cli:
    """The CLI with the real workload."""
    return Cli(home, {**os.environ, "OPTJOB_HOME": str(home)})


@pytest.fixture
def standin_cli(home: Path, tmp_path: Path) -> Cli:
    """The CLI whose local provider runs the stand-in workload."""
    return Cli(home, {**os.environ, "OPTJOB_HOME": str(home), "OPTJOB_TEST_STANDIN": make_standin(tmp_path),
                      "STANDIN_ROOT": os.pathsep.join(sys.path)})


@pytest.fixture(autouse=True)
def _no_stray_workloads(tmp_path: Path) -> Iterator[None]:
    """After each test: SIGKILL any workload process group of an attempt recorded in a state.db under
    its tmp_path that is still alive (only when a test failed half way; passing tests leave none)."""
    yield
    for db in tmp_path.rglob("state.db"):
        con = sqlite3.connect(db)
        try:
            rows = con.execute("SELECT handle_json FROM attempts WHERE handle_json IS NOT NULL "
                               "AND ended_at IS NULL").fetchall()
        except sqlite3.DatabaseError:
            rows = []
        finally:
            con.close()
        for (handle,) in rows:
            pgid = (json.loads(handle).get("data") or {}).get("pgid")
            if isinstance(pgid, int) and pgid > 1 and _ours(pgid, tmp_path):
                os.killpg(pgid, signal.SIGKILL)


def _ours(pgid: int, tmp_path: Path) -> bool:
    """The process group is alive and runs a workload (or stand-in) this test started."""
    if not pgid_alive(pgid):
        return False
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True, check=False).stdout
    for pid in out.split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(tmp_path) in cmdline or str(STANDIN) in cmdline:
            return True
    return False


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test started: killed (by pid) if the test leaves them running."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
