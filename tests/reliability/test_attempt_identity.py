"""An attempt's processes are known by more than a pid, and an attempt is on record before it can run.

- A pid is reused once its process has gone: ``optjob down`` (and teardown, stop, poll) must never
  take an unrelated process that got the old pid for the workload. The local provider tags every
  process of an attempt (OPTJOB_ATTEMPT_ID in its environment) and records the wrapper's start
  time; after the exit file exists it signals nothing but tagged processes.
- A manager killed after starting the workload and before saving its handle must not leave an
  untracked workload: the attempt's identity is written to the job folder before the process
  starts, so ``status``/``apply``/``down`` adopt it; and the job folder's lock, held by the running
  attempt, refuses a second attempt beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from optjob.manager.store import Store
from optjob.providers.base import AttemptState, Handle, LaunchRequest
from optjob.providers.local import LocalProvider, proc_stat
from optjob.specs import loads_spec
from optjob.specs.errors import ProviderError
from reliability_harness import Cli, log_events, make_standin, pgid_alive, standin_spec, wait_for

SPEC = loads_spec(standin_spec())


def spec_file(tmp_path: Path, **kw: str) -> str:
    f = tmp_path / "s.yaml"
    f.write_text(standin_spec(**kw))
    return str(f)


def attempt_log(home: Path, n: int = 1) -> Path:
    return home / "jobs" / "tiny" / "logs" / f"attempt-{n}.log"


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process in a session of its own (its pid is its process group id): what a
    reused pid of a finished workload would name."""
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def impersonate(handle: dict, pid: int) -> dict:
    """The handle as it reads once the workload's pid (and group id) belong to process ``pid``."""
    return {**handle, "data": {**handle["data"], "pid": pid, "pgid": pid}}


# ---- 1. a reused pid is not the workload -----------------------------------------------------------


def test_down_after_success_spares_a_process_that_reused_the_workload_pid(
        tmp_path: Path, standin_cli: Cli, home: Path, bystander: subprocess.Popen[bytes]):
    spec = spec_file(tmp_path, extra="teardown: never\n")
    done = standin_cli.run("apply", spec, "--local", "--yes", "--json", STANDIN_STEPS="2")
    assert done.returncode == 0, done.stderr
    store = Store(home / "state.db")
    (attempt,) = store.attempts("tiny")
    assert (attempt.status, attempt.exit_code, attempt.released) == ("succeeded", 0, 0)  # teardown: never
    store.close()
    con = sqlite3.connect(home / "state.db")
    con.execute("UPDATE attempts SET handle_json = ?", (json.dumps(impersonate(attempt.handle or {}, bystander.pid)),))
    con.commit()
    con.close()

    down = standin_cli.run("down", "tiny")
    assert down.returncode == 0, down.stderr
    assert "resources released" in down.stdout
    assert bystander.poll() is None, "optjob down killed an unrelated process that had the workload's old pid"
    assert Store(home / "state.db").attempts("tiny")[0].released == 1


def test_an_unrecorded_end_with_a_reused_pid_reads_as_lost_and_teardown_spares_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bystander: subprocess.Popen[bytes]):
    """No exit file (the machine lost it) and the pid taken by someone else: the attempt is gone,
    not running, and teardown touches nothing."""
    monkeypatch.setenv("STANDIN_STEPS", "1")
    provider = LocalProvider(python=make_standin(tmp_path))
    handle = provider.launch(LaunchRequest(spec=SPEC, job_dir=tmp_path / "job", attempt=1))
    exit_file = tmp_path / "job" / "logs" / "attempt-1.exit"
    wait_for(exit_file.exists, what="the stand-in to finish")
    wait_for(lambda: not pgid_alive(handle.data["pgid"]), what="its group to go")
    exit_file.unlink()
    (tmp_path / "job" / "logs" / "attempt-1.exit.tmp").unlink(missing_ok=True)
    reused = Handle.from_json(impersonate(handle.to_json(), bystander.pid))
    poll = provider.poll(reused)
    assert poll.state == AttemptState.LOST, poll
    provider.stop(reused)
    provider.teardown(reused)
    assert bystander.poll() is None


def test_the_workload_carries_its_attempt_tag_and_start_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STANDIN_STEPS", "100000")
    provider = LocalProvider(python=make_standin(tmp_path))
    handle = provider.launch(LaunchRequest(spec=SPEC, job_dir=tmp_path / "job", attempt=1))
    try:
        wait_for(lambda: log_events(tmp_path / "job" / "logs" / "attempt-1.log"), what="the stand-in")
        stat = proc_stat(handle.data["pid"])
        assert stat is not None and stat[2] == handle.data["start_ticks"]
        tag = f"OPTJOB_ATTEMPT_ID={handle.data['tag']}".encode()
        members = provider._members(handle)
        assert len(members) >= 2  # the wrapper and the workload
        for pid in members:
            assert tag in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    finally:
        provider.teardown(handle)
    assert not pgid_alive(handle.data["pgid"])


# ---- 3. killed between starting the workload and saving its handle --------------------------------


def dying_driver(tmp_path: Path, standin: str) -> Path:
    """``optjob`` whose manager is SIGKILLed right after the local provider started the workload,
    before the controller can record its handle."""
    driver = tmp_path / "dying_driver.py"
    driver.write_text(
        "import os, signal, sys\nimport optjob.manager.commands.common as c\n"
        "from optjob.providers.local import LocalProvider\n"
        "class Dying(LocalProvider):\n"
        "    def launch(self, request):\n"
        "        super().launch(request)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"c.provider_for = lambda name: Dying(python={standin!r})\n"
        "from optjob.manager.cli import main\nmain(sys.argv[1:])\n")
    return driver


def crash_inside_launch(tmp_path: Path, cli: Cli, spec: str, home: Path, **env: str) -> list[int]:
    driver = dying_driver(tmp_path, cli.env["OPTJOB_TEST_STANDIN"])
    proc = subprocess.run([sys.executable, str(driver), "apply", spec, "--local", "--yes"], capture_output=True,
                          text=True, env={**cli.env, **env}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    wait_for(lambda: any(e["event"] == "progress" for e in log_events(attempt_log(home))), what="progress")
    (attempt,) = Store(home / "state.db").attempts("tiny")
    assert attempt.handle is None and attempt.status == "launching"  # the crash this is about
    pids = workload_pids(home)
    assert pids, "the workload runs on, untracked"
    return pids


def workload_pids(home: Path) -> list[int]:
    """The live processes started for the job ``tiny`` under ``home`` (found by their environment,
    independently of anything optjob recorded)."""
    marks = {f"OPTJOB_HOME={home}".encode(), b"OPTJOB_JOB=tiny"}
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        stat = proc_stat(int(entry.name))
        if marks <= environ and stat is not None and stat[0] != "Z":
            out.append(int(entry.name))
    return out


@pytest.fixture
def strays(home: Path) -> Iterator[None]:
    """Kill (by pid) whatever of the job still runs after the test: the crash leaves a workload no
    state.db row names, which the harness's cleanup would not find."""
    yield
    for pid in workload_pids(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_launch_the_manager_died_in_is_adopted_followed_and_billed(tmp_path: Path, standin_cli: Cli,
                                                                  home: Path, strays: None):
    spec = spec_file(tmp_path, resources="{cloud: local, hourly_usd: 36}")
    crash_inside_launch(tmp_path, standin_cli, spec, home, STANDIN_STEPS="80", STANDIN_SLEEP="0.05")
    status = standin_cli.json("status", "tiny")
    assert isinstance(status, dict)
    assert status["status"] == "running", status  # not "stopped (cancelled)" while it runs
    assert status["spent_usd"] > 0  # billed from its launch
    again = standin_cli.run("apply", spec, "--local", "--yes", STANDIN_STEPS="80")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already running" in again.stdout and "tiny: succeeded" in again.stdout
    store = Store(home / "state.db")
    (attempt,) = store.attempts("tiny")  # followed: no second workload in the same job folder
    assert (attempt.status, attempt.exit_code, attempt.released) == ("succeeded", 0, 1)
    assert len(store.events("tiny", kinds=("progress",))) == 80
    assert store.spend("tiny") > 0
    assert not workload_pids(home)


def test_down_after_a_crash_inside_launch_stops_the_workload(tmp_path: Path, standin_cli: Cli, home: Path,
                                                            strays: None):
    spec = spec_file(tmp_path)
    crash_inside_launch(tmp_path, standin_cli, spec, home, STANDIN_STEPS="100000")
    down = standin_cli.run("down", "tiny")  # before any `status`: nothing was recorded but the attempt
    assert down.returncode == 0, down.stderr
    assert "resources released" in down.stdout
    assert not workload_pids(home), "`down` said released while the workload ran on"
    store = Store(home / "state.db")
    (attempt,) = store.attempts("tiny")
    assert attempt.released == 1 and attempt.handle is not None
    job = store.job("tiny")
    assert job is not None and (job.status.value, job.reason.value if job.reason else None) == ("stopped",
                                                                                                "cancelled")


def test_adopt_finds_an_attempt_by_its_tag_when_no_pid_was_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STANDIN_STEPS", "100000")
    provider = LocalProvider(python=make_standin(tmp_path))
    job_dir = tmp_path / "job"
    assert provider.adopt(job_dir, 1) is None  # nothing launched
    handle = provider.launch(LaunchRequest(spec=SPEC, job_dir=job_dir, attempt=1))
    try:
        # As if the manager died between starting the process and writing its pid down.
        record = job_dir / "logs" / "attempt-1.handle.json"
        saved = json.loads(record.read_text())
        record.write_text(json.dumps({**saved, "data": {**saved["data"], "pid": None, "pgid": None,
                                                        "start_ticks": None}}))
        adopted = provider.adopt(job_dir, 1)
        assert adopted is not None
        assert (adopted.data["pid"], adopted.data["pgid"], adopted.data["tag"]) == (
            handle.data["pid"], handle.data["pgid"], handle.data["tag"])
        assert adopted.data["start_ticks"] == handle.data["start_ticks"]
        assert provider.poll(adopted).state == AttemptState.RUNNING
    finally:
        provider.teardown(handle)
    assert provider.poll(handle).state.is_terminal()


def test_a_second_attempt_is_never_started_beside_a_running_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STANDIN_STEPS", "100000")
    provider = LocalProvider(python=make_standin(tmp_path))
    job_dir = tmp_path / "job"
    first = provider.launch(LaunchRequest(spec=SPEC, job_dir=job_dir, attempt=1))
    try:
        wait_for(lambda: log_events(job_dir / "logs" / "attempt-1.log"), what="attempt 1")
        with pytest.raises(ProviderError, match="attempt 1 of this job still runs") as err:
            provider.launch(LaunchRequest(spec=SPEC, job_dir=job_dir, attempt=2))
        assert "\n" not in str(err.value)
        assert not (job_dir / "logs" / "attempt-2.handle.json").exists()
        assert provider.poll(first).state == AttemptState.RUNNING
    finally:
        provider.teardown(first)
    # Once it has ended, the next attempt starts (and the lock passes to it).
    monkeypatch.setenv("STANDIN_STEPS", "1")
    second = provider.launch(LaunchRequest(spec=SPEC, job_dir=job_dir, attempt=2))
    wait_for(lambda: provider.poll(second).state.is_terminal(), what="attempt 2")
    assert provider.poll(second).state == AttemptState.SUCCEEDED
