"""What the state store says stays true when things go wrong around it.

- A run that fails before it launches (the job folder cannot be written; the manager killed
  between the claim and the launch) leaves a finished job's record as it was: nothing changes it
  until a new run really starts (its first attempt). Applying the job folder's own spec.yaml works.
- A full disk is "disk full", where, and how much room is wanted — one line, never an internal
  error; and the exit status of a workload that ended on a full disk is still recorded (its bytes
  were reserved at launch), so it never reads as a preemption.
- An empty state.db is not a new database: optjob refuses it, naming the file, instead of
  showing no history.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from optjob.manager import paths
from optjob.manager.controller import Controller
from optjob.manager.planner import make_plan
from optjob.manager.reconcile import reconcile_orphaned
from optjob.manager.store import Store
from optjob.providers.base import AttemptState, Handle, LaunchRequest
from optjob.providers.local import LocalProvider
from optjob.specs import loads_spec
from optjob.specs.errors import StateError
from reliability_harness import Cli, make_standin, pgid_alive, standin_spec, wait_for


def spec_file(tmp_path: Path, **kw: str) -> str:
    f = tmp_path / "s.yaml"
    f.write_text(standin_spec(**kw))
    return str(f)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    return lines[0]


def finished(cli: Cli, spec: str) -> dict:
    done = cli.run("apply", spec, "--local", "--yes", "--json", STANDIN_STEPS="2")
    assert done.returncode == 0, done.stderr
    row = cli.json("status", "tiny")
    assert isinstance(row, dict) and (row["status"], row["run"]) == ("succeeded", 1)
    return row


# ---- 5. nothing changes a finished job until a new run starts -------------------------------------


def test_applying_the_job_folders_own_spec_runs_again(tmp_path: Path, standin_cli: Cli, home: Path):
    finished(standin_cli, spec_file(tmp_path))
    own = home / "jobs" / "tiny" / "spec.yaml"
    again = standin_cli.run("apply", str(own), "--local", "--yes", "--json", STANDIN_STEPS="2")
    assert again.returncode == 0, again.stderr
    row = standin_cli.json("status", "tiny")
    assert isinstance(row, dict) and (row["status"], row["run"]) == ("succeeded", 2)
    assert own.read_text() == Path(tmp_path / "s.yaml").read_text()


def test_a_job_folder_that_cannot_be_written_leaves_the_finished_job_as_it_was(
        tmp_path: Path, standin_cli: Cli, home: Path):
    spec = spec_file(tmp_path)
    before = finished(standin_cli, spec)
    job_dir = home / "jobs" / "tiny"
    # An OSError writing the folder, as a read-only one gives (root ignores modes: a directory where
    # the spec's copy goes fails the same way, for everyone).
    (job_dir / "spec.yaml").unlink()
    (job_dir / "spec.yaml").mkdir()
    proc = standin_cli.run("apply", spec, "--local", "--yes", STANDIN_STEPS="2")
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert f"cannot write the job folder {job_dir}" in line
    after = standin_cli.json("status", "tiny")
    assert isinstance(after, dict)
    for key in ("status", "reason", "run", "attempts", "message", "spent_usd"):
        assert after[key] == before[key], key
    store = Store(home / "state.db")
    job = store.job("tiny")
    assert job is not None and job.owner_pid is None and job.previous_json is None


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_manager_killed_between_claim_and_launch_leaves_the_finished_job_as_it_was(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STANDIN_STEPS", "2")
    provider = LocalProvider(python=make_standin(tmp_path))
    spec = loads_spec(standin_spec())
    store = Store(paths.db_path())
    out = Controller(store, provider, tick_s=0.05).apply(make_plan(spec), spec)
    assert out.status.value == "succeeded"
    before = store.job("tiny")
    assert before is not None
    # A second apply claims the job (a new run, another spec), then dies before its first attempt.
    other = loads_spec(standin_spec(extra="teardown: never\n"))
    job, attach = store.claim_job("tiny", provider="local", job_dir=before.job_dir, spec_path=None,
                                  spec_json=other.model_dump_json(), plan_json=make_plan(other).dumps(),
                                  owner_alive=lambda j: False)
    assert not attach and job.run == 2 and job.status.value == "pending"
    store.update_job("tiny", owner_pid=dead_pid())
    after = reconcile_orphaned(store, provider, store.job("tiny"))  # type: ignore[arg-type]
    assert (after.status, after.reason, after.run, after.message) == (before.status, before.reason, 1, None)
    assert (after.spec_json, after.plan_json, after.ended_at) == (before.spec_json, before.plan_json, before.ended_at)
    assert after.owner_pid is None and after.previous_json is None
    # And once a run does start, the old record is gone for good.
    job, _ = store.claim_job("tiny", provider="local", job_dir=before.job_dir, spec_path=None,
                             spec_json=other.model_dump_json(), plan_json=make_plan(other).dumps(),
                             owner_alive=lambda j: False)
    store.add_attempt("tiny", run=job.run, provider="local", hourly_usd=0, nodes=1, spot=False)
    assert not store.restore_previous_run("tiny")
    current = store.job("tiny")
    assert current is not None and current.run == 2 and current.spec_json == other.model_dump_json()


# ---- 6. a full disk --------------------------------------------------------------------------------


def test_a_full_disk_under_the_state_store_is_one_line_and_the_record_catches_up(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """SQLite's own "database or disk is full" (SQLITE_FULL), made by capping the database's pages
    once the workload runs: the manager stops with a StateError that says disk full and names the
    file; the workload runs on, and once there is room `status` records how it really ended."""
    monkeypatch.setenv("STANDIN_STEPS", "300")
    monkeypatch.setenv("STANDIN_SLEEP", "0.01")
    provider = LocalProvider(python=make_standin(tmp_path))
    spec = loads_spec(standin_spec())
    store = Store(paths.db_path())

    def fill(handle: Handle, attempt: object) -> None:
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count = {pages}")  # this connection: no room to grow

    with pytest.raises(StateError) as err:
        Controller(store, provider, tick_s=0.05, on_launch=fill).apply(make_plan(spec), spec)
    message = str(err.value)
    assert message.startswith("disk full: cannot write ") and str(paths.db_path()) in message
    assert "needs at least" in message and "\n" not in message
    wait_for((home / "jobs" / "tiny" / "logs" / "attempt-1.exit").exists, what="the workload to end on its own")
    fresh = Store(paths.db_path())
    fresh.update_job("tiny", owner_pid=None)  # as after that manager exited
    job = reconcile_orphaned(fresh, provider, fresh.job("tiny"))  # type: ignore[arg-type]
    assert (job.status.value, job.reason.value if job.reason else None) == ("succeeded", "succeeded")
    (attempt,) = fresh.attempts("tiny")
    assert (attempt.status, attempt.exit_code) == ("succeeded", 0)


def test_an_exit_status_that_could_not_be_moved_into_place_is_still_the_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The wrapper records the exit status in bytes reserved at launch, then renames them into place;
    when the rename fails (the folder could not be written), the status is read where it is."""
    monkeypatch.setenv("STANDIN_STEPS", "1")
    monkeypatch.setenv("STANDIN_RC", "3")
    provider = LocalProvider(python=make_standin(tmp_path))
    job_dir = tmp_path / "job"
    handle = provider.launch(LaunchRequest(spec=loads_spec(standin_spec()), job_dir=job_dir, attempt=1))
    exit_file = job_dir / "logs" / "attempt-1.exit"
    wait_for(exit_file.exists, what="the workload to end")
    wait_for(lambda: not pgid_alive(handle.data["pgid"]), what="its group to go")
    exit_file.rename(exit_file.with_name("attempt-1.exit.tmp"))  # as if the rename had failed
    poll = provider.poll(handle)
    assert (poll.state, poll.exit_code) == (AttemptState.FAILED, 3), poll
    assert "attempt-1.exit.tmp" in poll.detail


def test_the_exit_record_is_reserved_before_the_workload_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STANDIN_STEPS", "100000")
    provider = LocalProvider(python=make_standin(tmp_path))
    job_dir = tmp_path / "job"
    handle = provider.launch(LaunchRequest(spec=loads_spec(standin_spec()), job_dir=job_dir, attempt=1))
    try:
        tmp = job_dir / "logs" / "attempt-1.exit.tmp"
        assert tmp.stat().st_size == 16 and tmp.read_text().strip() == "-"
        assert provider.poll(handle).state == AttemptState.RUNNING
    finally:
        provider.teardown(handle)
    assert provider.poll(handle).state == AttemptState.STOPPED  # recorded in place, then renamed
    assert not tmp.exists()


@pytest.mark.skipif(os.environ.get("OPTJOB_TEST_TMPFS") != "1",
                    reason="opt-in (OPTJOB_TEST_TMPFS=1): mounts a small tmpfs, needs root")
def test_a_really_full_disk_is_recorded_as_such_not_as_a_preemption(tmp_path: Path, standin_cli: Cli):
    """OPTJOB_HOME on a 4 MiB tmpfs, filled while the job runs: the manager says disk full in one
    line, the workload's exit status is still written, and `status` (once there is room) says the
    job failed, not that it was preempted."""
    fs = tmp_path / "fs"
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(fs)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        home = fs / "home"
        cli = Cli(home, {**standin_cli.env, "OPTJOB_HOME": str(home)})
        manager = cli.popen("apply", spec_file(tmp_path), "--local", "--yes", STANDIN_STEPS="100000",
                            STANDIN_SLEEP="0.01")
        log = home / "jobs" / "tiny" / "logs" / "attempt-1.log"
        wait_for(lambda: log.exists() and log.stat().st_size > 1000, what="the job to run")
        filler = fs / "filler"
        with open(filler, "wb") as f:  # every free block, until ENOSPC
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        out, err = manager.communicate(timeout=120)
        assert manager.returncode == 1, out + err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: disk full: cannot write ") and "state.db" in lines[0]
        exit_file = log.with_suffix(".exit")
        wait_for(exit_file.exists, what="the exit status, written on a full disk")
        filler.unlink()
        row = cli.json("status", "tiny")
        assert isinstance(row, dict) and row["status"] == "failed" and row["reason"] == "failed", row
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


# ---- 7. an empty state.db --------------------------------------------------------------------------


def test_an_empty_state_db_is_refused_not_started_afresh(tmp_path: Path, standin_cli: Cli, home: Path):
    spec = spec_file(tmp_path)
    finished(standin_cli, spec)
    (home / "state.db").write_bytes(b"")  # truncated: a full disk, a bad copy, a crash of some tool
    for wal in (home / "state.db-wal", home / "state.db-shm"):
        wal.unlink(missing_ok=True)
    for args in (("list",), ("status", "tiny"), ("apply", spec, "--local", "--yes")):
        proc = standin_cli.run(*args, STANDIN_STEPS="2")
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        line = one_error_line(proc)
        assert f"{home / 'state.db'} is an empty file" in line and "move it aside" in line
    assert (home / "state.db").stat().st_size == 0  # left for the user to restore
    with pytest.raises(StateError, match="empty file"):
        Store(home / "state.db")


def test_a_new_state_db_is_never_an_empty_file_even_when_many_open_it_at_once(tmp_path: Path):
    db = tmp_path / "home" / "state.db"
    errors: list[BaseException] = []
    sizes: list[int] = []

    def open_it() -> None:
        try:
            store = Store(db)
            sizes.append(db.stat().st_size)
            store.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sizes and min(sizes) > 0
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert json.loads(json.dumps(con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()))
    con.close()
    assert [p.name for p in db.parent.iterdir() if p.name.endswith(".new")] == []
