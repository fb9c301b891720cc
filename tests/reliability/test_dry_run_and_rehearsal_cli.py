"""Dry runs live in a namespace of their own, and a preemption rehearsal does what it was asked (or
says why not), through the real CLI with the stand-in workload.

- ``apply X --dry-run`` runs as ``X-dry-run`` in ``OPTJOB_HOME/dry-runs/``, its state row marked a
  dry run by its plan; a real job called ``X-dry-run`` is never touched by it (the dry run is
  refused, one line, exit 2), nor a dry run by a real job of that name.
- ``--simulate-preemption N`` on a pipeline too short for N kills says how many happened.
"""

from __future__ import annotations

import json
from pathlib import Path

from optjob.manager.store import Store
from reliability_harness import Cli, standin_spec


def write(tmp_path: Path, name: str, **kw: str) -> str:
    f = tmp_path / f"{name}.yaml"
    f.write_text(standin_spec(name=name, **kw))
    return str(f)


def test_a_dry_run_never_replaces_a_real_job_of_its_name(tmp_path: Path, standin_cli: Cli, home: Path):
    real = standin_cli.run("apply", write(tmp_path, "tiny-dry-run"), "--local", "--yes", "--json",
                           STANDIN_STEPS="2")
    assert real.returncode == 0, real.stderr
    folder = home / "jobs" / "tiny-dry-run"
    (folder / "steps" / "00-train" / "model").mkdir(parents=True)
    (folder / "steps" / "00-train" / "model" / "weights").write_text("the real model")
    job_json = (folder / "job.json").read_bytes()
    before = standin_cli.json("status", "tiny-dry-run")

    dry = standin_cli.run("apply", write(tmp_path, "tiny"), "--dry-run", "--json", STANDIN_STEPS="2")
    assert dry.returncode == 2, dry.stdout + dry.stderr
    lines = dry.stderr.strip().splitlines()
    assert len(lines) == 1 and "tiny-dry-run is a real job, not a dry run" in lines[0], dry.stderr
    assert standin_cli.json("status", "tiny-dry-run") == before
    assert (folder / "job.json").read_bytes() == job_json and json.loads(job_json)["dry_run"] is False
    assert (folder / "steps" / "00-train" / "model" / "weights").read_text() == "the real model"
    assert not (home / "dry-runs").exists()


def test_dry_runs_have_their_own_folders_and_rows(tmp_path: Path, standin_cli: Cli, home: Path):
    dry = standin_cli.run("apply", write(tmp_path, "tiny"), "--dry-run", "--json", STANDIN_STEPS="2")
    assert dry.returncode == 0, dry.stderr
    out = json.loads(dry.stdout)
    assert out["name"] == "tiny-dry-run" and out["status"] == "succeeded"
    assert Path(out["job_dir"]) == home / "dry-runs" / "tiny-dry-run"
    assert json.loads((home / "dry-runs" / "tiny-dry-run" / "job.json").read_text())["dry_run"] is True
    assert not (home / "jobs" / "tiny-dry-run").exists()
    job = Store(home / "state.db").job("tiny-dry-run")
    assert job is not None and job.dry_run

    # A real job may not take a dry run's name either (their records would mix).
    real = standin_cli.run("apply", write(tmp_path, "tiny-dry-run"), "--local", "--yes", STANDIN_STEPS="2")
    assert real.returncode == 2, real.stdout + real.stderr
    assert "tiny-dry-run is the name of a dry run" in real.stderr and len(real.stderr.strip().splitlines()) == 1
    assert not (home / "jobs" / "tiny-dry-run").exists()
    # A dry run again is fine: a new run of the dry run.
    again = standin_cli.run("apply", write(tmp_path, "tiny"), "--dry-run", "--json", STANDIN_STEPS="2")
    assert again.returncode == 0, again.stderr
    job = Store(home / "state.db").job("tiny-dry-run")
    assert job is not None and job.run == 2 and job.dry_run


def test_a_rehearsal_that_got_fewer_kills_than_asked_says_so(tmp_path: Path, standin_cli: Cli, home: Path):
    """Each attempt of this pipeline prints one progress event; a kill point is drawn among the
    first 1 to 6, so most attempts end before theirs: fewer kills than asked, and a warning."""
    proc = standin_cli.run("apply", write(tmp_path, "tiny"), "--local", "--yes", "--simulate-preemption", "3",
                           "--preemption-seed", "0", STANDIN_STEPS="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kills = sum(a.status == "preempted" for a in Store(home / "state.db").attempts("tiny"))
    assert kills < 3
    assert f"rehearsal: {kills} kill(s) survived" in proc.stdout
    assert f"warning: rehearsal: only {kills} of the 3 kills asked for happened" in proc.stderr, proc.stderr
    as_json = standin_cli.run("apply", write(tmp_path, "tiny"), "--local", "--yes", "--json",
                              "--simulate-preemption", "3", "--preemption-seed", "0", STANDIN_STEPS="1")
    assert as_json.returncode == 0, as_json.stderr
    rehearsal = json.loads(as_json.stdout)["rehearsal"]
    assert rehearsal["kills_asked"] == 3 and rehearsal["kills"] < 3 and "only" in rehearsal["shortfall"]
