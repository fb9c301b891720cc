"""The state store's schema, versioned from the start.

``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``. A database
newer than this code is refused rather than guessed at.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema.
    """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE jobs (
        name TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        reason TEXT,
        provider TEXT NOT NULL,
        job_dir TEXT NOT NULL,
        spec_path TEXT,
        spec_json TEXT NOT NULL,
        plan_json TEXT,
        run INTEGER NOT NULL DEFAULT 1,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL,
        step_index INTEGER,
        step_kind TEXT,
        progress_json TEXT,
        owner_pid INTEGER,
        owner_seen REAL,
        message TEXT
    );
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        job_name TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
        run INTEGER NOT NULL,
        number INTEGER NOT NULL,
        provider TEXT NOT NULL,
        handle_json TEXT,
        status TEXT NOT NULL,
        exit_code INTEGER,
        detail TEXT,
        started_at REAL NOT NULL,
        ended_at REAL,
        hourly_usd REAL NOT NULL DEFAULT 0,
        nodes INTEGER NOT NULL DEFAULT 1,
        spot INTEGER NOT NULL DEFAULT 0,
        log_offset INTEGER NOT NULL DEFAULT 0,
        released INTEGER NOT NULL DEFAULT 0,
        UNIQUE (job_name, number)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        job_name TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        step_index INTEGER,
        payload TEXT NOT NULL
    );
    CREATE INDEX events_by_job ON events (job_name, id);
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY,
        job_name TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        ts REAL NOT NULL,
        seconds REAL NOT NULL,
        usd REAL NOT NULL,
        hourly_usd REAL NOT NULL,
        nodes INTEGER NOT NULL,
        spot INTEGER NOT NULL,
        note TEXT
    );
    CREATE INDEX ledger_by_job ON ledger (job_name, attempt);
    CREATE TABLE calibration (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        job_name TEXT NOT NULL,
        accelerator TEXT NOT NULL,
        model_params INTEGER NOT NULL,
        precision TEXT NOT NULL,
        tokens_per_s REAL NOT NULL
    );
    """,
    # 1 -> 2: attempts are read by (job, run) on every tick, status and report.
    """
    CREATE INDEX IF NOT EXISTS attempts_by_job_run ON attempts (job_name, run, number);
    """,
    # 2 -> 3: when a stop was first asked for (monotonic deadlines cannot survive a restart, so wall
    # time): whoever looks next escalates to a kill once the grace has passed.
    """
    ALTER TABLE jobs ADD COLUMN stop_requested_at REAL;
    """,
    # 3 -> 4: the finished run's record while a new run is claimed but not yet launched, so a run
    # that fails before its first attempt leaves the job as it was (Store.restore_previous_run).
    """
    ALTER TABLE jobs ADD COLUMN previous_json TEXT;
    """,
    # 4 -> 5: the meter prices what ran. Each ledger line says where its price came from (``source``:
    # ``catalog:aws/us-east-1/p3.2xlarge/spot``, ``live:...``, ``plan:...``) and what it bills
    # (``kind``: the attempt's nodes, or the SkyPilot jobs controller that ran it); an attempt records
    # when its node came to exist (``billed_from``), when the provider says it was gone (``gone_at``),
    # what it was priced on (``placement``, ``price_source``) and its controller's rate and source.
    """
    ALTER TABLE ledger ADD COLUMN source TEXT;
    ALTER TABLE ledger ADD COLUMN kind TEXT NOT NULL DEFAULT 'node';
    ALTER TABLE attempts ADD COLUMN billed_from REAL;
    ALTER TABLE attempts ADD COLUMN gone_at REAL;
    ALTER TABLE attempts ADD COLUMN placement TEXT;
    ALTER TABLE attempts ADD COLUMN price_source TEXT;
    ALTER TABLE attempts ADD COLUMN overhead_usd REAL NOT NULL DEFAULT 0;
    ALTER TABLE attempts ADD COLUMN overhead_source TEXT;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
