"""The CLI: exit codes, one-line errors, fast imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, home: Path, check_rc: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "optjob.manager.cli", *args], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "OPTJOB_HOME": str(home), **(env or {})}, timeout=120,
    )
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def test_cli_import_stays_light():
    code = ("import sys, optjob.manager.cli, optjob.manager.commands.apply, optjob.manager.commands.status,"
            " optjob.manager.controller, optjob.manager.planner;"
            "heavy = [m for m in ('torch', 'transformers', 'sky', 'boto3', 'optuna', 'matplotlib')"
            " if m in sys.modules];"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_validate_ok_and_bad(tmp_path: Path):
    ok = run("validate", "examples/quickstart.yaml", home=tmp_path, check_rc=0)
    assert "ok: examples/quickstart.yaml" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {init: {}}\nsteps:\n  - train: {lr: 0}\n")
    proc = run("validate", str(bad), home=tmp_path, check_rc=2)
    assert f"{bad}:4:17: steps[0].train.lr" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [\n")
    assert "Traceback" not in run("validate", str(bad), home=tmp_path, check_rc=2).stderr
    assert "Traceback" in run("--debug", "plan", str(bad), home=tmp_path, check_rc=2).stderr


def test_schema_is_json(tmp_path: Path):
    schema = json.loads(run("schema", home=tmp_path, check_rc=0).stdout)
    assert schema["title"] == "JobSpec" and "steps" in schema["properties"]


def test_plan_json_has_the_stable_keys(tmp_path: Path):
    plan = json.loads(run("plan", "examples/quickstart.yaml", "--json", home=tmp_path, check_rc=0).stdout)
    assert plan["name"] == "quickstart"
    assert {"offers", "chosen", "budget", "steps"} <= set(plan)
    assert {"max_usd", "max_hours", "fits"} <= set(plan["budget"])
    assert [s["kind"] for s in plan["steps"]][:1] == ["train"]


@pytest.mark.parametrize("args", [("status", "nope"), ("logs", "nope"), ("down", "nope"), ("report", "nope")])
def test_unknown_job_is_usage_error(tmp_path: Path, args: tuple[str, ...]):
    proc = run(*args, home=tmp_path, check_rc=2)
    assert "no job named 'nope'" in proc.stderr


def test_apply_without_tty_needs_yes(tmp_path: Path):
    proc = run("apply", "examples/quickstart.yaml", "--local", home=tmp_path, check_rc=2)
    assert "--yes" in proc.stderr


def test_list_empty(tmp_path: Path):
    assert "no jobs yet" in run("list", home=tmp_path, check_rc=0).stdout
    assert json.loads(run("list", "--json", home=tmp_path, check_rc=0).stdout) == []


CATALOG = ROOT / "tests" / "data" / "skypilot-catalog" / "v8"


def test_plan_over_budget_exits_3_and_says_by_how_much(tmp_path: Path):
    spec = tmp_path / "tight.yaml"
    spec.write_text((ROOT / "examples" / "cloud-a100-spot.yaml").read_text().replace("max_usd: 25", "max_usd: 0.01"))
    env = {"OPTJOB_CATALOG_DIR": str(CATALOG)}
    proc = run("plan", str(spec), home=tmp_path, env=env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "over budget.max_usd $0.01" in proc.stderr and "Traceback" not in proc.stderr
    plan = json.loads(run("plan", str(spec), "--json", home=tmp_path, env=env).stdout)
    assert plan["budget"]["fits"] is False and plan["budget"]["over_by_usd"] > 0
    assert plan["chosen"]["est_usd"] == pytest.approx(0.01 + plan["budget"]["over_by_usd"], rel=1e-3)
    # apply refuses the same plan before launching anything.
    proc = run("apply", str(spec), "--yes", home=tmp_path, env=env)
    assert proc.returncode == 3 and not (tmp_path / "jobs").exists()


def test_plan_that_cannot_finish_in_time_exits_3(tmp_path: Path):
    spec = tmp_path / "slow.yaml"
    spec.write_text((ROOT / "examples" / "quickstart.yaml").read_text().replace("max_hours: 1", "max_hours: 30s"))
    proc = run("plan", str(spec), home=tmp_path)
    assert proc.returncode == 3 and "no offer finishes within" in proc.stderr
