"""The state store under concurrency and across versions: two applies of one name start one
job; readers see consistent rows while a job writes; several reconcilers (`status` in many
terminals after the manager died) never store an event or bill a second twice; an older
database migrates forward keeping its rows, atomically."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from optjob.manager import store_schema as schema
from optjob.manager.store import Store
from optjob.manager.store_schema import MIGRATIONS, SCHEMA_VERSION
from optjob.specs.errors import StateError
from optjob.steps.events import parse_event
from reliability_harness import Cli, standin_spec, wait_for


def spec_file(tmp_path: Path, resources: str = "{cloud: local}") -> str:
    f = tmp_path / "s.yaml"
    f.write_text(standin_spec(resources=resources))
    return str(f)


def test_two_applies_of_one_name_start_one_job(tmp_path: Path, standin_cli: Cli, home: Path):
    spec = spec_file(tmp_path)
    for trial in range(2):
        procs = [standin_cli.popen("apply", spec, "--local", "--yes", STANDIN_STEPS="60") for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        store = Store(home / "state.db")
        attempts = store.attempts("tiny", run=trial + 1)
        assert len(attempts) == 1, f"trial {trial}: {len(attempts)} attempts started"
        # The second one says who holds the job, then follows it to the end.
        holders = [o for o, _ in outs if "already running (pid" in o]
        assert len(holders) == 1, outs
        assert all("tiny: succeeded" in o for o, _ in outs)
        store.close()


def _snapshot_checker(db: Path, log: Path, stop: threading.Event, problems: list[str], reads: list[int]) -> None:
    """One reader: in a single read transaction, the job row, the attempt's log offset and the
    events must agree: exactly the events in the log's first log_offset bytes, the job's progress
    equal to the last progress event."""
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    con.execute("PRAGMA busy_timeout = 30000")
    while not stop.is_set():
        con.execute("BEGIN")
        try:
            attempt = con.execute("SELECT id, log_offset FROM attempts WHERE job_name = 'tiny'").fetchone()
            job = con.execute("SELECT progress_json FROM jobs WHERE name = 'tiny'").fetchone()
            events = [json.loads(r[0]) for r in con.execute(
                "SELECT payload FROM events WHERE job_name = 'tiny' ORDER BY id")]
        finally:
            con.execute("COMMIT")
        if attempt is None:
            time.sleep(0.01)
            continue
        with open(log, "rb") as f:
            prefix = f.read(attempt[1]).decode()
        expected = [e for e in map(parse_event, prefix.splitlines()) if e is not None]
        if [e["ts"] for e in events] != [e["ts"] for e in expected]:
            problems.append(f"{len(events)} events stored, {len(expected)} in the ingested bytes")
        progress = [e for e in events if e["event"] == "progress"]
        if progress and json.loads(job[0] or "{}").get("step") != progress[-1]["step"]:
            problems.append("job progress disagrees with the last progress event")
        reads.append(len(events))
        time.sleep(0.005)
    con.close()


def test_readers_see_consistent_rows_while_a_job_writes(tmp_path: Path, standin_cli: Cli, home: Path):
    spec = spec_file(tmp_path)
    apply = standin_cli.popen("apply", spec, "--local", "--yes", "--json", STANDIN_STEPS="120",
                              STANDIN_SLEEP="0.02")
    log = home / "jobs" / "tiny" / "logs" / "attempt-1.log"
    wait_for(lambda: (home / "state.db").exists() and log.exists(), what="the job to start")
    stop, problems, reads = threading.Event(), [], []
    threads = [threading.Thread(target=_snapshot_checker, args=(home / "state.db", log, stop, problems, reads))
               for _ in range(4)]
    for t in threads:
        t.start()
    # 20 concurrent `optjob status` processes while the job writes events.
    procs = [standin_cli.popen("status", "tiny", "--json") for _ in range(20)]
    results = [(p, *p.communicate(timeout=120)) for p in procs]
    out, err = apply.communicate(timeout=120)
    stop.set()
    for t in threads:
        t.join(60)
    assert apply.returncode == 0, out + err
    for p, stdout, stderr in results:
        assert p.returncode == 0, stderr
        row = json.loads(stdout)
        assert row["name"] == "tiny" and row["attempts"] == 1 and row["status"] in ("running", "succeeded")
        assert 0 <= (row["progress"].get("step") or 0) <= 120
    assert not problems, problems[:5]
    assert len(reads) > 10 and max(reads) == 123  # step_started + 120 progress + step_done + job_done


def test_many_status_on_an_orphaned_job_store_nothing_twice(tmp_path: Path, standin_cli: Cli, home: Path):
    """With no manager (--detach; or it was killed), every `status` reconciles. Twenty at once must
    not ingest the same log bytes twice, nor meter the same seconds twice."""
    spec = spec_file(tmp_path, "{cloud: local, hourly_usd: 36}")
    proc = standin_cli.run("apply", spec, "--local", "--yes", "--json", "--detach", STANDIN_STEPS="80",
                           STANDIN_SLEEP="0.03")
    assert proc.returncode == 0, proc.stderr
    for _ in range(200):
        procs = [standin_cli.popen("status", "tiny", "--json") for _ in range(20)]
        rows = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        if all(r["status"] == "succeeded" for r in rows):
            break
    store = Store(home / "state.db")
    steps = [e["step"] for _, e in store.events("tiny", kinds=("progress",))]
    assert steps == list(range(1, 81)), f"{len(steps)} progress events for 80 steps"
    (attempt,) = store.attempts("tiny")
    assert attempt.released == 1 and attempt.status == "succeeded"
    # Billed from launch until teardown was confirmed (just after the end), each second once.
    billed = store.metered_seconds("tiny", 1)
    assert attempt.ended_at - attempt.started_at - 0.01 <= billed <= attempt.ended_at - attempt.started_at + 2.0
    assert store.spend("tiny") == pytest.approx(billed * 0.01, rel=1e-6)


def test_writers_wait_out_a_held_lock(tmp_path: Path):
    """busy_timeout: a write that finds the write lock held waits for it instead of failing."""
    db = tmp_path / "state.db"
    b = Store(db)
    b.claim_job("j", provider="local", job_dir="/x", spec_path=None, spec_json="{}", plan_json=None,
                owner_alive=lambda j: False)
    attempt = b.add_attempt("j", run=1, provider="local", hourly_usd=0, nodes=1, spot=False)
    held, order = threading.Event(), []

    def hold() -> None:
        a = Store(db)
        with a.tx():
            held.set()
            time.sleep(0.5)
            order.append("holder committed")
        a.close()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    b.add_events("j", 1, [{"event": "progress", "step": 1}], log_offset=10, attempt_id=attempt.id)
    order.append("writer done")
    holder.join()
    assert order == ["holder committed", "writer done"]
    assert b.log_offset(attempt.id) == 10 and len(b.events("j")) == 1


# ---- migrations ----------------------------------------------------------------------------------


def make_v1(db: Path) -> None:
    """A database as optjob 0.1 (schema version 1) left it, with a finished job in it."""
    con = sqlite3.connect(db)
    con.executescript(MIGRATIONS[0])
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("INSERT INTO jobs (name, status, reason, provider, job_dir, spec_json, run, created_at, updated_at) "
                "VALUES ('old', 'succeeded', 'succeeded', 'local', '/x', '{}', 2, 1.0, 2.0)")
    for number, run in ((1, 1), (2, 2)):
        con.execute("INSERT INTO attempts (job_name, run, number, provider, status, started_at, hourly_usd, "
                    "released) VALUES ('old', ?, ?, 'local', 'succeeded', 1.0, 0.5, 1)", (run, number))
        con.execute("INSERT INTO events (job_name, attempt, ts, kind, payload) VALUES ('old', ?, 1.5, 'job_done', "
                    "'{\"event\": \"job_done\"}')", (number,))
        con.execute("INSERT INTO ledger (job_name, attempt, ts, seconds, usd, hourly_usd, nodes, spot) "
                    "VALUES ('old', ?, 2.0, 3600, 0.5, 0.5, 1, 0)", (number,))
    con.commit()
    con.close()


def test_v1_database_migrates_keeping_its_rows(tmp_path: Path):
    assert SCHEMA_VERSION >= 2
    db = tmp_path / "state.db"
    make_v1(db)
    store = Store(db)
    assert store.schema_version == SCHEMA_VERSION
    job = store.job("old")
    assert job is not None and job.status.value == "succeeded" and job.run == 2
    assert [a.number for a in store.attempts("old")] == [1, 2]
    assert [a.number for a in store.attempts("old", run=2)] == [2]
    assert len(store.events("old")) == 2 and store.spend("old") == pytest.approx(1.0)
    indexes = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "attempts_by_job_run" in indexes
    plan = " ".join(str(r[-1]) for r in store.db.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM attempts WHERE job_name = ? AND run = ? ORDER BY number", ("old", 2)))
    assert "attempts_by_job_run" in plan
    # New work continues the old numbering.
    job, attach = store.claim_job("old", provider="local", job_dir="/x", spec_path=None, spec_json="{}",
                                  plan_json=None, owner_alive=lambda j: False)
    assert not attach and job.run == 3
    assert store.add_attempt("old", run=3, provider="local", hourly_usd=0, nodes=1, spot=False).number == 3
    store.close()
    assert Store(db).schema_version == SCHEMA_VERSION  # opening again is a no-op


def test_a_failing_migration_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    db = tmp_path / "state.db"
    make_v1(db)
    broken = [*MIGRATIONS[:1], "CREATE INDEX half_done ON attempts (run); SELECT * FROM no_such_table"]
    monkeypatch.setattr("optjob.manager.store.MIGRATIONS", broken)
    monkeypatch.setattr("optjob.manager.store.SCHEMA_VERSION", 2)
    with pytest.raises(StateError, match="no_such_table"):
        Store(db)
    con = sqlite3.connect(db)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    assert con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM attempts").fetchone()[0] == 2
    con.close()
    monkeypatch.setattr("optjob.manager.store.MIGRATIONS", schema.MIGRATIONS)
    monkeypatch.setattr("optjob.manager.store.SCHEMA_VERSION", schema.SCHEMA_VERSION)
    assert Store(db).schema_version == SCHEMA_VERSION


def test_concurrent_first_opens_migrate_once(tmp_path: Path):
    db = tmp_path / "state.db"
    make_v1(db)
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            Store(db).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert Store(db).schema_version == SCHEMA_VERSION
