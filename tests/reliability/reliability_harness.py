"""What the reliability tests share besides fixtures: the CLI as a subprocess, tiny specs, the
stand-in workload, polling. A module of its own, not ``conftest``: test directories run together
would each put a ``conftest`` on ``sys.path`` under the same name."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from optjob.providers.local import group_alive, proc_stat

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "driver.py"
STANDIN = HERE.parent / "providers" / "standin.py"

#: A tiny real pipeline: 2 layers, 64 wide, vocab 512, seq 32.
TINY = """\
name: {name}
model:
  init: {{family: llama, layers: 2, hidden: 64, heads: 2, intermediate: 128, vocab: 512}}
data: {{source: "builtin:python-docs", seq_len: 32, max_chars: 200000}}
steps:
{steps}
resources: {{cloud: local, hourly_usd: {hourly}}}
budget: {{max_usd: {max_usd}, max_hours: 1}}
teardown: {teardown}
"""


def tiny_spec(name: str = "tiny", steps: str = "  - train: {max_steps: 24, checkpoint_every: 6, log_every: 2}\n",
              hourly: float = 0.5, max_usd: float = 1.0, teardown: str = "always") -> str:
    return TINY.format(name=name, steps=steps, hourly=hourly, max_usd=max_usd, teardown=teardown)


def standin_spec(name: str = "tiny", extra: str = "", resources: str = "{cloud: local}", train: str = "{}") -> str:
    """A spec for the stand-in workload (its steps are not run: STANDIN_* variables say what it does)."""
    return f"name: {name}\nmodel: {{init: {{}}}}\nsteps: [{{train: {train}}}]\nresources: {resources}\n{extra}"


class Cli:
    """``optjob`` in a subprocess against one OPTJOB_HOME."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env

    def popen(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(DRIVER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, env={**self.env, **env})

    def run(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(DRIVER), *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, env={**self.env, **env}, timeout=timeout)

    def json(self, *args: str) -> object:
        proc = self.run(*args, "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout)


def make_standin(folder: Path) -> str:
    exe = folder / "standin-python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {STANDIN}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` (a bound, not a timing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def log_events(path: Path) -> list[dict[str, object]]:
    """The JSON events in a workload log (complete lines only)."""
    from optjob.steps.events import parse_event

    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    lines = text.splitlines(keepends=True)
    return [e for line in lines if line.endswith("\n") and (e := parse_event(line)) is not None]


def pgid_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs. A zombie does not: once the manager that
    started a wrapper shell is gone, the shell's exit is reaped by init, whenever init gets to it."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return group_alive(pgid)
    for entry in proc.iterdir():
        stat = proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None and stat[1] == pgid and stat[0] != "Z":
            return True
    return False
