"""The SQLite state store: round trips, migrations, one job per name under concurrency."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.store import Store
from optjob.manager.store_schema import SCHEMA_VERSION
from optjob.specs.errors import StateError


def _claim(store: Store, name: str = "job", alive=lambda j: False):
    return store.claim_job(name, provider="local", job_dir="/tmp/x", spec_path=None, spec_json="{}",
                           plan_json="{}", owner_alive=alive)


def test_job_attempt_event_ledger_round_trip(tmp_path: Path):
    store = Store(tmp_path / "state.db")
    job, attach = _claim(store)
    assert not attach and job.status == JobStatus.PENDING and job.run == 1
    a = store.add_attempt("job", run=1, provider="local", hourly_usd=3.0, nodes=2, spot=True)
    assert a.number == 1
    store.update_attempt(a.id, handle={"provider": "local", "cluster": "c", "attempt": 1, "data": {"pid": 1}},
                         status="running")
    store.add_events("job", 1, [{"event": "progress", "index": 0, "ts": 1.0, "loss": 2.5}], log_offset=120,
                     attempt_id=a.id, job_update={"step_index": 0, "step_kind": "train"})
    store.add_ledger("job", 1, seconds=60, usd=0.1, hourly_usd=3.0, nodes=2, spot=True)
    store.add_ledger("job", 1, seconds=60, usd=0.1, hourly_usd=3.0, nodes=2, spot=True)
    again = Store(tmp_path / "state.db")
    (row,) = again.attempts("job")
    assert row.handle == {"provider": "local", "cluster": "c", "attempt": 1, "data": {"pid": 1}}
    assert row.log_offset == 120 and row.spot == 1 and row.nodes == 2
    assert again.events("job")[0][1]["loss"] == 2.5
    assert again.spend("job") == pytest.approx(0.2)
    assert again.metered_seconds("job", 1) == pytest.approx(120)
    job = again.job("job")
    assert job is not None and job.step_kind == "train"


def test_finished_job_runs_again_as_a_new_run(tmp_path: Path):
    store = Store(tmp_path / "state.db")
    _claim(store)
    store.add_attempt("job", run=1, provider="local", hourly_usd=0, nodes=1, spot=False)
    store.update_job("job", status=JobStatus.SUCCEEDED, reason=Reason.SUCCEEDED)
    job, attach = _claim(store)
    assert not attach and job.run == 2 and job.status == JobStatus.PENDING and job.reason is None
    a2 = store.add_attempt("job", run=2, provider="local", hourly_usd=0, nodes=1, spot=False)
    assert a2.number == 2  # attempt numbers continue across runs: logs never collide
    assert [a.number for a in store.attempts("job", run=2)] == [2]


def test_running_job_with_live_owner_attaches(tmp_path: Path):
    store = Store(tmp_path / "state.db")
    _claim(store)
    store.update_job("job", status=JobStatus.RUNNING)
    job, attach = _claim(store, alive=lambda j: True)
    assert attach and job.run == 1


def test_status_enums():
    assert not JobStatus.RUNNING.is_terminal() and JobStatus.STOPPED.is_terminal()
    assert JobStatus("running") == "running"
    assert Reason.BUDGET.exit_code == 4 and Reason.CANCELLED.exit_code == 130


def test_migrates_from_empty_and_refuses_newer(tmp_path: Path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.commit()
    con.close()
    assert Store(db).schema_version == SCHEMA_VERSION
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StateError, match="newer than this optjob"):
        Store(db)


def test_corrupt_database_is_a_state_error(tmp_path: Path):
    db = tmp_path / "bad.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="cannot open"):
        Store(db)


def _claimer(db: str, barrier, results) -> None:
    store = Store(db)
    barrier.wait()
    _, attach = store.claim_job("race", provider="local", job_dir="/x", spec_path=None, spec_json="{}",
                                plan_json=None, owner_alive=lambda j: True)
    results.put(attach)


def test_concurrent_claims_start_one_job(tmp_path: Path):
    db = str(tmp_path / "state.db")
    Store(db).close()
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(db, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    attaches = sorted(results.get(timeout=5) for _ in procs)
    assert attaches == [False, True, True, True]


def test_a_slow_owner_check_holds_no_write_lock(tmp_path: Path):
    store = Store(tmp_path / "state.db")
    _claim(store)  # pending, owned by this process

    def check(job) -> bool:  # as a cloud poll would take its time: meanwhile another process writes
        other = sqlite3.connect(tmp_path / "state.db", timeout=0.2)
        try:
            with other:
                other.execute("UPDATE jobs SET message = 'written meanwhile' WHERE name = 'job'")
        finally:
            other.close()
        return True

    job, attach = _claim(store, alive=check)
    assert attach and job.message == "written meanwhile"


def test_claim_looks_again_when_the_job_changed_during_the_check(tmp_path: Path):
    store = Store(tmp_path / "state.db")
    _claim(store)
    db = tmp_path / "state.db"
    con = sqlite3.connect(db)
    with con:  # its owner died
        con.execute("UPDATE jobs SET owner_pid = 999999999 WHERE name = 'job'")
    verdicts: list[int | None] = []

    def check(job) -> bool:
        verdicts.append(job.owner_pid)
        if len(verdicts) == 1:  # ... and while we look, another apply claims it
            with con:
                con.execute("UPDATE jobs SET owner_pid = 424242 WHERE name = 'job'")
            return False  # our verdict on the dead owner, now stale
        return True

    job, attach = _claim(store, alive=check)
    con.close()
    assert verdicts == [999999999, 424242]  # asked again about the new owner
    assert attach and job.owner_pid == 424242 and job.run == 1  # followed it: no second run started


def test_update_refuses_a_column_the_row_type_does_not_have(tmp_path: Path):
    """Column names in an UPDATE come from the row dataclasses only, never from a caller's key."""
    store = Store(tmp_path / "state.db")
    _claim(store)
    a = store.add_attempt("job", run=1, provider="local", hourly_usd=1.0, nodes=1, spot=False)
    with pytest.raises(ValueError, match="no updatable column"):
        store.update_job("job", **{"status = 'failed', name": "x"})
    with pytest.raises(ValueError, match="no updatable column"):
        store.update_attempt(a.id, job_name="other")
    job = store.job("job")
    assert job is not None and job.status == JobStatus.PENDING


def test_timestamps_come_from_the_injected_clock(tmp_path: Path):
    from optjob.manager.clock import ManualClock

    clock = ManualClock(start=1000.0)
    store = Store(tmp_path / "state.db", clock=clock)
    _claim(store)
    a = store.add_attempt("job", run=1, provider="local", hourly_usd=3600.0, nodes=1, spot=False)
    assert a.started_at == 1000.0
    clock.advance(5.0)
    from optjob.manager.meter import meter

    assert meter(store, a) == pytest.approx(5.0)  # $1/s for the 5 s the clock moved, no sleeping


def test_a_stored_spec_with_a_key_a_later_version_dropped_still_reads(tmp_path: Path):
    """An upgrade that removes a field must not stop a stored job from resuming."""
    import json

    from optjob.manager.stored_spec import read_stored_spec
    from optjob.specs import loads_spec

    stored = json.loads(loads_spec("name: old\nmodel: {init: {}}\nsteps: [{train: {max_steps: 7}}]\n")
                        .model_dump_json())
    stored["retired_top_level"] = 1
    stored["steps"][0]["train"]["retired_option"] = True
    spec = read_stored_spec(json.dumps(stored))
    assert spec.name == "old" and spec.pipeline[0].max_steps == 7  # type: ignore[attr-defined]
    stored["steps"][0]["train"]["max_steps"] = "many"  # a real error is still one
    with pytest.raises(ValueError):
        read_stored_spec(json.dumps(stored))
