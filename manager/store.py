"""The state store: one SQLite file (WAL) under ``OPTJOB_HOME``.

Writers take short ``BEGIN IMMEDIATE`` transactions; readers never block
writers (WAL), and every connection waits out a busy lock instead of failing.

A new database is made whole (schema and WAL header) under a temporary name and linked into
place, so ``state.db`` is never an empty file of optjob's making: an empty one is damage (a
truncation, a full disk, a bad copy) and is refused rather than silently started afresh. A write
that finds the disk full is one line that says so, where, and how much room the store wants.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optjob.specs.errors import StateError, UsageError

from . import paths
from .clock import SYSTEM, Clock
from .job_states import JobStatus, Reason
from .stored_spec import read_stored_spec

if TYPE_CHECKING:
    from optjob.specs import JobSpec
from .store_schema import MIGRATIONS, SCHEMA_VERSION

#: How many times ``claim_job`` looks again when the job changes while its owner is checked.
CLAIM_TRIES = 20
#: The room the state store asks for when the disk is full: beyond its write-ahead log, enough for
#: a few thousand more events and a checkpoint of the log into the database.
STORE_HEADROOM_BYTES = 16 << 20
#: The job columns a run replaces when it starts: kept in ``previous_json`` until its first attempt,
#: so a run that never launches leaves the job as it was (``restore_previous_run``).
RUN_COLUMNS = ("status", "reason", "provider", "job_dir", "spec_path", "spec_json", "plan_json", "run",
               "started_at", "ended_at", "step_index", "step_kind", "progress_json", "owner_seen", "message")


@dataclass
class JobRow:
    name: str
    status: JobStatus
    reason: Reason | None
    provider: str
    job_dir: str
    spec_path: str | None
    spec_json: str
    plan_json: str | None
    run: int
    created_at: float
    updated_at: float
    started_at: float | None
    ended_at: float | None
    step_index: int | None
    step_kind: str | None
    progress_json: str | None
    owner_pid: int | None
    owner_seen: float | None
    message: str | None
    stop_requested_at: float | None = None
    #: The finished run's record while a new run is claimed but has not launched (JSON of RUN_COLUMNS).
    previous_json: str | None = None

    @property
    def progress(self) -> dict[str, Any]:
        return json.loads(self.progress_json) if self.progress_json else {}

    @property
    def dry_run(self) -> bool:
        """Whether this is an ``apply --dry-run`` (its plan says so)."""
        return bool(self.plan.get("dry_run"))

    @property
    def plan(self) -> dict[str, Any]:
        return json.loads(self.plan_json) if self.plan_json else {}

    def spec(self) -> JobSpec:
        """The job's spec as stored, read leniently (see ``read_stored_spec``)."""
        return read_stored_spec(self.spec_json)


@dataclass
class AttemptRow:
    id: int
    job_name: str
    run: int
    number: int
    provider: str
    handle_json: str | None
    status: str
    exit_code: int | None
    detail: str | None
    started_at: float
    ended_at: float | None
    hourly_usd: float
    nodes: int
    spot: int
    log_offset: int
    released: int
    #: When billing started: the node existed (None: not yet, or not known yet).
    billed_from: float | None = None
    #: When the provider's own record says the resources were gone (billing never runs past it).
    gone_at: float | None = None
    #: What the current price is for (``Placement.key()``), and where it came from (the ledger's source).
    placement: str | None = None
    price_source: str | None = None
    #: Shared infrastructure kept up for this attempt (SkyPilot's jobs controller): USD/h and source.
    overhead_usd: float = 0.0
    overhead_source: str | None = None

    @property
    def handle(self) -> dict[str, Any] | None:
        return json.loads(self.handle_json) if self.handle_json else None


def name_taken(current: JobRow, dry_run: bool) -> UsageError:
    """The error for a dry run claimed over a real job of the same name, or the other way round."""
    name = current.name
    if dry_run:
        return UsageError(f"{name} is a real job, not a dry run: a dry run under that name would replace its "
                          "record and its folder; nothing was changed",
                          hint="dry-run a copy of the spec with another name: (the dry run is NAME-dry-run)")
    return UsageError(f"{name} is the name of a dry run: a real job under that name would be mixed with it; "
                      "nothing was changed", hint="give this job another name (name: in the spec)")


def _record(job: JobRow) -> str:
    """The columns a new run replaces, as JSON (``previous_json``)."""
    return json.dumps({c: getattr(job, c).value if hasattr(getattr(job, c), "value") else getattr(job, c)
                       for c in RUN_COLUMNS})


def _claim_key(job: JobRow | None) -> tuple[Any, ...] | None:
    """What an aliveness verdict about ``job`` depends on: its run, owner and whether it has ended."""
    return None if job is None else (job.run, job.owner_pid, job.status.is_terminal())


def _assignments(cls: type, values: dict[str, Any], *, frozen: tuple[str, ...]) -> str:
    """``col = ?, ...`` for an UPDATE, every column checked against the row type's fields: a column
    name never comes from anywhere but this module's dataclasses."""
    allowed = {f.name for f in fields(cls)} - set(frozen)
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"{cls.__name__} has no updatable column {', '.join(unknown)}")
    return ", ".join(f"{k} = ?" for k in values)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _mount_point(path: Path) -> Path:
    p = path.resolve()
    while not os.path.ismount(p) and p.parent != p:
        p = p.parent
    return p


def disk_full_error(path: Path, need: int, what: str = "write") -> StateError:
    """The one line for ENOSPC / SQLITE_FULL on ``path``: where, what is free, what is needed."""
    try:
        free = f"{_size(shutil.disk_usage(path if path.is_dir() else path.parent).free)} free"
    except OSError:
        free = "free space unknown"
    return StateError(f"disk full: cannot {what} {path} ({free} on {_mount_point(path.parent)}; "
                      f"it needs at least {_size(need)})",
                      hint="free that much there and run the command again; `optjob status` then catches up "
                           "with what ran meanwhile")


#: Room a job folder's own files (spec.yaml, job.json) want before a run starts writing there.
JOB_FILES_HEADROOM_BYTES = 1 << 20


def folder_write_error(folder: Path, exc: OSError) -> StateError:
    """One line for a job folder that cannot be written (read-only, not ours, disk full)."""
    if exc.errno == errno.ENOSPC:
        return disk_full_error(folder, JOB_FILES_HEADROOM_BYTES)
    where = exc.filename or folder
    return StateError(f"cannot write the job folder {folder}: {exc.strerror or exc} ({where})",
                      hint="make it writable by this user, or point OPTJOB_HOME elsewhere")


def _is_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc))


def _create_database(path: Path) -> None:
    """Make a new, valid (non-empty, WAL) database at ``path`` atomically: built under a temporary
    name, then hard-linked into place, which fails if another process made one first (it wins)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new")
    os.close(fd)
    try:
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        finally:
            con.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: theirs is the one
        except OSError:  # a filesystem without hard links: a rename, unless one appeared meanwhile
            if not path.exists():
                os.replace(tmp, path)
    finally:
        for leftover in (tmp, f"{tmp}-wal", f"{tmp}-shm"):
            Path(leftover).unlink(missing_ok=True)


def _row(cls: type, row: sqlite3.Row) -> Any:
    values = {f.name: row[f.name] for f in fields(cls)}
    if cls is JobRow:
        values["status"] = JobStatus(values["status"])
        values["reason"] = Reason(values["reason"]) if values["reason"] else None
    return cls(**values)


class Store:
    """Typed access to ``state.db``. Open one per process (connections are not shared)."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Clock = SYSTEM) -> None:
        #: Every timestamp the store writes, and every reader of time that holds the store, uses it.
        self.clock = clock
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                _create_database(self.path)
            elif self.path.is_file() and self.path.stat().st_size == 0:
                raise StateError(
                    f"{self.path} is an empty file where the state store was: the history of every job is "
                    "not in it",
                    hint="restore it from a backup; or, to start a new store, move it aside "
                         "(job folders stay where they are)")
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise disk_full_error(self.path, STORE_HEADROOM_BYTES, "create") from None
            raise StateError(f"{self.path}: cannot create the state store: {exc.strerror or exc}") from None
        except sqlite3.DatabaseError as exc:
            if _is_full(exc):
                raise disk_full_error(self.path, STORE_HEADROOM_BYTES, "create") from None
            raise StateError(f"{self.path}: cannot create the state store: {exc}") from None
        try:
            self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 30000")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except StateError:
            raise
        except sqlite3.DatabaseError as exc:
            if _is_full(exc):
                raise self._full() from None
            raise StateError(f"{self.path}: cannot open the state store: {exc}") from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the write lock from its start. A full disk is a ``StateError``
        that says so (the transaction is rolled back: nothing half-written)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                if self.db.in_transaction:  # SQLite may have rolled back already (a full disk does)
                    self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if not _is_full(exc):
                raise
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise self._full() from None

    def _full(self) -> StateError:
        wal = Path(f"{self.path}-wal")
        return disk_full_error(self.path, STORE_HEADROOM_BYTES + (wal.stat().st_size if wal.exists() else 0))

    def _migrate(self) -> None:
        with self.tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{self.path} has schema version {version}, newer than this optjob ({SCHEMA_VERSION}); "
                    "upgrade optjob or point OPTJOB_HOME elsewhere"
                )
            for script in MIGRATIONS[version:]:
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    # ---- jobs -----------------------------------------------------------------------------------

    def job(self, name: str) -> JobRow | None:
        row = self.db.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()
        return _row(JobRow, row) if row else None

    def jobs(self, limit: int | None = None) -> list[JobRow]:
        sql = "SELECT * FROM jobs ORDER BY updated_at DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [_row(JobRow, r) for r in self.db.execute(sql)]

    def unfinished_jobs(self) -> list[JobRow]:
        """Jobs not in a terminal status (``optjob list`` reconciles them all, whatever its limit)."""
        terminal = tuple(s.value for s in JobStatus if s.is_terminal())
        sql = f"SELECT * FROM jobs WHERE status NOT IN ({', '.join('?' * len(terminal))}) ORDER BY updated_at DESC"
        return [_row(JobRow, r) for r in self.db.execute(sql, terminal)]

    def job_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])

    def update_job(self, name: str, **values: Any) -> None:
        values["updated_at"] = self.clock.time()
        for key in ("status", "reason"):
            if hasattr(values.get(key), "value"):
                values[key] = values[key].value
        cols = _assignments(JobRow, values, frozen=("name",))
        with self.tx() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE name = ?", (*values.values(), name))

    def claim_job(
        self, name: str, *, provider: str, job_dir: str, spec_path: str | None, spec_json: str,
        plan_json: str | None, owner_alive: Any,
    ) -> tuple[JobRow, bool]:
        """Create the job, or start a new run of a finished one, as this process.

        Returns ``(job, attach)``: ``attach`` is True when the job is already
        running under a live owner, in which case nothing was changed and the
        caller follows it instead of starting a second copy. ``owner_alive`` may be
        slow (it can poll a cloud provider), so it is asked outside the write
        transaction; the transaction then checks that the job's owner and run are
        still what was asked about, and looks again if not. So two concurrent
        applies of the same name start one job, and a slow poll blocks no writer.

        A dry run (its plan says ``dry_run``) and a real job never share a name: claiming one over
        the other is a ``UsageError`` and changes nothing. A finished job's record is kept in
        ``previous_json`` until the new run's first attempt (see ``restore_previous_run``)."""
        dry_run = bool(json.loads(plan_json or "{}").get("dry_run"))
        for _ in range(CLAIM_TRIES):
            seen = self.job(name)
            alive = seen is not None and not seen.status.is_terminal() and bool(owner_alive(seen))
            now = self.clock.time()
            with self.tx() as db:
                row = db.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()
                current = _row(JobRow, row) if row is not None else None
                if _claim_key(current) != _claim_key(seen):
                    continue  # claimed, finished or restarted meanwhile: look again
                if current is not None and current.dry_run != dry_run:
                    raise name_taken(current, dry_run)
                if current is not None and alive:
                    return current, True
                if current is not None:
                    db.execute(
                        "UPDATE jobs SET status = ?, reason = NULL, provider = ?, job_dir = ?, spec_path = ?, "
                        "spec_json = ?, plan_json = ?, run = run + ?, updated_at = ?, started_at = ?, "
                        "ended_at = NULL, owner_pid = ?, owner_seen = ?, message = NULL, stop_requested_at = NULL, "
                        "previous_json = ? WHERE name = ?",
                        (JobStatus.PENDING.value, provider, job_dir, spec_path, spec_json, plan_json,
                         1 if current.status.is_terminal() else 0, now, now, os.getpid(), now,
                         _record(current) if current.status.is_terminal() else current.previous_json, name),
                    )
                else:
                    db.execute(
                        "INSERT INTO jobs (name, status, provider, job_dir, spec_path, spec_json, plan_json, run, "
                        "created_at, updated_at, started_at, owner_pid, owner_seen) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?)",
                        (name, JobStatus.PENDING.value, provider, job_dir, spec_path, spec_json, plan_json,
                         now, now, now, os.getpid(), now),
                    )
                new = db.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()
            return _row(JobRow, new), False
        raise StateError(f"could not claim job {name}: it kept changing under {CLAIM_TRIES} tries",
                         hint="another optjob process is starting and stopping it; try again")

    def check_name(self, name: str, *, dry_run: bool) -> None:
        """Raise the ``UsageError`` ``claim_job`` would when ``name`` belongs to the other kind (a dry
        run's name to a real job, or the reverse), before anything is asked or printed."""
        job = self.job(name)
        if job is not None and job.dry_run != dry_run:
            raise name_taken(job, dry_run)

    def restore_previous_run(self, name: str) -> bool:
        """Undo a claim whose run never launched: the job's record goes back to the finished run it
        replaced (kept in ``previous_json``). False (nothing changed) when there is none, i.e. the
        job is new or its new run has an attempt."""
        with self.tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()
            job = _row(JobRow, row) if row is not None else None
            if job is None or job.previous_json is None:
                return False
            if db.execute("SELECT 1 FROM attempts WHERE job_name = ? AND run = ?", (name, job.run)).fetchone():
                return False
            previous = {c: v for c, v in json.loads(job.previous_json).items() if c in RUN_COLUMNS}
            values = {**previous, "owner_pid": None, "stop_requested_at": None, "previous_json": None,
                      "updated_at": self.clock.time()}
            cols = _assignments(JobRow, values, frozen=("name",))
            db.execute(f"UPDATE jobs SET {cols} WHERE name = ?", (*values.values(), name))
        return True

    # ---- attempts -------------------------------------------------------------------------------

    def add_attempt(self, job: str, *, run: int, provider: str, hourly_usd: float, nodes: int,
                    spot: bool) -> AttemptRow:
        with self.tx() as db:
            number = db.execute(
                "SELECT COALESCE(MAX(number), 0) + 1 FROM attempts WHERE job_name = ?", (job,)
            ).fetchone()[0]
            cur = db.execute(
                "INSERT INTO attempts (job_name, run, number, provider, status, started_at, hourly_usd, nodes, spot) "
                "VALUES (?, ?, ?, ?, 'launching', ?, ?, ?, ?)",
                (job, run, number, provider, self.clock.time(), hourly_usd, nodes, int(spot)),
            )
            # The run has really started: the record of the one before is no longer the job's.
            db.execute("UPDATE jobs SET previous_json = NULL WHERE name = ?", (job,))
            row = db.execute("SELECT * FROM attempts WHERE id = ?", (cur.lastrowid,)).fetchone()
        return _row(AttemptRow, row)  # type: ignore[no-any-return]

    def update_attempt(self, attempt_id: int, **values: Any) -> None:
        if "handle" in values:
            values["handle_json"] = json.dumps(values.pop("handle"))
        if hasattr(values.get("status"), "value"):
            values["status"] = values["status"].value
        cols = _assignments(AttemptRow, values, frozen=("id", "job_name"))
        with self.tx() as db:
            db.execute(f"UPDATE attempts SET {cols} WHERE id = ?", (*values.values(), attempt_id))

    def attempts(self, job: str, run: int | None = None) -> list[AttemptRow]:
        sql = "SELECT * FROM attempts WHERE job_name = ?"
        args: list[Any] = [job]
        if run is not None:
            sql += " AND run = ?"
            args.append(run)
        return [_row(AttemptRow, r) for r in self.db.execute(sql + " ORDER BY number", args)]

    # ---- events ---------------------------------------------------------------------------------

    def add_events(self, job: str, attempt: int, events: list[dict[str, Any]], *, log_offset: int | None = None,
                   attempt_id: int | None = None, job_update: dict[str, Any] | None = None,
                   expect_offset: int | None = None) -> bool:
        """Store events, advance the attempt's log offset and update the job row, atomically:
        a reader sees all of it or none, and a crash never ingests an event twice.

        With ``expect_offset``, nothing is written (and False returned) unless the attempt's
        stored offset is still that: another process (a second ``status``) ingested those bytes."""
        now = self.clock.time()
        with self.tx() as db:
            if expect_offset is not None and attempt_id is not None:
                row = db.execute("SELECT log_offset FROM attempts WHERE id = ?", (attempt_id,)).fetchone()
                if row is None or row[0] != expect_offset:
                    return False
            db.executemany(
                "INSERT INTO events (job_name, attempt, ts, kind, step_index, payload) VALUES (?, ?, ?, ?, ?, ?)",
                [(job, attempt, e.get("ts", now), e["event"], e.get("index"), json.dumps(e)) for e in events],
            )
            if log_offset is not None and attempt_id is not None:
                db.execute("UPDATE attempts SET log_offset = ? WHERE id = ?", (log_offset, attempt_id))
            if job_update:
                job_update = {**job_update, "updated_at": self.clock.time()}
                cols = ", ".join(f"{k} = ?" for k in job_update)
                db.execute(f"UPDATE jobs SET {cols} WHERE name = ?", (*job_update.values(), job))
        return True

    def log_offset(self, attempt_id: int) -> int:
        row = self.db.execute("SELECT log_offset FROM attempts WHERE id = ?", (attempt_id,)).fetchone()
        return int(row[0]) if row else 0

    def events(self, job: str, *, kinds: tuple[str, ...] = (), after_id: int = 0, limit: int | None = None
               ) -> list[tuple[int, dict[str, Any]]]:
        sql = "SELECT id, payload FROM events WHERE job_name = ? AND id > ?"
        args: list[Any] = [job, after_id]
        if kinds:
            sql += f" AND kind IN ({', '.join('?' * len(kinds))})"
            args.extend(kinds)
        sql += " ORDER BY id" + (f" LIMIT {int(limit)}" if limit else "")
        return [(r[0], json.loads(r[1])) for r in self.db.execute(sql, args)]

    def attempt_events(self, job: str, *, kinds: tuple[str, ...] = ()) -> list[tuple[int, dict[str, Any]]]:
        """``(attempt number, event)`` of every event of ``job``, in the order they were stored."""
        sql = "SELECT attempt, payload FROM events WHERE job_name = ?"
        args: list[Any] = [job]
        if kinds:
            sql += f" AND kind IN ({', '.join('?' * len(kinds))})"
            args.extend(kinds)
        return [(int(r[0]), json.loads(r[1])) for r in self.db.execute(sql + " ORDER BY id", args)]

    # ---- money ----------------------------------------------------------------------------------

    def add_ledger(self, job: str, attempt: int, *, seconds: float, usd: float, hourly_usd: float,
                   nodes: int, spot: bool, note: str = "", source: str | None = None, kind: str = "node") -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO ledger (job_name, attempt, ts, seconds, usd, hourly_usd, nodes, spot, note, source, kind) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job, attempt, self.clock.time(), seconds, usd, hourly_usd, nodes, int(spot), note, source, kind),
            )

    def bill_until(self, job: str, attempt: int, *, seconds: float, usd_per_s: float, hourly_usd: float,
                   nodes: int, spot: bool, source: str | None = None, kind: str = "node") -> float:
        """Bring the attempt's metered time of ``kind`` (its nodes, or the ``controller`` that ran it) up
        to ``seconds`` (since billing started), in one write transaction, so concurrent meters (apply,
        several ``status``) never bill a second twice. The added line is priced at ``usd_per_s`` and
        says where that price came from (``source``). Returns the seconds added."""
        with self.tx() as db:
            billed = float(db.execute(
                "SELECT COALESCE(SUM(seconds), 0) FROM ledger WHERE job_name = ? AND attempt = ? AND kind = ?",
                (job, attempt, kind)).fetchone()[0])
            add = seconds - billed
            if add > 0:
                db.execute(
                    "INSERT INTO ledger (job_name, attempt, ts, seconds, usd, hourly_usd, nodes, spot, note, source, "
                    "kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?)",
                    (job, attempt, self.clock.time(), add, add * usd_per_s, hourly_usd, nodes, int(spot), source, kind),
                )
        return max(0.0, add)

    def spend(self, job: str, attempt: int | None = None, kind: str | None = None) -> float:
        """USD in the ledger for ``job`` (every line, the controller's included: it counts against the
        budget), or for one attempt, or one kind (``node``, ``controller``)."""
        sql = "SELECT COALESCE(SUM(usd), 0) FROM ledger WHERE job_name = ?"
        args: list[Any] = [job]
        if attempt is not None:
            sql += " AND attempt = ?"
            args.append(attempt)
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        return float(self.db.execute(sql, args).fetchone()[0])

    def ledger(self, job: str) -> list[sqlite3.Row]:
        """The ledger lines of ``job``, in the order they were written."""
        return list(self.db.execute("SELECT * FROM ledger WHERE job_name = ? ORDER BY id", (job,)))

    def elapsed_seconds(self, job: str) -> float:
        """Metered wall time across every attempt of ``job`` (what ``max_hours`` caps): the nodes' lines."""
        row = self.db.execute("SELECT COALESCE(SUM(seconds), 0) FROM ledger WHERE job_name = ? AND kind = 'node'",
                              (job,)).fetchone()
        return float(row[0])

    def has_jobs_on(self, provider: str) -> bool:
        """Whether any job ever ran on ``provider``."""
        return self.db.execute("SELECT 1 FROM jobs WHERE provider = ? LIMIT 1", (provider,)).fetchone() is not None

    def metered_seconds(self, job: str, attempt: int) -> float:
        row = self.db.execute(
            "SELECT COALESCE(SUM(seconds), 0) FROM ledger WHERE job_name = ? AND attempt = ? AND kind = 'node'",
            (job, attempt)).fetchone()
        return float(row[0])

    def add_calibration(self, job: str, accelerator: str, model_params: int, precision: str,
                        tokens_per_s: float) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO calibration (ts, job_name, accelerator, model_params, precision, tokens_per_s) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (self.clock.time(), job, accelerator, model_params, precision, tokens_per_s),
            )

    def calibration(self) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM calibration ORDER BY ts"))


def open_store() -> Store:
    """The state store of this ``OPTJOB_HOME``."""
    return Store(paths.db_path())
