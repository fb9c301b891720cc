"""Everyday use at the terminal: --set/--name and the user config in plan and validate, the final
line of apply, hpo lines in the live console, `optjob prices` and `optjob cost`."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from optjob.manager.cli import main
from optjob.manager.commands.apply import final_line
from optjob.manager.controller import Outcome
from optjob.manager.job_states import JobStatus, Reason
from optjob.manager.live import LiveReporter, trial_text
from optjob.manager.planner import make_plan
from optjob.manager.store import Store
from optjob.specs import loads_spec

SPEC = "name: quick\nmodel: {init: {}}\nsteps: [{train: {max_steps: 20}}]\nbudget: {max_hours: 1}\n"
HPO_SPEC = ("name: tuned\nmodel: {init: {}}\nsteps:\n"
            "  - hpo: {trials: 2, trial_steps: 2, space: {train.lr: {log_uniform: [1.0e-4, 1.0e-2]}, "
            "train.weight_decay: {uniform: [0.0, 0.1]}}}\n"
            "  - evaluate: {}\n  - train: {max_steps: 300, lr: 3.0e-3}\n")


def cli(*args: str) -> int:
    """Run the CLI in this process; its exit code."""
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# ---- --set, --name, the user config ----------------------------------------------------------------

def test_plan_applies_set_name_and_the_user_config_and_says_so(home: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    home.mkdir(parents=True)
    (home / "config.yaml").write_text("teardown: never\nbudget: {max_usd: 2}\n")
    assert cli("plan", str(spec), "--set", "budget.max_hours=2", "--set", "steps.0.train.max_steps=50",
               "--name", "renamed") == 0
    out = capsys.readouterr().out
    assert "Plan for renamed" in out and "teardown: never" in out and "50 steps" in out
    assert f"defaults from {home / 'config.yaml'}: budget.max_usd=2, teardown=never" in out.replace("\n", " ")
    assert "set on the command line: budget.max_hours=2, steps.0.train.max_steps=50, name=renamed" in \
        out.replace("\n", " ")
    assert cli("plan", str(spec), "--json", "--set", "budget.max_usd=3") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["budget"]["max_usd"] == 3.0 and plan["budget"]["max_hours"] == 1.0
    assert plan["sources"][0].startswith("defaults from") and plan["sources"][1].endswith("budget.max_usd=3")


def test_validate_with_a_bad_set_is_one_line_exit_2(home: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    assert cli("validate", str(spec), "--set", "steps.0.train.max_stepz=5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --set steps.0.train.max_stepz=5: steps[0].train.max_stepz: unknown field 'max_stepz'; "
                   "did you mean 'max_steps'?"]
    assert cli("validate", str(spec), "--name", "other-name") == 0
    assert "ok: " in capsys.readouterr().out


def test_a_bad_user_config_fails_plan_naming_the_file(home: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    home.mkdir(parents=True)
    (home / "config.yaml").write_text("budget: {max_usd: 2}\nregion: us-east-1\n")
    assert cli("plan", str(spec)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {home / 'config.yaml'}:2:1: region: unknown key 'region'")


def test_the_plan_says_hpo_sets_the_tuned_steps_values() -> None:
    plan = make_plan(loads_spec(HPO_SPEC))
    train = plan.steps[2].summary
    assert "lr from hpo (step 0)" in train and "lr 0.003" not in train
    assert "hpo (step 0) also sets weight_decay" in train
    assert "lr 0.003" in make_plan(loads_spec(SPEC.replace("max_steps: 20", "max_steps: 20, lr: 3.0e-3"))
                                   ).steps[0].summary


# ---- apply's last line, the live console --------------------------------------------------------

def test_the_final_line_says_the_reason_only_when_it_adds_to_the_status(tmp_path: Path) -> None:
    ok = Outcome("x", JobStatus.SUCCEEDED, Reason.SUCCEEDED, 0.0123, 1, tmp_path)
    assert final_line(ok).startswith("x: succeeded, spent $0.0123 over 1 attempt(s)")
    assert "(succeeded)" not in final_line(ok)
    assert "(failed)" not in final_line(Outcome("x", JobStatus.FAILED, Reason.FAILED, 0, 1, tmp_path))
    assert final_line(Outcome("x", JobStatus.STOPPED, Reason.BUDGET, 1, 2, tmp_path)).startswith("x: stopped (budget),")


def test_live_console_formats_trials_and_says_what_hpo_hands_on(capsys: pytest.CaptureFixture[str]) -> None:
    plan = make_plan(loads_spec(HPO_SPEC))
    reporter = LiveReporter(plan)
    try:
        reporter.event({"event": "trial", "index": 0, "number": 2, "value": 5.392975234985352,
                        "params": {"train.lr": 0.008459123456, "train.weight_decay": 0.0123456}, "state": "complete"})
        reporter.event({"event": "step_done", "index": 0, "kind": "hpo", "wall_s": 3.0,
                        "metrics": {"metric": "eval_loss", "best_value": 5.101234, "best_trial": 1,
                                    "best.train.lr": 0.008459123456, "best.train.weight_decay": 0.05}})
    finally:
        reporter.close()
    out = " ".join(capsys.readouterr().out.split())  # the console wraps at its width
    assert "trial 2: 5.393 (train.lr=0.008459, train.weight_decay=0.01235) complete" in out
    assert "5.392975" not in out and "{'train.lr'" not in out
    assert "0:hpo best trial 1 (eval_loss 5.101): step 2:train uses train.lr=0.008459, train.weight_decay=0.05" in out
    assert trial_text({"number": 0, "value": None, "params": {}, "state": "pruned"}) == "trial 0: - pruned"


# ---- optjob prices ---------------------------------------------------------------------------------

VMS_HEADER = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region," \
             "AvailabilityZone,Arch\n"


@pytest.fixture
def catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SkyPilot catalog folder with three AWS node types, its file dated 2024-03-05."""
    aws = tmp_path / "catalog" / "aws"
    aws.mkdir(parents=True)
    (aws / "vms.csv").write_text(VMS_HEADER + "\n".join([
        "p4d.24xlarge,A100,8.0,96.0,1152.0,,32.77,9.83,us-east-1,use1-az1,x86_64",
        "p3.2xlarge,V100,1.0,8.0,61.0,,3.06,0.92,us-east-1,use1-az1,x86_64",
        "m6i.2xlarge,,,8.0,32.0,,0.384,0.15,us-east-1,use1-az1,x86_64",
    ]) + "\n")
    day = time.mktime(time.strptime("2024-03-05 12:00", "%Y-%m-%d %H:%M"))
    os.utime(aws / "vms.csv", (day, day))
    monkeypatch.setenv("OPTJOB_CATALOG_DIR", str(tmp_path / "catalog"))
    return tmp_path / "catalog"


def test_prices_reads_a100x8_shows_the_catalog_date_and_the_on_demand_price(
        home: Path, catalog: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("prices", "--cloud", "aws", "--gpu", "A100x8") == 0
    captured = capsys.readouterr()
    assert "reading --gpu A100x8 as A100:8" in captured.err
    out = captured.out
    assert "prices of 2024-03-05" in out and "on-demand $/h" in out
    spot = next(line for line in out.splitlines() if "A100:8" in line and " yes " in line)
    assert "$9.83" in spot and "$32.77" in spot  # the spot price, and the same node on demand beside it
    assert cli("prices", "--cloud", "aws", "--gpu", "8xV100") == 2  # there is no V100:8 here
    assert capsys.readouterr().err.strip().splitlines() == [
        "reading --gpu 8xV100 as V100:8", "error: no offers for V100:8 on aws; V100 comes as V100:1 per node"]


@pytest.mark.parametrize(("args", "message"), [
    (("--gpu", "A100:3"), "error: no offers for A100:3 on aws; A100 comes as A100:8 per node"),
    (("--gpu", "A10O:8"), "error: no offers for A10O:8 on aws; did you mean A100:8?"),
    (("--gpu", "A100:8", "--region", "mars-1"), "error: no offers for A100:8 on aws in mars-1; try without --region"),
])
def test_prices_matching_nothing_is_a_hint_and_exit_2(home: Path, catalog: Path, capsys: pytest.CaptureFixture[str],
                                                      args: tuple[str, ...], message: str) -> None:
    assert cli("prices", "--cloud", "aws", *args) == 2
    assert capsys.readouterr().err.strip() == message


def test_prices_for_an_unsupported_cloud_says_so(home: Path, catalog: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("prices", "--cloud", "oracle") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cloud 'oracle' is not supported" in line and "kubernetes" not in line and "local" not in line


# ---- optjob cost -----------------------------------------------------------------------------------

def _job(store: Store, name: str, plan: dict[str, object] | None, spends: list[tuple[float, float]]) -> None:
    """A finished job with one attempt per (days ago, dollars)."""
    store.claim_job(name, provider="skypilot" if plan else "local", job_dir=str(store.path.parent / name),
                    spec_path=None, spec_json=json.dumps({"name": name}), plan_json=json.dumps(plan) if plan else None,
                    owner_alive=lambda j: False)
    now = store.clock.time()
    for days, usd in spends:
        a = store.add_attempt(name, run=1, provider="x", hourly_usd=usd, nodes=1, spot=bool(plan))
        start = now - days * 86400
        store.update_attempt(a.id, status="succeeded", started_at=start, ended_at=start + 3600)
        store.add_ledger(name, a.number, seconds=3600, usd=usd, hourly_usd=usd, nodes=1, spot=bool(plan))
    store.update_job(name, status=JobStatus.SUCCEEDED, reason=Reason.SUCCEEDED)


def test_cost_since_lists_each_attempt_with_launch_time_and_totals_by_cloud_and_gpu(
        home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(home / "state.db")
    _job(store, "sweep", {"chosen": {"cloud": "aws", "accelerators": "A100:8", "spot": True, "est_usd": 5.0},
                          "budget": {"max_usd": 10}}, [(10, 7.0), (2, 2.0), (1.5, 2.5)])
    _job(store, "small", None, [(0.5, 0.25)])
    store.close()
    assert cli("cost", "--since", "7d") == 0
    out = capsys.readouterr().out
    attempts, jobs = out.split("\nJobs since")
    rows = [line for line in attempts.splitlines() if line.startswith(("sweep ", "small "))]
    assert len(rows) == 3 and all(re.search(r" \d{4}-\d\d-\d\d \d\d:\d\d ", r) for r in rows)  # launched at
    sweep = next(line for line in jobs.splitlines() if line.startswith("sweep "))
    assert sweep.split()[1:4] == ["$4.50", "$5.00", "succeeded"]  # spent in the window, beside the estimate
    assert "$7.00" not in out  # the attempt 10 days ago is left out
    launched = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 2 * 86400))
    assert any(r.startswith("sweep") and launched in r and "$2.00" in r for r in rows)
    assert "by cloud: aws $4.50, local $0.2500" in out
    assert "by accelerator: A100:8 $4.50, CPU $0.2500" in out
    assert "total: $4.75 across 2 job(s), 3 attempt(s) since" in out
    assert cli("cost", "--json", "--since", "24h") == 0
    data = json.loads(capsys.readouterr().out)
    assert [j["name"] for j in data["jobs"]] == ["small"] and data["total_usd"] == pytest.approx(0.25)
    assert data["by_cloud"] == {"local": 0.25} and data["jobs"][0]["attempts"][0]["launched_at"] > 0
    assert cli("cost", "--json") == 0
    assert json.loads(capsys.readouterr().out)["total_usd"] == pytest.approx(11.75)  # --json as before: everything
    assert cli("cost", "--since", "a week") == 2
    assert "--since a week: give a span" in capsys.readouterr().err


def test_shell_completion_as_the_readme_says(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "_OPTJOB_COMPLETE": "bash_complete", "COMP_WORDS": "optjob pl", "COMP_CWORD": "1"}
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = 'optjob'; "
                           "from optjob.manager.cli import main; main()"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert "plain,plan" in proc.stdout.splitlines()


def test_logs_name_the_silent_phases_and_the_variant_of_a_step() -> None:
    """``optjob logs`` dropped the phase events: the minute of data preparation and every evaluation
    read as silence; a compare variant's lines did not say which variant."""
    from optjob.manager.commands.logs import render_event

    assert render_event({"event": "phase", "phase": "data", "state": "start"}) == "preparing data"
    assert render_event({"event": "phase", "phase": "step_eval", "state": "start", "index": 1,
                         "kind": "prune", "variant": "wanda"}) == "evaluating step 1 (prune) of variant wanda"
    assert render_event({"event": "phase", "phase": "data", "state": "end"}) is None
    assert render_event({"event": "phase", "phase": "step", "state": "start", "index": 0, "kind": "train"}) is None
    assert render_event({"event": "step_done", "index": 1, "kind": "prune", "variant": "wanda",
                         "wall_s": 2.0}) == "1:prune (wanda) done in 2.0s"
